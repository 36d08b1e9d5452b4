"""Colab and an installed wheel: what a user outside this checkout gets.

- Every notebook opens with an "Open in Colab" badge and a first code cell that installs the kit in Colab only,
  both pinned to the release in pyproject.toml (scripts/colab_cells.py writes them); the README links the badges.
- A free T4 (CUDA without bf16) gets fp16, an Ampere GPU bf16, down to the DPOConfig arguments.
- The wheel ships notebooks/ and params/; installed into a fresh environment whose packages are already there
  (as Colab's torch is), `dpo-kit init` and `dpo-kit run` work outside the checkout, and the Colab cell, run as if
  in Colab, installs the kit without reinstalling torch. Outside Colab the cell does nothing.

The fresh environments see .venv's packages, the kit's own excepted, through a .pth file: nothing is downloaded
(pip runs with --no-index), and whatever pip would install lands in the fresh environment, where it shows.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat
import pytest

from dpo_kit.run.init_project import InitError, init_project

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])  # .venv's, where torch and the kit's dependencies are


def load_colab_cells():
    spec = importlib.util.spec_from_file_location("colab_cells", REPO / "scripts" / "colab_cells.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


colab_cells = load_colab_cells()
VERSION = colab_cells.pyproject_version()


def install_cell(path: Path) -> str:
    return next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code").source


# --- the cells, the badges and the README name pyproject's release ---------------------------------------------


def test_pyproject_version_is_the_release_the_cells_name():
    import tomllib

    assert VERSION == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert colab_cells.install_source(VERSION) == f"git+https://github.com/dpo-kit/dpo-kit@v{VERSION}"


def test_the_kits_own_version_is_pyprojects_release():
    """`dpo_kit.__version__` names the release a second time; scripts/colab_cells.py writes it with the cells."""
    import dpo_kit

    assert dpo_kit.__version__ == VERSION, "dpo_kit/__init__.py: __version__ is not pyproject's; run scripts/colab_cells.py"
    init = (REPO / "dpo_kit" / "__init__.py").read_text()
    assert colab_cells.with_version(init, "9.9.9") == init.replace(f'__version__ = "{VERSION}"', '__version__ = "9.9.9"')
    assert '__version__ = "9.9.9"' in colab_cells.with_version(init, "9.9.9")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_the_badge_and_install_cell_of_this_release(path):
    notebook = nbformat.read(path, as_version=4)
    first_markdown = next(c for c in notebook.cells if c.cell_type == "markdown").source
    assert colab_cells.badge(path.name, VERSION) in first_markdown, f"{path.name}: run scripts/colab_cells.py"
    assert install_cell(path) == colab_cells.install_cell_source(VERSION), f"{path.name}: run scripts/colab_cells.py"
    assert f"@v{VERSION}\"" in install_cell(path)


def test_readme_links_every_notebooks_badge_at_this_release():
    readme = (REPO / "README.md").read_text()
    for path in NOTEBOOKS:
        assert colab_cells.badge(path.name, VERSION) in readme, f"README: no Colab badge for {path.name} at v{VERSION}"
    assert f"git+https://github.com/dpo-kit/dpo-kit@v{VERSION}" in readme
    stale = set(re.findall(r"dpo-kit/dpo-kit(?:/blob/|@)(v[\w.]+)", readme)) - {f"v{VERSION}"}
    assert not stale, f"README names other releases than v{VERSION}: {stale}"


def test_the_kits_torch_requirement_lets_pip_keep_colabs_torch():
    """A pin or an upper bound would make pip replace Colab's CUDA torch (and pull gigabytes)."""
    from packaging.requirements import Requirement

    pyproject = (REPO / "pyproject.toml").read_text()
    torch = [Requirement(r) for r in re.findall(r'^\s*"(torch[^"]*)"', pyproject, re.MULTILINE)]
    assert len(torch) == 1 and torch[0].name == "torch"
    for colab_torch in ("2.6.0+cu124", "2.8.0+cu126", "2.13.0+cu128"):
        assert torch[0].specifier.contains(colab_torch), f"{torch[0]} would replace Colab's torch {colab_torch}"


# --- a free T4 trains in fp16 ----------------------------------------------------------------------------------


def mock_cuda(monkeypatch, name: str, bf16: bool) -> None:
    """What choose_hardware asks torch.cuda, answered as that GPU would: torch's own is_bf16_supported runs, on a
    compute capability of 8 (Ampere, native bf16) or 7 (T4, V100), where a bf16 tensor is still made (emulation)."""
    import types

    import torch

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *args: types.SimpleNamespace(major=8 if bf16 else 7))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda *args: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: name)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.mark.parametrize(
    ("gpu", "bf16"), [("Tesla T4", False), ("NVIDIA A100-SXM4-40GB", True)], ids=["t4-fp16", "ampere-bf16"]
)
def test_gpu_precision_reaches_the_dpo_config(monkeypatch, tmp_path, gpu, bf16):
    from trl import DPOConfig  # noqa: F401  imported for real first: importing TRL under the mock fails

    from dpo_kit.hardware import choose_hardware
    from dpo_kit.params import load_params
    from dpo_kit.training.train import dpo_config_kwargs

    mock_cuda(monkeypatch, gpu, bf16)
    choice = choose_hardware()
    assert (choice.device, choice.device_name, choice.device_count) == ("cuda", gpu, 1)
    assert (choice.bf16, choice.fp16) == (bf16, not bf16)
    assert choice.dtype == ("bfloat16" if bf16 else "float16")
    kwargs = dpo_config_kwargs(load_params(REPO / "params" / "tiny.yaml", []), tmp_path, choice)
    assert kwargs["bf16"] is bf16 and kwargs["fp16"] is (not bf16)
    assert "use_cpu" not in kwargs and kwargs["dataloader_pin_memory"] is True


# --- the install cell outside Colab ----------------------------------------------------------------------------


def test_the_install_cell_does_nothing_outside_colab(monkeypatch, tmp_path):
    assert "google.colab" not in sys.modules
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: calls.append(args))
    monkeypatch.setattr(os, "chdir", lambda *args: calls.append(("chdir", *args)))
    monkeypatch.setenv("DPO_KIT_COLAB_PROJECT", str(tmp_path / "project"))
    cwd = os.getcwd()
    namespace: dict = {}
    exec(compile(install_cell(NOTEBOOKS[0]), "colab-install", "exec"), namespace)
    assert calls == [] and os.getcwd() == cwd and not (tmp_path / "project").exists()
    assert not {"kit_source", "colab_project"} & set(namespace)


# --- dpo-kit init ----------------------------------------------------------------------------------------------


def test_init_copies_notebooks_and_params_and_never_overwrites(tmp_path, capsys):
    from dpo_kit.run.cli import main

    assert main(["init", str(tmp_path / "proj")]) == 0
    assert sorted(p.name for p in (tmp_path / "proj" / "notebooks").iterdir()) == [p.name for p in NOTEBOOKS]
    assert (tmp_path / "proj" / "params" / "tiny.yaml").read_text() == (REPO / "params" / "tiny.yaml").read_text()

    (tmp_path / "proj" / "params" / "tiny.yaml").write_text("edited")
    assert main(["init", str(tmp_path / "proj")]) == 1
    assert f"{tmp_path / 'proj'} already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "proj" / "params" / "tiny.yaml").read_text() == "edited"
    (tmp_path / "a-file").write_text("")
    with pytest.raises(InitError, match="a-file exists and is a file"):
        init_project(tmp_path / "a-file")
    (tmp_path / "empty").mkdir()
    assert (init_project(tmp_path / "empty") / "notebooks" / NOTEBOOKS[0].name).is_file()


def test_init_prints_a_cd_command_that_a_shell_can_run(tmp_path, capsys):
    """The next step was printed as `cd <folder> && dpo-kit run ...` unquoted: for a folder with a space in its name
    the shell's cd went to the first word's folder, or failed. Whatever the shell does with the printed command is
    what the user gets, so it is run."""
    import subprocess

    from dpo_kit.run.cli import main

    project = tmp_path / "my projects" / "dpo"
    assert main(["init", str(project)]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "next, cd " in line]
    cd = line.split("next, ", 1)[1].split(" && ", 1)[0]
    shown = subprocess.run(["bash", "-c", f"{cd} && pwd"], capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout.strip() == str(project), (line, shown)


# --- the wheel, and fresh environments like Colab's ------------------------------------------------------------


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    """The checkout's files, without its environment, runs or build leftovers (a stale build/lib would ship)."""
    copy = tmp_path_factory.mktemp("source") / "dpo-kit"
    ignored = shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info", "__pycache__", ".*_cache", "wandb")
    shutil.copytree(REPO, copy, ignore=ignored)
    return copy


@pytest.fixture(scope="module")
def wheel(source_copy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    pip(sys.executable, "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(source_copy))
    (built,) = out.glob("dpo_kit-*.whl")
    return built


def clean_env(**extra: str) -> dict[str, str]:
    """No trace of .venv or the checkout: only the fresh environment's interpreter decides what is importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_BUILD_ISOLATION="0", **extra)
    return env


def pip(python: str | Path, *args: str, env: dict | None = None) -> str:
    done = subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True, env=env or clean_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def fresh_env(root: Path) -> Path:
    """A venv that finds .venv's packages already installed (as Colab has torch), the kit's own left out."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    preinstalled = root / "preinstalled"  # a view of .venv's site-packages without dpo-kit
    preinstalled.mkdir()
    for entry in SITE_PACKAGES.iterdir():
        if not re.search(r"dpo[_-]kit", entry.name, re.IGNORECASE) and entry.suffix != ".pth":
            (preinstalled / entry.name).symlink_to(entry)
    python = root / "bin" / "python"
    site = Path(run_python(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (site / "preinstalled.pth").write_text(f"{preinstalled}\n")
    return python


def run_python(python: Path, code: str, cwd: Path | None = None, env: dict | None = None) -> str:
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=cwd, env=env or clean_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


WHERE = ("import importlib.metadata as m, json, torch\n"
         "print(json.dumps({'torch': torch.__file__, 'version': torch.__version__,"
         " 'dist': str(m.distribution('torch')._path)}))")


def test_the_wheel_ships_the_notebooks_and_params(wheel):
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for path in NOTEBOOKS:
        assert f"dpo_kit/template/notebooks/{path.name}" in names
    for path in (REPO / "params").glob("*.yaml"):
        assert f"dpo_kit/template/params/{path.name}" in names
    assert "dpo_kit/training/accelerate_configs/ddp.yaml" in names and "dpo_kit/run/init_project.py" in names
    assert not any(name.startswith(("notebooks/", "params/", "tests/")) for name in names)


def test_the_installed_wheel_inits_and_runs_a_project_outside_the_checkout(wheel, tmp_path):
    python = fresh_env(tmp_path / "env")
    pip(python, "install", str(wheel))  # --no-index: every dependency must already be there
    kit = run_python(python, "import dpo_kit; print(dpo_kit.__file__)", cwd=tmp_path)
    assert str(tmp_path / "env") in kit and str(REPO) not in kit

    # With no notebooks in the project, the runner finds the wheel's own.
    found = run_python(python, "from pathlib import Path\nfrom dpo_kit.run.runner import notebooks_dir\n"
                       f"print(notebooks_dir(Path({str(tmp_path)!r})))", cwd=tmp_path)
    assert found.strip().endswith("site-packages/dpo_kit/template/notebooks") and str(tmp_path / "env") in found

    dpo_kit = str(tmp_path / "env" / "bin" / "dpo-kit")
    work = tmp_path / "work"
    work.mkdir()
    subprocess.run([dpo_kit, "init", "proj"], cwd=work, env=clean_env(), check=True, capture_output=True)
    done = subprocess.run([dpo_kit, "run", "params/tiny.yaml", "--quiet"], cwd=work / "proj", env=clean_env(),
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((work / "proj" / "runs" / "tiny" / "manifest.json").read_text())
    assert manifest["status"] == "completed", manifest
    assert (work / "proj" / "runs" / "tiny" / "metrics.json").is_file()


def test_the_colab_cell_installs_the_kit_and_keeps_torch(source_copy, tmp_path):
    python = fresh_env(tmp_path / "env")
    before = json.loads(run_python(python, WHERE, cwd=tmp_path))
    project = tmp_path / "content" / "dpo-kit"
    cell = tmp_path / "cell.py"
    cell.write_text(install_cell(NOTEBOOKS[1]))
    driver = (
        "import os, sys, types\n"
        "sys.modules['google.colab'] = types.ModuleType('google.colab')  # what Colab's kernel has imported\n"
        f"exec(compile(open({str(cell)!r}).read(), 'colab-install', 'exec'), {{}})\n"
        "print('cwd=' + os.getcwd())\n"
    )
    env = clean_env(DPO_KIT_COLAB_SOURCE=str(source_copy), DPO_KIT_COLAB_PROJECT=str(project))
    out = run_python(python, driver, cwd=tmp_path, env=env)

    assert f"cwd={project / 'notebooks'}" in out  # project_dir = ".." and params/tiny.yaml now resolve
    assert (project / "params" / "tiny.yaml").is_file() and (project / "notebooks" / NOTEBOOKS[1].name).is_file()
    assert json.loads(run_python(python, WHERE, cwd=tmp_path)) == before, "torch was reinstalled"
    site = Path(run_python(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    assert not list(site.glob("torch*")), "pip installed a torch of its own"
    kit = run_python(python, "import dpo_kit.run.cli, dpo_kit; print(dpo_kit.__file__)", cwd=tmp_path)
    assert kit.strip().startswith(str(site)), kit

    again = run_python(python, driver, cwd=tmp_path, env=env)  # run twice: installed and initialised already
    assert f"cwd={project / 'notebooks'}" in again


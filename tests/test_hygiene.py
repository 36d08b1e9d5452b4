"""What the pre-commit hooks enforce, enforced again in CI: clean notebooks and lint-clean code."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LINTED = ("dpo_kit", "tests", "bench", "notebooks", "scripts", "setup.py", "conftest.py")  # what ruff checks


def hook(hook_id: str) -> dict:
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    return next(h for repo in config["repos"] for h in repo["hooks"] if h["id"] == hook_id)


def test_the_pre_commit_config_is_valid():
    done = subprocess.run([BIN / "pre-commit", "validate-config", ".pre-commit-config.yaml"], cwd=REPO,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_committed_notebooks_pass_the_nbstripout_hook():
    entry = hook("nbstripout")["entry"].split()
    notebooks = sorted(str(p) for p in (REPO / "notebooks").glob("*.ipynb"))
    done = subprocess.run([BIN / entry[0], *entry[1:], "--verify", *notebooks], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_nbstripout_hook_catches_a_notebook_with_outputs(tmp_path):
    import nbformat

    dirty = tmp_path / "dirty.ipynb"
    shutil.copy(REPO / "notebooks" / "03_merge.ipynb", dirty)
    notebook = nbformat.read(dirty, as_version=4)
    code = next(cell for cell in notebook.cells if cell.cell_type == "code")
    code.execution_count = 3
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="left behind\n")]
    nbformat.write(notebook, dirty)
    entry = hook("nbstripout")["entry"].split()
    assert subprocess.run([BIN / entry[0], *entry[1:], "--verify", str(dirty)], capture_output=True).returncode == 1


def test_the_code_passes_the_ruff_hook():
    # The tests and notebooks too: a zip() over lists of different lengths passes a test that should fail (B905).
    done = subprocess.run([BIN / "ruff", "check", *LINTED], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    files = re.compile(hook("ruff")["files"])  # and the commit hook checks the same places
    for path in ("dpo_kit/params.py", "tests/test_params.py", "bench/pipeline.py", "notebooks/02_train_dpo.ipynb",
                 "scripts/colab_cells.py", "setup.py", "conftest.py"):  # fmt: skip
        assert files.match(path), f".pre-commit-config.yaml's ruff hook leaves out {path}"


def test_every_notebook_opens_with_what_it_does_how_long_and_what_it_needs():
    import nbformat

    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        first = next(cell for cell in notebook.cells if cell.cell_type == "markdown").source
        assert first.startswith("# "), f"{path.name}: the first markdown cell opens with a title"
        needs = next((line for line in first.splitlines() if line.startswith("**Time and needs:**")), "")
        assert "CPU" in needs and "GPU" in needs and "network" in needs, f"{path.name}: say time on a CPU and needs"
        assert any(ch.isdigit() for ch in needs) or "minute" in needs, f"{path.name}: say how long"

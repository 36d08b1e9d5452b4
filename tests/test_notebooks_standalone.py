"""Every notebook runs as committed, with its own defaults, the way JupyterLab would run it.

A copy of notebooks/ and params/ in a temporary project keeps the test from writing into the repo;
each notebook gets a fresh kernel of its own, as it would in JupyterLab.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import papermill
import pytest

pytestmark = pytest.mark.notebook
REPO = Path(__file__).resolve().parent.parent


def test_all_notebooks_run_in_order_with_their_default_parameters(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(REPO / "notebooks", project / "notebooks")
    shutil.copytree(REPO / "params", project / "params")
    outputs = tmp_path / "executed"
    outputs.mkdir()
    for notebook in sorted((project / "notebooks").glob("*.ipynb")):
        papermill.execute_notebook(
            str(notebook), str(outputs / notebook.name), kernel_name="python3",
            cwd=str(project / "notebooks"), progress_bar=False,
        )
    assert (project / "runs" / "_tiny-chat-model" / "model.safetensors").exists(), "the tiny model was built on demand"
    run_dir = project / "runs" / "tiny-notebooks"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert [manifest["stages"][s]["status"] for s in ["format", "train", "merge", "generate", "evaluate"]] == [
        "completed"] * 5
    assert json.loads((run_dir / "metrics.json").read_text())["rewards/accuracies"] > 0.5
    assert list((project / "runs" / "from-scratch").glob("*.png")), "the from-scratch notebook saved its figures"

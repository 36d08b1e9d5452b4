"""Capture the expected outputs of the notebooks' `# NBVAL_CHECK_OUTPUT` cells into tests/notebook_outputs/.

Run it after changing such a cell or what it prints, and commit the result:

    .venv/bin/python scripts/capture_notebook_outputs.py

Every notebook in notebooks/ runs, in order, in a fresh copy of notebooks/ and params/ (so nothing stored
under the checkout's runs/ is shown instead of computed), with its own defaults, as nbval runs it. The copy
written to tests/notebook_outputs/<notebook> keeps the outputs of the checked cells only, images left out (nbval
does not compare them); nbval compares the rest through tests/notebook_outputs/sanitize.cfg.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.nbval_expected import CHECK_MARKER, EXPECTED_OUTPUTS, NOTEBOOKS, is_checked  # noqa: E402


def execute(path: Path, project: Path):
    """Run a notebook of the temporary project in its folder, as nbval does; returns it with outputs."""
    executed = nbformat.read(path, as_version=4)
    NotebookClient(executed, timeout=1800, kernel_name="python3",
                   resources={"metadata": {"path": str(project / "notebooks")}}).execute()
    return executed


def capture(notebook: Path, project: Path) -> Path:
    executed = execute(project / "notebooks" / notebook.name, project)
    expected = nbformat.read(notebook, as_version=4)
    for cell, ran in zip(expected.cells, executed.cells, strict=True):
        if cell.cell_type == "code" and is_checked(cell.source):
            cell.outputs, cell.execution_count = ran.outputs, ran.execution_count
            for output in cell.outputs:  # nbval never compares images; they would only bloat the file
                for mime in [m for m in output.get("data", {}) if m.startswith("image/")]:
                    del output["data"][mime]
    EXPECTED_OUTPUTS.mkdir(parents=True, exist_ok=True)
    target = EXPECTED_OUTPUTS / notebook.name
    nbformat.write(expected, target)
    return target


def main() -> int:
    import argparse

    # No options: --help only says what a run does, before it spends minutes executing every notebook.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    notebooks = [p for p in sorted(NOTEBOOKS.glob("*.ipynb"))
                 if any(is_checked(c.source) for c in nbformat.read(p, as_version=4).cells if c.cell_type == "code")]
    for stale in EXPECTED_OUTPUTS.glob("*.ipynb"):
        if stale.name not in {p.name for p in notebooks}:
            stale.unlink()  # its notebook no longer checks any cell
    with tempfile.TemporaryDirectory() as directory:
        project = Path(directory)
        shutil.copytree(NOTEBOOKS, project / "notebooks")
        shutil.copytree(REPO / "params", project / "params")
        # Every notebook runs, in order, as in the notebook tier: a later stage needs the earlier ones' run.
        for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
            if notebook in notebooks:
                print(f"{notebook.name}: captured {CHECK_MARKER} outputs into {capture(notebook, project)}")
            else:
                execute(project / "notebooks" / notebook.name, project)
    return 0


if __name__ == "__main__":
    sys.exit(main())

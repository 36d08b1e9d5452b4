"""Expected outputs for nbval's `# NBVAL_CHECK_OUTPUT` cells, kept outside the committed notebooks.

Committed notebooks carry no outputs, and nbval checks a `# NBVAL_CHECK_OUTPUT` cell against the output
stored in the notebook it runs. The expected outputs therefore live in tests/notebook_outputs/<notebook>,
captured from a run by `python scripts/capture_notebook_outputs.py`. The root conftest.py calls
`give_expected_outputs` once the items are selected, before the cells run: each checked cell of notebooks/ gets its expected output from
there, and a checked cell without one, or whose source differs from the captured copy's, stops the session
with the command that refreshes them.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
EXPECTED_OUTPUTS = REPO / "tests" / "notebook_outputs"
CHECK_MARKER = "# NBVAL_CHECK_OUTPUT"
REFRESH = "python scripts/capture_notebook_outputs.py"


def is_checked(source: str) -> bool:
    return any(line.strip() == CHECK_MARKER for line in source.splitlines())


def nbval_cells(items) -> list:
    return [item for item in items if type(item).__name__ == "IPyNbCell"]


def _expected_cells(notebook: Path) -> list:
    path = EXPECTED_OUTPUTS / notebook.name
    if not path.exists():
        raise pytest.UsageError(f"{notebook} has {CHECK_MARKER} cells but {path} does not exist; run {REFRESH}")
    return [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]


def give_expected_outputs(items) -> None:
    """Set the stored output of every checked nbval cell of notebooks/ from its captured copy."""
    expected: dict[Path, list] = {}
    for item in nbval_cells(items):
        notebook = Path(str(item.fspath)).resolve()
        if notebook.parent != NOTEBOOKS.resolve() or not is_checked(item.cell.source):
            continue  # a notebook elsewhere (e.g. a test's copy) keeps its own stored outputs
        if notebook not in expected:
            expected[notebook] = _expected_cells(notebook)
        cells = expected[notebook]
        reference = cells[item.cell_num] if item.cell_num < len(cells) else None
        if reference is None or reference.source != item.cell.source or reference.execution_count is None:
            raise pytest.UsageError(
                f"{notebook.name} cell {item.cell_num} is marked {CHECK_MARKER}, but"
                f" {EXPECTED_OUTPUTS / notebook.name} holds no captured output for that source; run {REFRESH}"
            )
        item.cell.outputs = reference.outputs
        item.cell.execution_count = reference.execution_count

"""pytest glue for the notebook tier: nbval runs every notebook in notebooks/ (`pytest --nbval-lax`).

Here, at the root, so that `pytest --nbval-lax notebooks/` on its own gets it too: the notebooks' cells are
marked `notebook` (so `-m "not notebook"` leaves them out), and the checked cells that remain selected get
their expected outputs from tests/notebook_outputs/ (see tests/nbval_expected.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.nbval_expected import give_expected_outputs, nbval_cells
from tests.notebook_warnings import warning_lines

collect_ignore_glob = ["tests/notebook_outputs/*.ipynb"]  # expected outputs, not notebooks to run


def pytest_configure(config):
    # nbval opens the sanitize file relative to the working directory; pyproject names it from the root.
    sanitize = getattr(config.option, "nbval_sanitize_with", None)
    if sanitize and not Path(sanitize).is_absolute():
        config.option.nbval_sanitize_with = str(config.rootpath / sanitize)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the marker added here
def pytest_collection_modifyitems(config, items):
    cells = nbval_cells(items)
    for item in cells:
        item.add_marker(pytest.mark.notebook)
    # Tests that read what the notebook tier left behind run after its cells, whatever order paths came in.
    after = [item for item in items if item.get_closest_marker("after_notebooks")]
    if after and cells:
        items[:] = [item for item in items if item not in after] + after


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, which a plain `pytest` run may not have
def pytest_xdist_make_scheduler(config, log):
    """`-n 2`: the notebooks' cells on one worker, in order, then the tests that read what they left (tests/parallel.py)."""
    if config.getvalue("dist") == "each":
        return None
    from tests.parallel import NotebookTierTogether

    return NotebookTierTogether(config, log)


def pytest_collection_finish(session):
    give_expected_outputs(nbval_cells(session.items))  # only the cells that will run


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A notebook cell that printed a warning fails, naming the lines: nbval checks only that a cell runs (and
    the outputs of checked cells), and a reader opening the notebook sees what it printed."""
    result = yield
    if type(item).__name__ == "IPyNbCell":
        lines = warning_lines(getattr(item, "test_outputs", None))
        if lines:
            pytest.fail(f"{item.name} printed warnings a reader would see:\n  " + "\n  ".join(lines), pytrace=False)
    return result

"""pytest glue for the notebook tier: nbval runs every notebook in notebooks/ (`pytest --nbval-lax`).

Here, at the root, so that `pytest --nbval-lax notebooks/` on its own gets it too: the notebooks' cells are
marked `notebook` (so `-m "not notebook"` leaves them out), and their checked cells get their expected
outputs from tests/notebook_outputs/ (see tests/nbval_expected.py).
"""

from __future__ import annotations

import pytest

from tests.nbval_expected import give_expected_outputs, nbval_cells

collect_ignore_glob = ["tests/notebook_outputs/*.ipynb"]  # expected outputs, not notebooks to run


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the marker added here
def pytest_collection_modifyitems(config, items):
    cells = nbval_cells(items)
    for item in cells:
        item.add_marker(pytest.mark.notebook)
    give_expected_outputs(cells)
    # Tests that read what the notebook tier left behind run after its cells, whatever order paths came in.
    after = [item for item in items if item.get_closest_marker("after_notebooks")]
    if after and cells:
        items[:] = [item for item in items if item not in after] + after

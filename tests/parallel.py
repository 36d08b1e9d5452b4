"""How pytest-xdist splits this suite over workers (`-n 2`, as scripts/test.sh runs the unit and notebook tiers).

One scope runs on one worker, its tests in collection order. A notebook's cells share one kernel and must run in
order, and tests/test_notebook_tier.py reads what the notebooks leave behind in the checkout's runs/ (its
`after_notebooks` tests run after the cells): all of those are one scope. Every other test file is a scope of its
own, so that its module-scoped fixtures are built once. (xdist's `--dist loadgroup` would express this with marks,
but it renames nodes through `item._nodeid`, which pytest 9 no longer reads.)
"""

from __future__ import annotations

from xdist.scheduler import LoadScopeScheduling

NOTEBOOK_TIER_TESTS = "tests/test_notebook_tier.py"


def scope_of(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return "notebook tier" if path.endswith(".ipynb") or path == NOTEBOOK_TIER_TESTS else path


class NotebookTierTogether(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
        return scope_of(nodeid)

"""How pytest-xdist splits this suite over workers (`-n 2`, as scripts/test.sh runs the unit and notebook tiers).

One scope runs on one worker, its tests in collection order. A notebook's cells share one kernel and must run in
order, and tests/test_notebook_tier.py reads what the notebooks leave behind in the checkout's runs/ (its
`after_notebooks` tests run after the cells): all of those are one scope. Every other test file is a scope of its
own, so that its module-scoped fixtures are built once. (xdist's `--dist loadgroup` would express this with marks,
but it renames nodes through `item._nodeid`, which pytest 9 no longer reads.)

xdist hands out the scopes with the most tests first; a slow scope of few tests (test_resume.py: four tests, two
minutes) then starts last and runs alone while the other worker idles. The slowest scopes go first instead, longest
first, as measured one after the other at b5ab3c6 (seconds in the comments). The order only moves time around: a
stale list makes the run slower, never wrong.
"""

from __future__ import annotations

from collections import OrderedDict

from xdist.scheduler import LoadScopeScheduling

NOTEBOOK_TIER_TESTS = "tests/test_notebook_tier.py"
NOTEBOOK_TIER = "notebook tier"
SLOWEST_FIRST = [
    NOTEBOOK_TIER,  # 172: every notebook, then the notebook tier run twice in a copy
    "tests/test_sweep.py",  # 153
    "tests/test_resume.py",  # 109
    "tests/test_pipeline.py",  # 81
    "tests/test_launch.py",  # 74
    "tests/test_ref_cache.py",  # 58
    "tests/test_stage_rerun.py",  # 47
    "tests/test_report.py",  # 33
    "tests/test_colab_and_wheel.py",  # 33
    "tests/test_tracking.py",  # 27
    "tests/test_warnings_and_progress.py",  # 27
]


def scope_of(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return NOTEBOOK_TIER if path.endswith(".ipynb") or path == NOTEBOOK_TIER_TESTS else path


def slowest_first(scopes: list[str]) -> list[str]:
    """The scopes of SLOWEST_FIRST in its order, then the others in the order given (stable)."""
    rank = {scope: index for index, scope in enumerate(SLOWEST_FIRST)}
    return sorted(scopes, key=lambda scope: rank.get(scope, len(rank)))


class NotebookTierTogether(LoadScopeScheduling):
    def __init__(self, config, log=None) -> None:
        super().__init__(config, log)
        self._ordered = False

    def _split_scope(self, nodeid: str) -> str:
        return scope_of(nodeid)

    def _assign_work_unit(self, node) -> None:
        # The work queue is complete by the first assignment (LoadScopeScheduling.schedule): order it once, then.
        if not self._ordered:
            self.workqueue = OrderedDict((scope, self.workqueue[scope]) for scope in slowest_first(list(self.workqueue)))
            self._ordered = True
        super()._assign_work_unit(node)

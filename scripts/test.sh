#!/usr/bin/env bash
# The test suite: set up, then unit tests, every notebook under nbval, and the real-model tier.
# Extra arguments go to one pytest over all tiers, e.g. -m "not notebook and not real_model" for the unit tests alone
# (-m "not notebook" would run the real-model tier too).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The notebooks show a stage's stored result when run again with the same params. The test command must test
# the code as it is now, so an earlier notebook run in this checkout is moved aside (kept, never deleted).
for earlier in runs/tiny-notebooks runs/from-scratch; do
    if [ -e "$earlier" ]; then
        kept="$earlier.archived-$(date +%Y%m%d-%H%M%S)"
        mv "$earlier" "$kept"
        echo "dpo-kit tests: moved the earlier notebook run $earlier to $kept"
    fi
done
if [ $# -gt 0 ]; then
    exec .venv/bin/python -m pytest -q "$@"
fi
# With no arguments (CI): the unit and notebook tiers on two pytest-xdist workers, then the real-model tier alone.
# Those two tiers are mostly process start-ups (every kernel and subprocess imports torch, transformers and TRL)
# and tiny-model steps, single-threaded work that two workers overlap; each worker and what it starts gets one
# torch thread, so that two of them never oversubscribe the cores (two tiers at two threads each ran slower
# together than one after the other, f3d633b). The real-model tier is one long training that wants every core,
# so it runs on its own, with the default threads, as the demo does. tests/parallel.py keeps the notebooks' cells
# together on one worker, in order.
set +e
OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -n 2 -m "not real_model"
fast_rc=$?
if [ "$fast_rc" -eq 2 ]; then
    exit 2  # interrupted (Ctrl-C): pytest has said so; the real-model tier is not started
fi
.venv/bin/python -m pytest -q -m real_model
real_rc=$?
set -e
if [ "$fast_rc" -ne 0 ] || [ "$real_rc" -ne 0 ]; then
    echo "dpo-kit tests: FAILED (unit and notebook tiers: exit status $fast_rc; real-model tier: $real_rc)"
    exit 1
fi

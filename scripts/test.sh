#!/usr/bin/env bash
# The test suite: set up, then unit tests (seconds), every notebook under nbval, and the real-model tier.
# Extra arguments go to one pytest over all tiers, e.g. -m "not notebook" for the unit tests alone.
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
# With no arguments (CI), the real-model tier runs beside the other two. It is one long training whose matmuls
# use both cores, the rest mostly single-threaded process start-ups and tiny-model steps, so together they
# finish minutes sooner than one after the other. The tests, seeds and thread counts are the same either way,
# and so are the numbers; only the wall clock changes. Its report is printed after the others'.
real_log=$(mktemp "${TMPDIR:-/tmp}/dpo-kit-real-model-tier.XXXXXX")
.venv/bin/python -m pytest -q -p no:cacheprovider -m real_model >"$real_log" 2>&1 &
real_pid=$!
trap 'kill "$real_pid" 2>/dev/null || true' EXIT INT TERM
echo "dpo-kit tests: the real-model tier runs in the background (pid $real_pid, log $real_log)"
set +e
.venv/bin/python -m pytest -q -m "not real_model"
rest_rc=$?
wait "$real_pid"
real_rc=$?
set -e
echo
echo "dpo-kit tests: the real-model tier (-m real_model), exit status $real_rc:"
cat "$real_log"
if [ "$rest_rc" -ne 0 ] || [ "$real_rc" -ne 0 ]; then
    echo "dpo-kit tests: FAILED (unit and notebook tiers: exit status $rest_rc; real-model tier: $real_rc)"
    exit 1
fi
rm -f "$real_log"

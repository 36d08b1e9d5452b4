#!/usr/bin/env bash
# The test suite: set up, then unit tests (seconds), every notebook under nbval, and the real-model tier.
# Extra arguments go to pytest, e.g. -m "not notebook" for the unit tests alone.
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
exec .venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# The test suite: set up, then unit tests (seconds) and notebook tests (every notebook on the tiny model).
# Extra arguments go to pytest, e.g. -m "not notebook" for the unit tests alone.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"

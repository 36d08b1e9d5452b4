#!/usr/bin/env bash
# The tiny end-to-end demo: set up, then run all five stage notebooks on the tiny offline model.
# Extra arguments go to `dpo-kit run`, e.g. --set run.name=my-demo or --overwrite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dpo-kit run params/tiny.yaml "$@"

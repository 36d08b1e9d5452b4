#!/usr/bin/env bash
# The demo: set up, then run all five stage notebooks of the controlled-sentiment experiment on the real
# SmolLM2-135M-Instruct (offline, from its GGUF), and print the headline numbers. About 10 minutes on 2 CPU cores.
# Extra arguments go to `dpo-kit run`, e.g. --set run.name=my-demo or --overwrite.
# DEMO_PARAMS=params/tiny.yaml runs the tiny smoke run instead (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dpo-kit run "${DEMO_PARAMS:-params/smollm2-135m-sentiment.yaml}" "$@"

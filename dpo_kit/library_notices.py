"""Library messages that a reader of a kit notebook would otherwise see, each handled where it starts.

Only messages listed here, each matched by its logger and its exact opening words, are affected; every other
warning (above all one about the user's own data or params) still shows.
"""

from __future__ import annotations

import logging

# bitsandbytes >= 0.49, on a CPU with AVX512-BF16 (this one and CI's), asks the `kernels` package at import for a
# 4-bit matmul kernel from the hub, "kernels-community/quantization-bitsandbytes". transformers 5 requires
# `kernels`, so it is always installed. Offline (HF_HUB_OFFLINE=1, as the tests run) `kernels` logs that it skips
# the hub's publisher check and then finds no cached copy; online, with no network, it cannot ask the hub whether
# the publisher is trusted. Either way bitsandbytes logs "Failed to load CPU gemm_4bit_forward from
# kernels-community: <why>. Please make sure you already `pip install kernels` ...", advice that does not apply
# (`kernels` is installed), and then uses its own compiled CPU kernels, which are what the kit's QLoRA-on-CPU
# tests run. peft imports bitsandbytes whenever it is installed, so every stage printed them. Both are dropped,
# the first only for that one repository. (With a network, `kernels` asks the hub and downloads the kernel if its
# publisher is trusted: not tried here, where there is no network.)
BITSANDBYTES_HUB_KERNEL = ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community")
KERNELS_OFFLINE_TRUST_CHECK = (
    "kernels._internals.hf_hub",
    "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in"
    " offline mode",
)
ANSWERED = (BITSANDBYTES_HUB_KERNEL, KERNELS_OFFLINE_TRUST_CHECK)


class DropMessage(logging.Filter):
    def __init__(self, opening: str) -> None:
        super().__init__()
        self.opening = opening

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.opening)


def answer_library_notices() -> None:
    """Install the filters (idempotent). Called by `import dpo_kit`, before peft or bitsandbytes are imported."""
    for logger_name, opening in ANSWERED:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, DropMessage) and f.opening == opening for f in logger.filters):
            logger.addFilter(DropMessage(opening))

"""Library messages that a reader of a kit notebook would otherwise see, each handled where it starts.

Only messages listed here, each matched by its logger and its exact opening words, are affected; every other
warning (above all one about the user's own data or params) still shows.
"""

from __future__ import annotations

import logging

# bitsandbytes >= 0.49, on a CPU with AVX512-BF16, tries at import to fetch a 4-bit matmul kernel from the hub
# ("kernels-community/quantization-bitsandbytes", through the `kernels` package), and logs
# "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make sure you
# already `pip install kernels`" when it cannot. peft imports bitsandbytes whenever it is installed, so every
# stage printed it. The kit leaves `kernels` out on purpose: it would download code from the hub and run it at
# import (and offline it fails anyway); bitsandbytes then uses its own compiled CPU kernels, which are what the
# kit's QLoRA-on-CPU tests run. So the advice does not apply, and the message is dropped.
BITSANDBYTES_HUB_KERNEL = ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community")


class DropMessage(logging.Filter):
    def __init__(self, opening: str) -> None:
        super().__init__()
        self.opening = opening

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.opening)


def answer_library_notices() -> None:
    """Install the filters (idempotent). Called by `import dpo_kit`, before peft or bitsandbytes are imported."""
    logger_name, opening = BITSANDBYTES_HUB_KERNEL
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, DropMessage) and f.opening == opening for f in logger.filters):
        logger.addFilter(DropMessage(opening))

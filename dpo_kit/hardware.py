"""Choose precision and activation checkpointing from the hardware actually present.

TRL's DPOConfig defaults to bf16 and gradient checkpointing everywhere. On a 2-core CPU that was ~27x
slower than fp32 without checkpointing for a 13M-param model (35 s vs 1.3 s per step), so the kit decides
from what it finds and records the decision in the run's manifest. The CPU choice is fp32 everywhere; on a
CPU that multiplies in bf16 natively (avx512_bf16, AMX) a real model trains faster with bf16 autocast asked
for in params (dpo.bf16: true; SmolLM2-135M LoRA: 1.7x, bench/train_throughput.py), which the kit does not
choose by itself yet: every recorded result of the kit was made in fp32.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class HardwareChoice:
    device: str  # "cuda", "mps" or "cpu"
    device_name: str
    device_count: int
    bf16_supported: bool
    bf16: bool
    fp16: bool
    gradient_checkpointing: bool
    dtype: str  # weight dtype for loading: float32 / bfloat16 / float16
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_has_bf16() -> bool:
    """True when the CPU advertises native bf16 arithmetic (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_hardware() -> HardwareChoice:
    """Pick mixed precision and checkpointing for this machine.

    - CUDA with bf16: bf16 autocast, checkpointing on (memory is the GPU's constraint).
    - CUDA without bf16 (T4, V100): fp16 autocast, checkpointing on.
    - CPU / MPS: fp32 and no checkpointing: recomputation costs time and memory is plentiful. Whether the CPU
      multiplies in bf16 natively is recorded (bf16_supported), not used: bf16 autocast was far slower for the
      tiny model and 1.7x faster for SmolLM2-135M on the same CPU, so params decide (dpo.bf16).
    """
    import torch

    if torch.cuda.is_available():
        # Native bf16 only (Ampere and later). torch's default also counts emulation, and answers True on a T4 or V100,
        # which then trained in emulated bf16, slower than fp16 on their tensor cores.
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return HardwareChoice(
            device="cuda",
            device_name=torch.cuda.get_device_name(0),
            device_count=torch.cuda.device_count(),
            bf16_supported=bf16,
            bf16=bf16,
            fp16=not bf16,
            gradient_checkpointing=True,
            dtype="bfloat16" if bf16 else "float16",
            reason="GPU: mixed precision and activation checkpointing to save GPU memory",
        )
    native_bf16 = cpu_has_bf16()
    device = "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"
    return HardwareChoice(
        device=device,
        device_name=platform.processor() or platform.machine(),
        device_count=os.cpu_count() or 1,
        bf16_supported=native_bf16,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        dtype="float32",
        reason=(
            f"{device.upper()}: fp32 without activation checkpointing; TRL's defaults (bf16 + checkpointing)"
            " made a step of a 13M-param model ~27x slower on a 2-core CPU"
            + ("; this CPU multiplies in bf16 natively: dpo.bf16: true may train a larger model faster" if native_bf16 else "")
        ),
    )


def resolve_dtype(requested: str, choice: HardwareChoice):
    """torch dtype for `requested` ('auto' follows the hardware choice)."""
    import torch

    name = choice.dtype if requested == "auto" else requested
    return getattr(torch, name)

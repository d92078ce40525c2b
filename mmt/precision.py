"""Compute precision: what ``auto`` means on this machine, and the autocast context for generation.

``auto`` is bf16 where bf16 matrix maths is native (CUDA devices that support it; CPUs with AVX512-BF16 or
AMX-BF16) and full precision elsewhere. On the 2-core AVX512-BF16 CPUs this project is developed on, bf16
autocast made Gemma 3 270M's greedy decoding 2.5x faster at equal scores, and a training step 2.4x faster
(docs/architecture.md, "Precision"). Weights stay in their loaded dtype (fp32 master weights); only the
matrix maths runs in bf16.

``MMT_AUTO_PRECISION=no|bf16`` fixes what ``auto`` resolves to, e.g. to reproduce fp32 numbers on a bf16
machine (the test suite sets ``no`` so that it behaves alike on every CPU).
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # mmt.config reads PRECISIONS, and reading a config must not import torch
    import torch

PRECISIONS = ("auto", "no", "bf16", "fp16")
AUTO_ENV = "MMT_AUTO_PRECISION"


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises AVX512-BF16 or AMX-BF16 (Linux /proc/cpuinfo; False where unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def resolve(precision: str, device: torch.device | str = "cpu") -> str:
    """``precision`` with ``auto`` replaced by ``bf16`` or ``no`` for ``device``."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    forced = os.environ.get(AUTO_ENV)
    if forced:
        if forced not in ("no", "bf16"):
            raise ValueError(f"${AUTO_ENV} must be 'no' or 'bf16', got {forced!r}")
        return forced
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "no"
    return "no"


def resolve_for(precision: str, model) -> str:
    """``precision`` resolved for the device of ``model``'s parameters (the CPU for a model without any)."""
    param = next(model.parameters(), None) if hasattr(model, "parameters") else None
    return resolve(precision, param.device if param is not None else "cpu")


def autocast(precision: str, model: torch.nn.Module):
    """The autocast context that runs ``model``'s fp32 maths in ``precision`` (a no-op for ``no``, and for a
    model whose weights are already in half precision)."""
    import torch

    chosen = resolve_for(precision, model)
    param = next(model.parameters(), None)
    if chosen == "no" or param is None or param.dtype != torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(param.device.type, dtype=torch.bfloat16 if chosen == "bf16" else torch.float16)

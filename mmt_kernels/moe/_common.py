"""Activation codes and the argument checks shared by the MoE stages."""

from __future__ import annotations

import torch

ACTS = {"silu": 0, "gelu_tanh": 1}
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def act_name(act) -> str:
    """The activation's name, from its name or its code in ``ACTS``."""
    if isinstance(act, str):
        if act not in ACTS:
            raise ValueError(f"unknown activation {act!r}; expected one of {sorted(ACTS)}")
        return act
    return {v: k for k, v in ACTS.items()}[int(act)]


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_float(name: str, t: torch.Tensor, op: str):
    if t.dtype not in FLOATS:
        raise TypeError(f"{op}: {name} must be fp32, bf16 or fp16, got {t.dtype}")


def check_2d(name: str, t: torch.Tensor, op: str):
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D [rows, d], got shape {tuple(t.shape)}")
    check_float(name, t, op)


def check_index(name: str, t: torch.Tensor, like: torch.Tensor, op: str, n: int | None = None):
    if t.dtype != torch.int64 or t.dim() != 1:
        raise TypeError(f"{op}: {name} must be a 1-D int64 tensor, got {t.dtype} {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device}, data on {like.device}")
    if n is not None and t.numel() != n:
        raise ValueError(f"{op}: {name} must have {n} entries, got {t.numel()}")

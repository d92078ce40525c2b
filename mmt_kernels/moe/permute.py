"""Stage 2: the counting sort of (token, choice) slots by expert."""

from __future__ import annotations

import torch

from .._registry import OpSpec, check_indices, register
from ..reference import moe as _ref


def _fake(expert_ids, num_experts):
    n = expert_ids.numel()
    return expert_ids.new_empty(n), expert_ids.new_empty(n), expert_ids.new_empty(num_experts + 1)


MOE_PERMUTE = register(
    OpSpec(
        name="moe_permute",
        schema="(Tensor expert_ids, int num_experts) -> (Tensor perm, Tensor inv, Tensor offsets)",
        reference=_ref.permute,
        fake=_fake,
        triton="moe:permute",
    )
)


def moe_permute(expert_ids: torch.Tensor, num_experts: int, *, backend: str | None = None):
    """Stable counting sort of the slots of ``expert_ids [T, k]`` by expert: ``(perm, inv, offsets)``.

    ``perm [T*k]`` lists slots (``t*k + s``) in expert order, ``inv`` is its inverse and ``offsets [E+1]``
    the expert segment boundaries. Runs on the device without a host sync (histogram, prefix sum, scatter).
    """
    if expert_ids.dtype != torch.int64:
        raise TypeError(f"moe_permute: expert_ids must be int64, got {expert_ids.dtype}")
    if num_experts < 1:
        raise ValueError(f"moe_permute: num_experts must be >= 1, got {num_experts}")
    check_indices("moe_permute", "expert_ids", expert_ids, num_experts)
    which = MOE_PERMUTE.choose(expert_ids.device, backend)
    return MOE_PERMUTE(which, expert_ids.contiguous(), num_experts)

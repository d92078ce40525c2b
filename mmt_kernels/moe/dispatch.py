"""Stages 3 and 5: tokens into expert order (dispatch) and back (combine), each the other's backward.

No atomics: both are gathers, so every backend is deterministic.
"""

from __future__ import annotations

import torch

from .._registry import OpSpec, check_indices, register
from ..reference import moe as _ref
from ._common import acc_dtype, check_2d, check_index


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, perm, inv, k, which):
        ctx.save_for_backward(inv)
        ctx.k, ctx.which = k, which
        return MOE_DISPATCH(which, x, perm, None, k)

    @staticmethod
    def backward(ctx, dxp):
        (inv,) = ctx.saved_tensors
        # Each token's k copies come back by gathering its k rows: the combine with unit weights.
        return MOE_COMBINE(ctx.which, dxp.contiguous(), inv, None, ctx.k), None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, yp, inv, perm, weights, k, which):
        w = None if weights is None else weights.reshape(-1).float().contiguous()
        ctx.save_for_backward(yp, inv, perm, w)
        ctx.k, ctx.which, ctx.has_w = k, which, weights is not None
        ctx.w_dtype = None if weights is None else weights.dtype
        ctx.w_shape = None if weights is None else weights.shape
        return MOE_COMBINE(which, yp, inv, w, k)

    @staticmethod
    def backward(ctx, dout):
        yp, inv, perm, w = ctx.saved_tensors
        dout = dout.contiguous()
        dyp = dw = None
        if ctx.needs_input_grad[0]:  # dyp[j] = w[perm[j]] * dout[perm[j] // k]: a scaled dispatch
            dyp = MOE_DISPATCH(ctx.which, dout, perm, w, ctx.k)
        if ctx.has_w and ctx.needs_input_grad[3]:
            dw = MOE_COMBINE_WEIGHT_GRAD(ctx.which, dout, yp, inv, ctx.k)
            dw = dw.to(ctx.w_dtype).view(ctx.w_shape)
        return dyp, None, None, dw, None, None


def _combine_weight_grad_reference(dout, yp, inv, k):
    acc = acc_dtype(yp)
    return (dout.to(acc).repeat_interleave(k, 0) * yp[inv].to(acc)).sum(1)


MOE_DISPATCH = register(
    OpSpec(
        name="moe_dispatch",
        schema="(Tensor x, Tensor perm, Tensor? scale, int k) -> Tensor",
        reference=lambda x, perm, scale, k: _ref.dispatch(x, perm, k, scale),
        fake=lambda x, perm, scale, k: x.new_empty(perm.shape[0], x.shape[1]),
        triton="moe:dispatch",
        autograd=_Dispatch,
    )
)
MOE_COMBINE = register(
    OpSpec(
        name="moe_combine",
        schema="(Tensor yp, Tensor inv, Tensor? weights, int k) -> Tensor",
        reference=lambda yp, inv, weights, k: _ref.combine(yp, inv, k, weights),
        fake=lambda yp, inv, weights, k: yp.new_empty(inv.shape[0] // k, yp.shape[1]),
        triton="moe:combine",
        autograd=_Combine,
    )
)
MOE_COMBINE_WEIGHT_GRAD = register(
    OpSpec(
        name="moe_combine_weight_grad",
        schema="(Tensor dout, Tensor yp, Tensor inv, int k) -> Tensor",
        reference=_combine_weight_grad_reference,
        fake=lambda dout, yp, inv, k: yp.new_empty(inv.shape[0], dtype=acc_dtype(yp)),
        triton="moe:combine_weight_grad",
    )
)


def moe_dispatch(
    x: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor, k: int, *, backend: str | None = None
) -> torch.Tensor:
    """Tokens in expert order: ``xp[j] = x[perm[j] // k]``; the backward sums each token's k rows."""
    op = "moe_dispatch"
    check_2d("x", x, op)
    check_index("perm", perm, x, op, x.shape[0] * k)
    check_index("inv", inv, x, op, x.shape[0] * k)
    check_indices(op, "perm", perm, perm.numel())
    check_indices(op, "inv", inv, inv.numel())
    which = MOE_DISPATCH.choose(x.device, backend, x.dtype)
    if which == "reference":
        return _ref.dispatch(x, perm, k)
    return MOE_DISPATCH.apply(x.contiguous(), perm, inv, k, which)


def moe_combine(
    yp: torch.Tensor,
    inv: torch.Tensor,
    perm: torch.Tensor,
    weights: torch.Tensor | None,
    k: int,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Back to token order: ``out[t] = sum_s weights[t, s] * yp[inv[t*k + s]]`` (fixed order, no atomics)."""
    op = "moe_combine"
    check_2d("yp", yp, op)
    check_index("inv", inv, yp, op, yp.shape[0])
    check_index("perm", perm, yp, op, yp.shape[0])
    if k < 1 or yp.shape[0] % k:
        raise ValueError(f"{op}: yp has {yp.shape[0]} rows, not a multiple of k={k}")
    if weights is not None and weights.numel() != yp.shape[0]:
        raise ValueError(f"{op}: weights must have T*k={yp.shape[0]} entries, got shape {tuple(weights.shape)}")
    check_indices(op, "inv", inv, inv.numel())
    check_indices(op, "perm", perm, perm.numel())
    which = MOE_COMBINE.choose(yp.device, backend, yp.dtype)
    if which == "reference":
        return _ref.combine(yp, inv, k, weights)
    return MOE_COMBINE.apply(yp.contiguous(), inv, perm, weights, k, which)

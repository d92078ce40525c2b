"""Neuron-sparse weight gradients: only the selected neurons' part of dW, into compact fp32 buffers.

A layer trained through :class:`~mmt_kernels.NeuronSparseAdamW` updates only the selected neurons of its weight
(rows of gate/up, ``neuron_dim=0``; columns of down, ``neuron_dim=1``). :func:`sparse_linear` computes
``x @ W.T`` and, in the backward, the exact input gradient and only those neurons' weight gradient, accumulated
into ``W.compact_grad`` in the optimizer's compact layout: fp32 ``[K, C]`` for rows (row k = neuron k of the sorted
selection), ``[C, K]`` for columns (``dW[:, rows]`` as it lies in dW). ``W.grad`` stays ``None``: the full dW is
never built.

Op ``sparse_weight_grad_(acc!, a, rows, b, transposed=False)``: ``acc += a[:, rows].T @ b`` (``[K, C]``) or, when
``transposed``, ``acc += b.T @ a[:, rows]`` (``[C, K]``); see the reference for ``a``/``b``.
"""

from __future__ import annotations

import torch
from torch import nn

from ._registry import OpSpec, register
from .reference import sparse_grad as _ref

__all__ = ["SparseWeightGrad", "sparse_linear", "sparse_weight_grad_"]

SPARSE_WGRAD = register(
    OpSpec(
        name="sparse_weight_grad_",
        schema="(Tensor(a!) acc, Tensor a, Tensor rows, Tensor b, bool transposed=False) -> ()",
        reference=_ref.sparse_weight_grad_,
        fake=lambda *args: None,
        triton="sparse_grad:sparse_weight_grad_",
        cuda=True,
        # the CUDA kernel is SIMT fp32 FMA; Triton's tl.dot takes the tensor cores: Triton first until measured
        cuda_order=("triton", "cuda", "reference"),
    )
)


def sparse_weight_grad_(
    acc: torch.Tensor,
    a: torch.Tensor,
    rows: torch.Tensor,
    b: torch.Tensor,
    *,
    transposed: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """``acc += a[:, rows].T @ b`` in place (``a [N, R]``, ``rows`` int64 ``[K]``, ``b [N, C]``, ``acc [K, C]``);
    with ``transposed``, ``acc += b.T @ a[:, rows]`` (``acc [C, K]``, the column neurons' layout).

    ``acc`` is fp32 (fp64 for the reference's golden mode); ``a``/``b`` fp32, bf16 or fp16 of one dtype."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"sparse_weight_grad_: a [N, R] and b [N, C] expected, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if rows.dtype != torch.int64 or rows.dim() != 1:
        raise TypeError(f"sparse_weight_grad_: rows must be a 1-D int64 tensor, got {rows.dtype} {tuple(rows.shape)}")
    want = (b.shape[1], rows.numel()) if transposed else (rows.numel(), b.shape[1])
    if acc.shape != want:
        raise ValueError(
            f"sparse_weight_grad_: acc has shape {tuple(acc.shape)}; expected [{want[0]}, {want[1]}]"
            + (" ([C, K], transposed)" if transposed else " ([K, C])")
        )
    if acc.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"sparse_weight_grad_: acc must be fp32 (or fp64), got {acc.dtype}")
    if a.dtype != b.dtype or a.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"sparse_weight_grad_: a and b must share a floating dtype, got {a.dtype} and {b.dtype}")
    if not acc.is_contiguous():
        raise ValueError("sparse_weight_grad_: acc must be contiguous (it is accumulated in place)")
    for name, t in (("a", a), ("rows", rows), ("b", b)):
        if t.device != acc.device:
            raise ValueError(f"sparse_weight_grad_: {name} is on {t.device}, acc on {acc.device}")
    which = SPARSE_WGRAD.choose(acc.device, backend, acc.dtype if acc.dtype == torch.float64 else a.dtype)
    SPARSE_WGRAD(which, acc, a.contiguous(), rows.contiguous(), b.contiguous(), bool(transposed))
    return acc


class SparseWeightGrad:
    """Which neurons of which weights get a compact gradient. ``set_rows(weight, rows)`` before the forward;
    rows are sorted and deduplicated here, as ``NeuronSparseAdamW.set_selection`` does. A weight's buffer is
    dropped when its selection changes (the optimizer must have consumed it: one selection per step)."""

    def __init__(self, backend: str | None = None):
        self.backend = backend
        self.enabled = True  # a user of the routed layers may switch them back to the dense dW
        self.rows: dict[nn.Parameter, torch.Tensor] = {}
        self.dims: dict[nn.Parameter, int] = {}

    def set_rows(self, weight: nn.Parameter, rows: torch.Tensor, neuron_dim: int) -> None:
        if neuron_dim not in (0, 1):
            raise ValueError(f"SparseWeightGrad: neuron_dim must be 0 or 1, got {neuron_dim}")
        r = torch.unique(torch.as_tensor(rows).to(torch.int64).reshape(-1)).to(weight.device)
        n = weight.shape[neuron_dim]
        if r.numel() and (int(r[0]) < 0 or int(r[-1]) >= n):
            raise IndexError(
                f"SparseWeightGrad: neuron indices must be in [0, {n}) for a weight of shape "
                f"{tuple(weight.shape)} (neuron_dim {neuron_dim})"
            )
        old = self.rows.get(weight)
        if old is None or old.shape != r.shape or not torch.equal(old, r) or self.dims.get(weight) != neuron_dim:
            weight.compact_grad = None
        self.rows[weight], self.dims[weight] = r, neuron_dim

    def clear(self, weight: nn.Parameter) -> None:
        """Back to the dense dW for ``weight`` (until the next ``set_rows``)."""
        self.rows.pop(weight, None)
        weight.compact_grad = None


class _SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, rows, neuron_dim, backend):
        ctx.save_for_backward(x, weight)
        ctx.rows, ctx.neuron_dim, ctx.backend, ctx.has_bias = rows, neuron_dim, backend, bias is not None
        ctx.weight_param = weight
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = (dy @ weight.to(dy.dtype)) if ctx.needs_input_grad[0] else None
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        if x2.dtype != dy2.dtype:
            x2 = x2.to(dy2.dtype)
        # rows: dy[:, rows].T @ x, [K, C]; columns: dy.T @ x[:, rows], [C, K] (the optimizer's column layout)
        columns = ctx.neuron_dim == 1
        a, b = (x2, dy2) if columns else (dy2, x2)
        p = ctx.weight_param
        if getattr(p, "compact_grad", None) is None:
            k, c = ctx.rows.numel(), b.shape[1]
            p.compact_grad = torch.zeros((c, k) if columns else (k, c), dtype=torch.float32, device=p.device)
        sparse_weight_grad_(p.compact_grad, a, ctx.rows, b, transposed=columns, backend=ctx.backend)
        db = dy2.float().sum(0).to(dy.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, None, db, None, None, None


def sparse_linear(
    x: torch.Tensor,
    weight: nn.Parameter,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    neuron_dim: int,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose backward writes only ``rows``' weight gradient, to
    ``weight.compact_grad`` (see the module docstring); the input (and bias) gradients are exact."""
    return _SparseLinear.apply(x, weight, bias, rows, neuron_dim, backend)

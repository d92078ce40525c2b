"""Stage 4: the experts' gated MLPs over their contiguous segments (a grouped GEMM), forward and backward.

There is no CUDA C++ grouped GEMM: on GPU, Triton runs it (also when the ``cuda`` backend is forced).
"""

from __future__ import annotations

import torch

from .._registry import OpSpec, register
from ..reference import moe as _ref
from ._common import ACTS, act_name, check_2d, check_index


class _GroupedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp, offsets, w_gate, w_up, w_down, act, train_mask, which):
        y, g, u = MOE_GROUPED_MLP(which, xp, offsets, w_gate, w_up, w_down, act)
        # Saved: x and the two pre-activations (act(g) * u is recomputed in the backward).
        ctx.save_for_backward(xp, g, u, offsets, w_gate, w_up, w_down, train_mask)
        ctx.act, ctx.which = act, which
        return y

    @staticmethod
    def backward(ctx, dy):
        xp, g, u, offsets, w_gate, w_up, w_down, train_mask = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_dw = any(ctx.needs_input_grad[2:5])
        dx, dwg, dwu, dwd = MOE_GROUPED_MLP_BACKWARD(
            ctx.which, dy.contiguous(), xp, g, u, offsets, w_gate, w_up, w_down, train_mask, ctx.act, need_dx, need_dw
        )
        return (dx if need_dx else None, None, *((dwg, dwu, dwd) if need_dw else (None, None, None)), None, None, None)


def _ref_mlp(xp, offsets, w_gate, w_up, w_down, act):
    y = _ref.grouped_mlp(xp, offsets, w_gate, w_up, w_down, act=act_name(act))
    g, u = xp.new_empty(xp.shape[0], w_gate.shape[1]), xp.new_empty(xp.shape[0], w_gate.shape[1])
    for e, (s, t) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        g[s:t], u[s:t] = xp[s:t] @ w_gate[e].t(), xp[s:t] @ w_up[e].t()
    return y, g, u


def _ref_mlp_bwd(dy, xp, gate, up, offsets, w_gate, w_up, w_down, train_mask, act, need_dx, need_dw):
    # Autograd through the reference, for backends that need an op-shaped backward (tests, fallbacks).
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (xp, w_gate, w_up, w_down)]
        y = _ref.grouped_mlp(*leaves[:1], offsets, *leaves[1:], act=act_name(act))
        grads = torch.autograd.grad(y, leaves, dy, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]
    dx, dwg, dwu, dwd = grads
    if need_dw and train_mask is not None:
        keep = train_mask.to(device=xp.device, dtype=torch.bool).view(-1, 1, 1)
        dwg, dwu, dwd = (torch.where(keep, g, torch.zeros_like(g)) for g in (dwg, dwu, dwd))
    empty = xp.new_empty(0)
    return (dx if need_dx else empty, *((dwg, dwu, dwd) if need_dw else (empty, empty, empty)))


def _mlp_fake(xp, offsets, w_gate, w_up, w_down, act):
    n, f = xp.shape[0], w_gate.shape[1]
    return xp.new_empty(n, w_down.shape[1]), xp.new_empty(n, f), xp.new_empty(n, f)


def _mlp_bwd_fake(dy, xp, gate, up, offsets, w_gate, w_up, w_down, train_mask, act, need_dx, need_dw):
    dx = xp.new_empty(xp.shape) if need_dx else xp.new_empty(0)
    if need_dw:
        return dx, w_gate.new_empty(w_gate.shape), w_up.new_empty(w_up.shape), w_down.new_empty(w_down.shape)
    return dx, xp.new_empty(0), xp.new_empty(0), xp.new_empty(0)


MOE_GROUPED_MLP = register(
    OpSpec(
        name="moe_grouped_mlp",
        schema="(Tensor xp, Tensor offsets, Tensor w_gate, Tensor w_up, Tensor w_down, int act) "
        "-> (Tensor y, Tensor gate, Tensor up)",
        reference=_ref_mlp,
        fake=_mlp_fake,
        triton="moe:grouped_mlp",
        cuda=False,
        autograd=_GroupedMLP,
    )
)
MOE_GROUPED_MLP_BACKWARD = register(
    OpSpec(
        name="moe_grouped_mlp_backward",
        schema="(Tensor dy, Tensor xp, Tensor gate, Tensor up, Tensor offsets, Tensor w_gate, Tensor w_up, "
        "Tensor w_down, Tensor? train_mask, int act, bool need_dx, bool need_dw) "
        "-> (Tensor dx, Tensor dw_gate, Tensor dw_up, Tensor dw_down)",
        reference=_ref_mlp_bwd,
        fake=_mlp_bwd_fake,
        triton="moe:grouped_mlp_backward",
        cuda=False,
    )
)


def _mask_weight_grad(w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep.view(-1, *([1] * (w.dim() - 1))), w, w.detach())


def grouped_mlp(
    xp: torch.Tensor,
    offsets: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    act: str = "silu",
    train_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Expert e's ``down(act(gate x) * up x)`` over rows ``offsets[e]:offsets[e+1]`` of ``xp``.

    ``w_gate, w_up: [E, f, d]``, ``w_down: [E, d, f]``. ``train_mask`` (bool [E]): experts marked False
    get zero weight gradients, and their weight-gradient GEMMs are skipped.
    """
    op = "moe_grouped_mlp"
    check_2d("xp", xp, op)
    if w_gate.dim() != 3 or w_up.shape != w_gate.shape or w_gate.shape[2] != xp.shape[1]:
        raise ValueError(
            f"{op}: w_gate/w_up must be [E, f, d={xp.shape[1]}], got {tuple(w_gate.shape)} and {tuple(w_up.shape)}"
        )
    E, f, d = w_gate.shape
    if tuple(w_down.shape) != (E, d, f):
        raise ValueError(f"{op}: w_down must be [E, d, f] = [{E}, {d}, {f}], got {tuple(w_down.shape)}")
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w.dtype != xp.dtype:
            raise TypeError(f"{op}: {name} is {w.dtype}, xp is {xp.dtype}")
        if w.device != xp.device:
            raise ValueError(f"{op}: {name} is on {w.device}, xp on {xp.device}")
    check_index("offsets", offsets, xp, op, E + 1)
    if train_mask is not None and (train_mask.dtype != torch.bool or train_mask.numel() != E):
        raise ValueError(f"{op}: train_mask must be bool [E={E}], got {train_mask.dtype} {tuple(train_mask.shape)}")
    if not torch.compiler.is_compiling():  # segments inside [0, N]: a kernel would read past xp otherwise
        torch._assert_async(
            (offsets[0] == 0) & (offsets[-1] == xp.shape[0]) & (offsets[1:] >= offsets[:-1]).all(),
            f"{op}: offsets must run from 0 to the number of rows {xp.shape[0]} and never decrease",
        )
    act = act_name(act)
    which = MOE_GROUPED_MLP.choose(xp.device, backend, xp.dtype)
    if which == "reference":
        if train_mask is not None:
            w_gate, w_up, w_down = (_mask_weight_grad(w, train_mask) for w in (w_gate, w_up, w_down))
        return _ref.grouped_mlp(xp, offsets, w_gate, w_up, w_down, act=act)
    return MOE_GROUPED_MLP.apply(
        xp.contiguous(),
        offsets,
        w_gate.contiguous(),
        w_up.contiguous(),
        w_down.contiguous(),
        ACTS[act],
        train_mask,
        which,
    )

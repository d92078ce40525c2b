"""Stages 2-5 as one call: the whole dropless top-k MoE FFN over tokens, and its low-memory CPU training path."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import ACTS, act_name
from .dispatch import MOE_COMBINE, MOE_COMBINE_WEIGHT_GRAD, MOE_DISPATCH, moe_combine, moe_dispatch
from .experts import MOE_GROUPED_MLP, MOE_GROUPED_MLP_BACKWARD, grouped_mlp
from .permute import moe_permute
from .routing import route


@dataclass
class MoEOutput:
    out: torch.Tensor  # [T, d]
    aux_loss: torch.Tensor  # load balancing, unweighted (1.0 when perfectly balanced)
    z_loss: torch.Tensor  # mean squared router logsumexp, unweighted
    expert_ids: torch.Tensor  # [T, k]
    weights: torch.Tensor  # [T, k] combine weights (before `scale`)
    counts: torch.Tensor  # [E] tokens per expert (slots), on the device


class _FusedMoE(torch.autograd.Function):
    """dispatch -> grouped MLP -> combine as one autograd node (CPU training path, lower peak memory).

    The forward keeps only ``g``/``u`` (and ``yp`` until the combine-weight gradient is taken) instead of
    ``xp``, ``g``, ``u`` and ``yp``; the backward never materialises the dispatched gradient ``dyp``,
    the dispatched input ``xp`` or ``dxp`` ([T*k, d] each): it walks the experts in chunks of about
    ``chunk_rows`` slots, gathers those rows of ``x`` and ``dout`` (scaled by the combine weights), runs
    the grouped-MLP backward op on the chunk and adds the chunk's input gradient into ``dx`` in a fixed
    order (deterministic).
    """

    @staticmethod
    def forward(ctx, x, w, w_gate, w_up, w_down, perm, inv, offsets, train_mask, k, act, which, chunk_rows):
        xp = MOE_DISPATCH(which, x, perm, None, k)
        yp, g, u = MOE_GROUPED_MLP(which, xp, offsets, w_gate, w_up, w_down, act)
        del xp
        out = MOE_COMBINE(which, yp, inv, w, k)
        ctx.save_for_backward(x, g, u, perm, inv, offsets, w_gate, w_up, w_down, train_mask, w)
        # Not a saved tensor, so that the backward can drop it as soon as the weight gradient is taken.
        ctx.yp = yp if ctx.needs_input_grad[1] else None
        ctx.k, ctx.act, ctx.which, ctx.chunk_rows = k, act, which, chunk_rows
        return out

    @staticmethod
    def backward(ctx, dout):
        x, g, u, perm, inv, offsets, w_gate, w_up, w_down, train_mask, w = ctx.saved_tensors
        k, act, which = ctx.k, ctx.act, ctx.which
        dout = dout.contiguous()
        need_dx, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_dw = any(ctx.needs_input_grad[2:5])
        dw_comb = None
        if need_w:
            dw_comb = MOE_COMBINE_WEIGHT_GRAD(which, dout, ctx.yp, inv, k)
        ctx.yp = None
        if not (need_dx or need_dw):
            return None, dw_comb, None, None, None, None, None, None, None, None, None, None, None
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        dx = torch.zeros(x.shape, dtype=acc, device=x.device) if need_dx else None
        dws = [torch.empty_like(t) for t in (w_gate, w_up, w_down)] if need_dw else None
        off = offsets.tolist()
        E = len(off) - 1
        e0 = 0
        while e0 < E:
            e1 = e0 + 1
            while e1 < E and off[e1 + 1] - off[e0] <= ctx.chunk_rows:
                e1 += 1
            lo, hi = off[e0], off[e1]
            if hi == lo:
                if need_dw:
                    for t in dws:
                        t[e0:e1].zero_()
                e0 = e1
                continue
            rows = perm[lo:hi]
            tok = torch.div(rows, k, rounding_mode="floor")
            dy = (dout.index_select(0, tok).to(acc) * w.index_select(0, rows).to(acc).unsqueeze(1)).to(dout.dtype)
            xp = x.index_select(0, tok)
            dxc, dwg, dwu, dwd = MOE_GROUPED_MLP_BACKWARD(
                which,
                dy,
                xp,
                g[lo:hi],
                u[lo:hi],
                offsets[e0 : e1 + 1] - lo,
                w_gate[e0:e1],
                w_up[e0:e1],
                w_down[e0:e1],
                None if train_mask is None else train_mask[e0:e1],
                act,
                need_dx,
                need_dw,
            )
            del dy, xp
            if need_dw:
                for t, c in zip(dws, (dwg, dwu, dwd)):
                    t[e0:e1].copy_(c)
            del dwg, dwu, dwd
            if need_dx:
                dx.index_add_(0, tok, dxc.to(acc))
            del dxc
            e0 = e1
        return (
            None if dx is None else dx.to(x.dtype),
            dw_comb,
            *(dws if need_dw else (None, None, None)),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


# CPU training path of moe_ffn: True = the chunked single-node backward (_FusedMoE: about 0.8x the
# per-expert loop's peak memory at the fine-grained benchmark shape, but ~1.5x slower than the unfused
# path: per-chunk weight-gradient copies and an index_add_); False = dispatch / grouped MLP / combine as
# three nodes (faster, ~1.1x the loop's peak at fine-grained shapes). "auto" takes the chunked path only
# where the [T*k, d] dispatch tensors outweigh the experts' [T*k, f] intermediates (k*d > f: fine-grained
# experts), which is where the three-node path costs memory. moe_ffn(low_memory=...) overrides it per call.
LOW_MEMORY_CPU: bool | str = "auto"


def _fused_cpu_ok(x, which_ops, low_memory, k: int, d_expert: int) -> bool:
    mode = LOW_MEMORY_CPU if low_memory is None else low_memory
    wanted = (k * x.shape[-1] > d_expert) if mode == "auto" else bool(mode)
    return (
        wanted
        and all(w == "cpu" for w in which_ops)
        and x.device.type == "cpu"
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def moe_ffn(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    k: int = 2,
    act: str = "silu",
    expert_mask: torch.Tensor | None = None,
    train_mask: torch.Tensor | None = None,
    scale: float = 1.0,
    backend: str | None = None,
    n_active: int | None = None,
    low_memory: bool | str | None = None,
) -> MoEOutput:
    """Dropless top-k MoE FFN over tokens ``x [T, d]``: route, permute, dispatch, grouped MLP, combine.

    ``expert_mask`` (bool [E]) restricts routing to the allowed experts; ``train_mask`` (bool [E]) skips
    weight gradients of frozen experts; ``scale`` multiplies the combine weights.

    On CPU with the C++ ops, when a gradient is needed (and not under ``torch.compile``), dispatch, grouped
    MLP and combine run as one autograd node (:class:`_FusedMoE`) whose backward works expert chunk by
    chunk, so no ``[T*k, d]`` tensor besides ``yp`` (freed early in the backward) outlives the forward.
    ``low_memory=True|False`` (or ``mmt_kernels.moe.fused.LOW_MEMORY_CPU``; default ``"auto"``: only when
    ``k * d > f``) forces the chunked or the faster three-node path.
    """
    if x.dim() != 2 or router_logits.shape != (x.shape[0], w_gate.shape[0]):
        raise ValueError(
            f"moe_ffn: expected x [T, d] and router_logits [T, E={w_gate.shape[0]}], got "
            f"{tuple(x.shape)} and {tuple(router_logits.shape)}"
        )
    E = w_gate.shape[0]
    weights, ids, aux, z = route(router_logits, k, expert_mask, n_active)
    perm, inv, offsets = moe_permute(ids, E, backend=backend)
    w = weights * scale if scale != 1.0 else weights
    which_ops = [op.choose(x.device, backend, x.dtype) for op in (MOE_DISPATCH, MOE_COMBINE, MOE_GROUPED_MLP)]
    if (
        _fused_cpu_ok(x, which_ops, low_memory, k, w_gate.shape[1])
        and x.dtype == w_gate.dtype == w_up.dtype == w_down.dtype
        and w_gate.dim() == 3
        and w_gate.shape[2] == x.shape[1]
        and w_up.shape == w_gate.shape
        and tuple(w_down.shape) == (E, x.shape[1], w_gate.shape[1])
        and (train_mask is None or (train_mask.dtype == torch.bool and train_mask.numel() == E))
        and any(t.requires_grad for t in (x, w, w_gate, w_up, w_down))
    ):
        n = x.shape[0] * k
        out = _FusedMoE.apply(
            x.contiguous(),
            w.reshape(-1).float().contiguous(),
            w_gate.contiguous(),
            w_up.contiguous(),
            w_down.contiguous(),
            perm,
            inv,
            offsets,
            train_mask,
            k,
            ACTS[act_name(act)],
            which_ops[2],
            max(256, -(-n // 16)),
        )
        return MoEOutput(out, aux, z, ids, weights, offsets[1:] - offsets[:-1])
    xp = moe_dispatch(x, perm, inv, k, backend=backend)
    yp = grouped_mlp(xp, offsets, w_gate, w_up, w_down, act=act, train_mask=train_mask, backend=backend)
    out = moe_combine(yp, inv, perm, w.reshape(-1), k, backend=backend)
    return MoEOutput(out, aux, z, ids, weights, offsets[1:] - offsets[:-1])

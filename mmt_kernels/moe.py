"""Family 2: FFT-routed top-k mixture of experts.

Pieces, each usable alone and each differentiable:

* :func:`fft_features` ``(x [T, d], n_freq) -> [T, F]``: ``log1p(|rfft(x)|)[:F]`` per token over the
  hidden dim, computed as a GEMM against a cached ``[d, 2F]`` cos/sin basis (exact, no complex tensor);
* :func:`route`: softmax top-k over router logits, returning the load-balancing and z losses;
* :func:`moe_permute`: counting sort of the (token, choice) slots by expert: ``perm``, ``inv``, ``offsets``;
* :func:`moe_dispatch` / :func:`moe_combine`: gather tokens into expert order / weighted gather back
  (no atomics: deterministic);
* :func:`grouped_mlp`: SwiGLU (or GeGLU) experts over their contiguous segments, forward and backward,
  with ``train_mask`` skipping the weight gradients of frozen experts;
* :func:`moe_ffn` and :class:`MoEFFN`: the whole dropless MoE FFN.

Backends: ``cpu`` (C++ in ``_C``), ``triton`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``),
``cuda`` (C++/CUDA for permute/dispatch/combine; the grouped GEMM and the FFT features are Triton-only
on GPU, so a forced ``cuda`` backend runs those two with Triton), ``reference`` (plain PyTorch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from . import _backend
from .reference import moe as _ref

ACTS = {"silu": 0, "gelu_tanh": 1}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_CUDA_ORDER = ("cuda", "triton", "reference")        # permute / dispatch / combine
_TRITON_ONLY_ORDER = ("triton", "reference")          # grouped GEMM, FFT features on GPU


def _choose(op: str, device, backend: str | None, cuda_kernel: bool) -> str:
    if not cuda_kernel and torch.device(device).type == "cuda":
        wanted = (backend or _backend.get_backend()).lower()
        if wanted == "cuda":  # documented: no CUDA C++ grouped GEMM / FFT; Triton runs them on GPU
            backend = "triton"
    return _backend.choose(op, device, backend=backend, compiled_name=op,
                           cuda_order=_CUDA_ORDER if cuda_kernel else _TRITON_ONLY_ORDER)


# ---- fake (meta) kernels, shared by the C++ ops and the Triton custom ops ---------------------

def _permute_fake(expert_ids, num_experts):
    n = expert_ids.numel()
    return expert_ids.new_empty(n), expert_ids.new_empty(n), expert_ids.new_empty(num_experts + 1)


def _dispatch_fake(x, perm, scale, k):
    return x.new_empty(perm.shape[0], x.shape[1])


def _combine_fake(yp, inv, weights, k):
    return yp.new_empty(inv.shape[0] // k, yp.shape[1])


def _combine_wgrad_fake(dout, yp, inv, k):
    return yp.new_empty(inv.shape[0], dtype=torch.float64 if yp.dtype == torch.float64 else torch.float32)


def _mlp_fake(xp, offsets, w_gate, w_up, w_down, act):
    n, f = xp.shape[0], w_gate.shape[1]
    return xp.new_empty(n, w_down.shape[1]), xp.new_empty(n, f), xp.new_empty(n, f)


def _mlp_bwd_fake(dy, xp, gate, up, offsets, w_gate, w_up, w_down, train_mask, act, need_dx, need_dw):
    dx = xp.new_empty(xp.shape) if need_dx else xp.new_empty(0)
    if need_dw:
        return dx, w_gate.new_empty(w_gate.shape), w_up.new_empty(w_up.shape), w_down.new_empty(w_down.shape)
    return dx, xp.new_empty(0), xp.new_empty(0), xp.new_empty(0)


def _fft_fake(x, basis):
    return x.new_empty(x.shape[0], basis.shape[1] // 2), basis.new_empty(x.shape[0], basis.shape[1])


def _fft_bwd_fake(grad, reim, basis):
    return grad.new_empty(grad.shape[0], basis.shape[0])


for _name, _fake in (("moe_permute", _permute_fake), ("moe_dispatch", _dispatch_fake),
                     ("moe_combine", _combine_fake), ("moe_combine_weight_grad", _combine_wgrad_fake),
                     ("moe_grouped_mlp", _mlp_fake), ("moe_grouped_mlp_backward", _mlp_bwd_fake),
                     ("moe_fft_features", _fft_fake), ("moe_fft_features_backward", _fft_bwd_fake)):
    _backend.register_fake(f"mmt::{_name}")(_fake)


# ---- Triton paths as custom ops (opaque to torch.compile, with the same fake kernels) --------

def _tk():
    from .triton import moe as kernels

    return kernels


@torch.library.custom_op("mmt::moe_permute_triton", mutates_args=())
def _permute_triton(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _tk().permute(expert_ids, num_experts)


@torch.library.custom_op("mmt::moe_dispatch_triton", mutates_args=())
def _dispatch_triton(x: torch.Tensor, perm: torch.Tensor, scale: torch.Tensor | None, k: int) -> torch.Tensor:
    return _tk().dispatch(x, perm, scale, k)


@torch.library.custom_op("mmt::moe_combine_triton", mutates_args=())
def _combine_triton(yp: torch.Tensor, inv: torch.Tensor, weights: torch.Tensor | None, k: int) -> torch.Tensor:
    return _tk().combine(yp, inv, weights, k)


@torch.library.custom_op("mmt::moe_combine_weight_grad_triton", mutates_args=())
def _combine_wgrad_triton(dout: torch.Tensor, yp: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
    return _tk().combine_weight_grad(dout, yp, inv, k)


@torch.library.custom_op("mmt::moe_grouped_mlp_triton", mutates_args=())
def _mlp_triton(xp: torch.Tensor, offsets: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                w_down: torch.Tensor, act: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _tk().grouped_mlp(xp, offsets, w_gate, w_up, w_down, act)


@torch.library.custom_op("mmt::moe_grouped_mlp_backward_triton", mutates_args=())
def _mlp_bwd_triton(dy: torch.Tensor, xp: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, offsets: torch.Tensor,
                    w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, train_mask: torch.Tensor | None,
                    act: int, need_dx: bool, need_dw: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _tk().grouped_mlp_backward(dy, xp, gate, up, offsets, w_gate, w_up, w_down, train_mask, act, need_dx,
                                      need_dw)


@torch.library.custom_op("mmt::moe_fft_features_triton", mutates_args=())
def _fft_triton(x: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _tk().fft_features(x, basis)


@torch.library.custom_op("mmt::moe_fft_features_backward_triton", mutates_args=())
def _fft_bwd_triton(grad: torch.Tensor, reim: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return _tk().fft_features_backward(grad, reim, basis)


for _op, _fake in ((_permute_triton, _permute_fake), (_dispatch_triton, _dispatch_fake),
                   (_combine_triton, _combine_fake), (_combine_wgrad_triton, _combine_wgrad_fake),
                   (_mlp_triton, _mlp_fake), (_mlp_bwd_triton, _mlp_bwd_fake), (_fft_triton, _fft_fake),
                   (_fft_bwd_triton, _fft_bwd_fake)):
    _op.register_fake(_fake)


# ---- reference implementations with the ops' signatures --------------------------------------

def _ref_combine_wgrad(dout, yp, inv, k):
    acc = torch.float64 if yp.dtype == torch.float64 else torch.float32
    return (dout.to(acc).repeat_interleave(k, 0) * yp[inv].to(acc)).sum(1)


def _ref_mlp_bwd(dy, xp, gate, up, offsets, w_gate, w_up, w_down, train_mask, act, need_dx, need_dw):
    # Autograd through the reference, for backends that need an op-shaped backward (tests, fallbacks).
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (xp, w_gate, w_up, w_down)]
        y = _ref.grouped_mlp(*leaves[:1], offsets, *leaves[1:], act=_act_name(act))
        grads = torch.autograd.grad(y, leaves, dy, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]
    dx, dwg, dwu, dwd = grads
    if need_dw and train_mask is not None:
        keep = train_mask.to(device=xp.device, dtype=torch.bool).view(-1, 1, 1)
        dwg, dwu, dwd = (torch.where(keep, g, torch.zeros_like(g)) for g in (dwg, dwu, dwd))
    empty = xp.new_empty(0)
    return (dx if need_dx else empty, *((dwg, dwu, dwd) if need_dw else (empty, empty, empty)))


def _ref_mlp(xp, offsets, w_gate, w_up, w_down, act):
    y = _ref.grouped_mlp(xp, offsets, w_gate, w_up, w_down, act=_act_name(act))
    g, u = xp.new_empty(xp.shape[0], w_gate.shape[1]), xp.new_empty(xp.shape[0], w_gate.shape[1])
    for e, (s, t) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        g[s:t], u[s:t] = xp[s:t] @ w_gate[e].t(), xp[s:t] @ w_up[e].t()
    return y, g, u


def _ref_fft(x, basis):
    acc = basis.dtype
    reim = x.to(acc) @ basis
    F_ = basis.shape[1] // 2
    return torch.log1p(torch.hypot(reim[:, :F_], reim[:, F_:])).to(x.dtype), reim


def _ref_fft_bwd(grad, reim, basis):
    F_ = basis.shape[1] // 2
    re, im = reim[:, :F_], reim[:, F_:]
    mag = torch.hypot(re, im)
    s = torch.where(mag > 0, grad.to(reim.dtype) / (mag * (1 + mag)).clamp_min(torch.finfo(reim.dtype).tiny), 0)
    return (torch.cat([s * re, s * im], 1) @ basis.t()).to(grad.dtype)


_REF = {
    "moe_permute": _ref.permute,
    "moe_dispatch": lambda x, perm, scale, k: _ref.dispatch(x, perm, k, scale),
    "moe_combine": lambda yp, inv, weights, k: _ref.combine(yp, inv, k, weights),
    "moe_combine_weight_grad": _ref_combine_wgrad,
    "moe_grouped_mlp": _ref_mlp,
    "moe_grouped_mlp_backward": _ref_mlp_bwd,
    "moe_fft_features": _ref_fft,
    "moe_fft_features_backward": _ref_fft_bwd,
}
_TRITON = {
    "moe_permute": _permute_triton, "moe_dispatch": _dispatch_triton, "moe_combine": _combine_triton,
    "moe_combine_weight_grad": _combine_wgrad_triton, "moe_grouped_mlp": _mlp_triton,
    "moe_grouped_mlp_backward": _mlp_bwd_triton, "moe_fft_features": _fft_triton,
    "moe_fft_features_backward": _fft_bwd_triton,
}


def _impl(name: str, which: str):
    if which in ("cpu", "cuda"):
        return getattr(torch.ops.mmt, name)
    if which == "triton":
        return _TRITON[name]
    return _REF[name]


def _act_name(act) -> str:
    if isinstance(act, str):
        if act not in ACTS:
            raise ValueError(f"unknown activation {act!r}; expected one of {sorted(ACTS)}")
        return act
    return {v: k for k, v in ACTS.items()}[int(act)]


# ---- checks ----------------------------------------------------------------------------------

def _check_float(name: str, t: torch.Tensor, op: str):
    if t.dtype not in _FLOATS:
        raise TypeError(f"{op}: {name} must be fp32, bf16 or fp16, got {t.dtype}")


def _check_2d(name: str, t: torch.Tensor, op: str):
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D [rows, d], got shape {tuple(t.shape)}")
    _check_float(name, t, op)


def _check_index(name: str, t: torch.Tensor, like: torch.Tensor, op: str, n: int | None = None):
    if t.dtype != torch.int64 or t.dim() != 1:
        raise TypeError(f"{op}: {name} must be a 1-D int64 tensor, got {t.dtype} {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device}, data on {like.device}")
    if n is not None and t.numel() != n:
        raise ValueError(f"{op}: {name} must have {n} entries, got {t.numel()}")


# ---- permute, dispatch, combine --------------------------------------------------------------

def moe_permute(expert_ids: torch.Tensor, num_experts: int, *, backend: str | None = None):
    """Stable counting sort of the slots of ``expert_ids [T, k]`` by expert: ``(perm, inv, offsets)``.

    ``perm [T*k]`` lists slots (``t*k + s``) in expert order, ``inv`` is its inverse and ``offsets [E+1]``
    the expert segment boundaries. Runs on the device without a host sync (histogram, prefix sum, scatter).
    """
    if expert_ids.dtype != torch.int64:
        raise TypeError(f"moe_permute: expert_ids must be int64, got {expert_ids.dtype}")
    if num_experts < 1:
        raise ValueError(f"moe_permute: num_experts must be >= 1, got {num_experts}")
    which = _choose("moe_permute", expert_ids.device, backend, True)
    return _impl("moe_permute", which)(expert_ids.contiguous(), num_experts)


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, perm, inv, k, which):
        ctx.save_for_backward(inv)
        ctx.k, ctx.which = k, which
        return _impl("moe_dispatch", which)(x, perm, None, k)

    @staticmethod
    def backward(ctx, dxp):
        (inv,) = ctx.saved_tensors
        # Each token's k copies come back by gathering its k rows: the combine with unit weights.
        return _impl("moe_combine", ctx.which)(dxp.contiguous(), inv, None, ctx.k), None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, yp, inv, perm, weights, k, which):
        w = None if weights is None else weights.reshape(-1).float().contiguous()
        ctx.save_for_backward(yp, inv, perm, w)
        ctx.k, ctx.which, ctx.has_w = k, which, weights is not None
        ctx.w_dtype = None if weights is None else weights.dtype
        ctx.w_shape = None if weights is None else weights.shape
        return _impl("moe_combine", which)(yp, inv, w, k)

    @staticmethod
    def backward(ctx, dout):
        yp, inv, perm, w = ctx.saved_tensors
        dout = dout.contiguous()
        dyp = dw = None
        if ctx.needs_input_grad[0]:  # dyp[j] = w[perm[j]] * dout[perm[j] // k]: a scaled dispatch
            dyp = _impl("moe_dispatch", ctx.which)(dout, perm, w, ctx.k)
        if ctx.has_w and ctx.needs_input_grad[3]:
            dw = _impl("moe_combine_weight_grad", ctx.which)(dout, yp, inv, ctx.k)
            dw = dw.to(ctx.w_dtype).view(ctx.w_shape)
        return dyp, None, None, dw, None, None


def moe_dispatch(x: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor, k: int, *,
                 backend: str | None = None) -> torch.Tensor:
    """Tokens in expert order: ``xp[j] = x[perm[j] // k]``; the backward sums each token's k rows."""
    op = "moe_dispatch"
    _check_2d("x", x, op)
    _check_index("perm", perm, x, op, x.shape[0] * k)
    _check_index("inv", inv, x, op, x.shape[0] * k)
    which = _choose(op, x.device, backend, True)
    if which == "reference":
        return _ref.dispatch(x, perm, k)
    return _Dispatch.apply(x.contiguous(), perm, inv, k, which)


def moe_combine(yp: torch.Tensor, inv: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor | None, k: int, *,
                backend: str | None = None) -> torch.Tensor:
    """Back to token order: ``out[t] = sum_s weights[t, s] * yp[inv[t*k + s]]`` (fixed order, no atomics)."""
    op = "moe_combine"
    _check_2d("yp", yp, op)
    _check_index("inv", inv, yp, op, yp.shape[0])
    _check_index("perm", perm, yp, op, yp.shape[0])
    if k < 1 or yp.shape[0] % k:
        raise ValueError(f"{op}: yp has {yp.shape[0]} rows, not a multiple of k={k}")
    if weights is not None and weights.numel() != yp.shape[0]:
        raise ValueError(f"{op}: weights must have T*k={yp.shape[0]} entries, got shape {tuple(weights.shape)}")
    which = _choose(op, yp.device, backend, True)
    if which == "reference":
        return _ref.combine(yp, inv, k, weights)
    return _Combine.apply(yp.contiguous(), inv, perm, weights, k, which)


# ---- grouped expert MLP ----------------------------------------------------------------------

class _GroupedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp, offsets, w_gate, w_up, w_down, act, train_mask, which):
        y, g, u = _impl("moe_grouped_mlp", which)(xp, offsets, w_gate, w_up, w_down, act)
        # Saved: x and the two pre-activations (act(g) * u is recomputed in the backward).
        ctx.save_for_backward(xp, g, u, offsets, w_gate, w_up, w_down, train_mask)
        ctx.act, ctx.which = act, which
        return y

    @staticmethod
    def backward(ctx, dy):
        xp, g, u, offsets, w_gate, w_up, w_down, train_mask = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_dw = any(ctx.needs_input_grad[2:5])
        dx, dwg, dwu, dwd = _impl("moe_grouped_mlp_backward", ctx.which)(
            dy.contiguous(), xp, g, u, offsets, w_gate, w_up, w_down, train_mask, ctx.act, need_dx, need_dw)
        return (dx if need_dx else None, None, *((dwg, dwu, dwd) if need_dw else (None, None, None)),
                None, None, None)


def _mask_weight_grad(w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep.view(-1, *([1] * (w.dim() - 1))), w, w.detach())


def grouped_mlp(xp: torch.Tensor, offsets: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                w_down: torch.Tensor, *, act: str = "silu", train_mask: torch.Tensor | None = None,
                backend: str | None = None) -> torch.Tensor:
    """Expert e's ``down(act(gate x) * up x)`` over rows ``offsets[e]:offsets[e+1]`` of ``xp``.

    ``w_gate, w_up: [E, f, d]``, ``w_down: [E, d, f]``. ``train_mask`` (bool [E]): experts marked False
    get zero weight gradients, and their weight-gradient GEMMs are skipped.
    """
    op = "moe_grouped_mlp"
    _check_2d("xp", xp, op)
    if w_gate.dim() != 3 or w_up.shape != w_gate.shape or w_gate.shape[2] != xp.shape[1]:
        raise ValueError(f"{op}: w_gate/w_up must be [E, f, d={xp.shape[1]}], got {tuple(w_gate.shape)} and "
                         f"{tuple(w_up.shape)}")
    E, f, d = w_gate.shape
    if tuple(w_down.shape) != (E, d, f):
        raise ValueError(f"{op}: w_down must be [E, d, f] = [{E}, {d}, {f}], got {tuple(w_down.shape)}")
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w.dtype != xp.dtype or w.device != xp.device:
            raise TypeError(f"{op}: {name} is {w.dtype} on {w.device}; xp is {xp.dtype} on {xp.device}")
    _check_index("offsets", offsets, xp, op, E + 1)
    if train_mask is not None and (train_mask.dtype != torch.bool or train_mask.numel() != E):
        raise ValueError(f"{op}: train_mask must be bool [E={E}], got {train_mask.dtype} {tuple(train_mask.shape)}")
    act = _act_name(act)
    which = _choose(op, xp.device, backend, False)
    if which == "reference":
        if train_mask is not None:
            w_gate, w_up, w_down = (_mask_weight_grad(w, train_mask) for w in (w_gate, w_up, w_down))
        return _ref.grouped_mlp(xp, offsets, w_gate, w_up, w_down, act=act)
    return _GroupedMLP.apply(xp.contiguous(), offsets, w_gate.contiguous(), w_up.contiguous(), w_down.contiguous(),
                             ACTS[act], train_mask, which)


# ---- FFT features ----------------------------------------------------------------------------

@lru_cache(maxsize=32)
def _basis(d: int, n_freq: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _ref.dft_basis(d, n_freq, dtype=dtype, device=device).contiguous()


class _FFTFeatures(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, basis, which):
        feats, reim = _impl("moe_fft_features", which)(x, basis)
        ctx.save_for_backward(reim, basis)
        ctx.which = which
        return feats

    @staticmethod
    def backward(ctx, grad):
        reim, basis = ctx.saved_tensors
        return _impl("moe_fft_features_backward", ctx.which)(grad.contiguous(), reim, basis), None, None


def fft_features(x: torch.Tensor, n_freq: int, *, backend: str | None = None) -> torch.Tensor:
    """``log1p(|rfft(x)|)[..., :n_freq]`` over the last dim, as a DFT GEMM; differentiable (subgradient 0 at |X|=0)."""
    op = "moe_fft_features"
    _check_float("x", x, op)
    d = x.shape[-1]
    if not 1 <= n_freq <= d // 2 + 1:
        raise ValueError(f"{op}: n_freq must be in [1, d//2+1 = {d // 2 + 1}] for hidden size d={d}, got {n_freq}")
    which = _choose(op, x.device, backend, False)
    if which == "reference":
        return _ref.fft_features(x, n_freq)
    lead = x.shape[:-1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if which == "triton" and acc == torch.float64:
        raise TypeError(f"{op}: the triton backend takes fp32/bf16/fp16, got fp64")
    basis = _basis(d, n_freq, acc, x.device)
    out = _FFTFeatures.apply(x.reshape(-1, d).contiguous(), basis, which)
    return out.reshape(*lead, n_freq)


# ---- routing and the whole layer -------------------------------------------------------------

route = _ref.route  # routing is a handful of small torch ops (topk, softmax); the same on every backend


@dataclass
class MoEOutput:
    out: torch.Tensor          # [T, d]
    aux_loss: torch.Tensor     # load balancing, unweighted (1.0 when perfectly balanced)
    z_loss: torch.Tensor       # mean squared router logsumexp, unweighted
    expert_ids: torch.Tensor   # [T, k]
    weights: torch.Tensor      # [T, k] combine weights (before `scale`)
    counts: torch.Tensor       # [E] tokens per expert (slots), on the device


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
        xp = _impl("moe_dispatch", which)(x, perm, None, k)
        yp, g, u = _impl("moe_grouped_mlp", which)(xp, offsets, w_gate, w_up, w_down, act)
        del xp
        out = _impl("moe_combine", which)(yp, inv, w, k)
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
            dw_comb = _impl("moe_combine_weight_grad", which)(dout, ctx.yp, inv, k)
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
            dxc, dwg, dwu, dwd = _impl("moe_grouped_mlp_backward", which)(
                dy, xp, g[lo:hi], u[lo:hi], offsets[e0:e1 + 1] - lo, w_gate[e0:e1], w_up[e0:e1], w_down[e0:e1],
                None if train_mask is None else train_mask[e0:e1], act, need_dx, need_dw)
            del dy, xp
            if need_dw:
                for t, c in zip(dws, (dwg, dwu, dwd)):
                    t[e0:e1].copy_(c)
            del dwg, dwu, dwd
            if need_dx:
                dx.index_add_(0, tok, dxc.to(acc))
            del dxc
            e0 = e1
        return (None if dx is None else dx.to(x.dtype), dw_comb, *(dws if need_dw else (None, None, None)),
                None, None, None, None, None, None, None, None)


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
    return (wanted and all(w == "cpu" for w in which_ops) and x.device.type == "cpu" and torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


def moe_ffn(x: torch.Tensor, router_logits: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
            w_down: torch.Tensor, *, k: int = 2, act: str = "silu", expert_mask: torch.Tensor | None = None,
            train_mask: torch.Tensor | None = None, scale: float = 1.0, backend: str | None = None,
            n_active: int | None = None, low_memory: bool | str | None = None) -> MoEOutput:
    """Dropless top-k MoE FFN over tokens ``x [T, d]``: route, permute, dispatch, grouped MLP, combine.

    ``expert_mask`` (bool [E]) restricts routing to the allowed experts; ``train_mask`` (bool [E]) skips
    weight gradients of frozen experts; ``scale`` multiplies the combine weights.

    On CPU with the C++ ops, when a gradient is needed (and not under ``torch.compile``), dispatch, grouped
    MLP and combine run as one autograd node (:class:`_FusedMoE`) whose backward works expert chunk by
    chunk, so no ``[T*k, d]`` tensor besides ``yp`` (freed early in the backward) outlives the forward.
    ``low_memory=True|False`` (or ``mmt_kernels.moe.LOW_MEMORY_CPU``; default ``"auto"``: only when
    ``k * d > f``) forces the chunked or the faster three-node path.
    """
    if x.dim() != 2 or router_logits.shape != (x.shape[0], w_gate.shape[0]):
        raise ValueError(f"moe_ffn: expected x [T, d] and router_logits [T, E={w_gate.shape[0]}], got "
                         f"{tuple(x.shape)} and {tuple(router_logits.shape)}")
    E = w_gate.shape[0]
    weights, ids, aux, z = route(router_logits, k, expert_mask, n_active)
    perm, inv, offsets = moe_permute(ids, E, backend=backend)
    w = weights * scale if scale != 1.0 else weights
    which_ops = [_choose(op, x.device, backend, ck) for op, ck in (("moe_dispatch", True), ("moe_combine", True),
                                                                   ("moe_grouped_mlp", False))]
    if (_fused_cpu_ok(x, which_ops, low_memory, k, w_gate.shape[1]) and x.dtype == w_gate.dtype == w_up.dtype == w_down.dtype
            and w_gate.dim() == 3 and w_gate.shape[2] == x.shape[1] and w_up.shape == w_gate.shape
            and tuple(w_down.shape) == (E, x.shape[1], w_gate.shape[1])
            and (train_mask is None or (train_mask.dtype == torch.bool and train_mask.numel() == E))
            and any(t.requires_grad for t in (x, w, w_gate, w_up, w_down))):
        n = x.shape[0] * k
        out = _FusedMoE.apply(x.contiguous(), w.reshape(-1).float().contiguous(), w_gate.contiguous(),
                              w_up.contiguous(), w_down.contiguous(), perm, inv, offsets, train_mask, k,
                              ACTS[_act_name(act)], which_ops[2], max(256, -(-n // 16)))
        return MoEOutput(out, aux, z, ids, weights, offsets[1:] - offsets[:-1])
    xp = moe_dispatch(x, perm, inv, k, backend=backend)
    yp = grouped_mlp(xp, offsets, w_gate, w_up, w_down, act=act, train_mask=train_mask, backend=backend)
    out = moe_combine(yp, inv, perm, w.reshape(-1), k, backend=backend)
    return MoEOutput(out, aux, z, ids, weights, offsets[1:] - offsets[:-1])


class MoEFFN(nn.Module):
    """A dropless top-k MoE FFN with an FFT-feature router, a drop-in replacement for a decoder MLP.

    Router: ``logits = W_r [x ; W_f f(x)]`` (``router_input="concat"``) or ``W_r (x + W_f f(x))``
    (``"sum"``, needs ``fft_proj_dim == d``), with ``f(x) = log1p|rfft(x)|[:n_freq]`` (``n_freq=0``: no FFT
    features). ``forward`` returns the output only (it must fit the MLP slot of a decoder layer); the
    auxiliary losses of the last call are in ``last_aux_loss`` / ``last_z_loss`` and per-expert loads
    accumulate in ``load_counts`` while ``track_load`` is set.
    """

    def __init__(self, d_model: int, d_expert: int, num_experts: int, *, k: int = 2, act: str = "silu",
                 n_freq: int = 64, fft_proj_dim: int | None = None, router_input: str = "concat",
                 fft_layernorm: bool = False, scale: float = 1.0, dtype: torch.dtype | None = None,
                 device=None, backend: str | None = None):
        super().__init__()
        if router_input not in ("concat", "sum"):
            raise ValueError(f"MoEFFN: router_input must be 'concat' or 'sum', got {router_input!r}")
        if not 1 <= k <= num_experts:
            raise ValueError(f"MoEFFN: k={k} must be in [1, num_experts={num_experts}]")
        _act_name(act)
        if n_freq < 0 or n_freq > d_model // 2 + 1:
            raise ValueError(f"MoEFFN: n_freq must be in [0, d//2+1 = {d_model // 2 + 1}], got {n_freq}")
        fft_proj_dim = (d_model if router_input == "sum" else n_freq) if fft_proj_dim is None else fft_proj_dim
        if router_input == "sum" and fft_proj_dim != d_model:
            raise ValueError("MoEFFN: router_input='sum' needs fft_proj_dim == d_model")
        fk = dict(dtype=dtype, device=device)
        self.d_model, self.d_expert, self.num_experts = d_model, d_expert, num_experts
        self.k, self.act, self.n_freq, self.router_input = k, act, n_freq, router_input
        self.scale, self.backend = scale, backend
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_expert, d_model, **fk))
        self.w_up = nn.Parameter(torch.empty(num_experts, d_expert, d_model, **fk))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_model, d_expert, **fk))
        self.fft_proj = nn.Linear(n_freq, fft_proj_dim, bias=False, **fk) if n_freq else None
        self.fft_norm = nn.LayerNorm(n_freq, **fk) if (n_freq and fft_layernorm) else None
        router_in = d_model + (fft_proj_dim if (n_freq and router_input == "concat") else 0)
        self.router = nn.Linear(router_in, num_experts, bias=False, **fk)
        self.register_buffer("expert_mask", torch.ones(num_experts, dtype=torch.bool, device=device))
        self.register_buffer("train_mask", torch.ones(num_experts, dtype=torch.bool, device=device))
        self.register_buffer("load_counts", torch.zeros(num_experts, dtype=torch.float64, device=device),
                             persistent=False)
        self.track_load = False
        # Grouped routing (optional): experts [0, group_split) and [group_split, E) are routed separately,
        # top-k inside the first group and top-k_second inside the second, outputs summed (the second
        # group's combine weights multiplied by scale_second). None: one top-k over all allowed experts.
        self.group_split: int | None = None
        self.k_second: int = k
        self.scale_second: float = 1.0
        self._mask_state = (num_experts, True)  # (allowed experts, all experts train): host-side copies
        self._group_state = ((0, 0, 0), (0, 0, 0))  # set by set_groups / set_masks
        self.register_load_state_dict_post_hook(lambda module, _keys: module.set_masks())
        self.last_aux_loss: torch.Tensor | None = None
        self.last_z_loss: torch.Tensor | None = None
        self.reset_parameters()

    def set_masks(self, expert_mask: torch.Tensor | None = None, train_mask: torch.Tensor | None = None) -> None:
        """Set which experts may be routed to and which train (bool [E] each; None keeps the current one).

        Host-side summaries are cached here so that ``forward`` never reads the masks back from a GPU.
        """
        with torch.no_grad():
            if expert_mask is not None:
                self.expert_mask.copy_(expert_mask)
            if train_mask is not None:
                self.train_mask.copy_(train_mask)
        n_allowed = int(self.expert_mask.sum())
        if n_allowed < self.k:
            raise ValueError(f"MoEFFN: {n_allowed} allowed experts is fewer than k={self.k}")
        self._mask_state = (n_allowed, bool(self.train_mask.all()))
        G = self.group_split
        if G is not None:
            em, tm = self.expert_mask.cpu(), self.train_mask.cpu()
            # per group: (allowed experts, experts that train, group size)
            self._group_state = tuple((int(em[lo:hi].sum()), int(tm[lo:hi].sum()), hi - lo)
                                      for lo, hi in ((0, G), (G, self.num_experts)))
            (n1, _, _), (n2, _, _) = self._group_state
            if (n1 and n1 < self.k) or (n2 and n2 < self.k_second) or not (n1 or n2):
                raise ValueError("MoEFFN: grouped routing needs at least k allowed experts in each enabled group")

    def set_groups(self, split: int, k_second: int, scale_second: float = 1.0) -> None:
        """Route experts ``[0, split)`` (top-``k``) and ``[split, E)`` (top-``k_second``) separately."""
        if not 1 <= split < self.num_experts or not 1 <= self.k <= split or not 1 <= k_second <= self.num_experts - split:
            raise ValueError(f"MoEFFN.set_groups: need 1 <= k={self.k} <= split={split} and 1 <= k_second={k_second} "
                             f"<= {self.num_experts - split}")
        self.group_split, self.k_second, self.scale_second = split, k_second, scale_second
        self.set_masks()

    def reset_parameters(self) -> None:
        for w, fan_in in ((self.w_gate, self.d_model), (self.w_up, self.d_model), (self.w_down, self.d_expert)):
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))  # nn.Linear's default range
        nn.init.normal_(self.router.weight, std=0.02)
        if self.fft_proj is not None:
            nn.init.normal_(self.fft_proj.weight, std=0.02)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 router logits ``[T, E]`` for tokens ``x [T, d]``."""
        z = x
        if self.n_freq:
            f = fft_features(x, self.n_freq, backend=self.backend)
            if self.fft_norm is not None:
                f = self.fft_norm(f)
            pf = self.fft_proj(f)
            z = torch.cat([x, pf], dim=-1) if self.router_input == "concat" else x + pf
        return F.linear(z.float(), self.router.weight.float())

    def _forward_grouped(self, x: torch.Tensor) -> MoEOutput:
        G, E = self.group_split, self.num_experts
        (n1, t1, s1), (n2, t2, s2) = self._group_state
        logits = self.router_logits(x)
        parts = []
        for lo, hi, k, scale, n_on, n_tr in ((0, G, self.k, self.scale, n1, t1),
                                             (G, E, self.k_second, self.scale_second, n2, t2)):
            if not n_on:
                continue
            ws = [w[lo:hi] if n_tr else w[lo:hi].detach() for w in (self.w_gate, self.w_up, self.w_down)]
            res = moe_ffn(x, logits[:, lo:hi], *ws, k=k, act=self.act,
                          expert_mask=None if n_on == hi - lo else self.expert_mask[lo:hi],
                          train_mask=None if n_tr in (0, hi - lo) else self.train_mask[lo:hi], scale=scale,
                          backend=self.backend, n_active=n_on)
            parts.append((lo, hi, res))
        out = parts[0][2].out
        for _, _, r in parts[1:]:
            out = out + r.out
        counts = torch.zeros(E, dtype=parts[0][2].counts.dtype, device=x.device)
        for lo, hi, r in parts:
            counts[lo:hi] = r.counts
        aux = sum(r.aux_loss for _, _, r in parts) / len(parts)
        z = sum(r.z_loss for _, _, r in parts)
        ids = torch.cat([r.expert_ids + lo for lo, _, r in parts], 1)
        weights = torch.cat([r.weights for _, _, r in parts], 1)
        return MoEOutput(out, aux, z, ids, weights, counts)

    def forward_with_aux(self, hidden: torch.Tensor) -> MoEOutput:
        x = hidden.reshape(-1, self.d_model)
        if self.group_split is not None:
            res = self._forward_grouped(x)
            self.last_aux_loss, self.last_z_loss = res.aux_loss, res.z_loss
            if self.track_load:
                self.load_counts += res.counts.detach().to(self.load_counts)
            return res
        n_allowed, all_train = self._mask_state
        res = moe_ffn(x, self.router_logits(x), self.w_gate, self.w_up, self.w_down, k=self.k, act=self.act,
                      expert_mask=None if n_allowed == self.num_experts else self.expert_mask,
                      train_mask=None if all_train else self.train_mask, scale=self.scale,
                      backend=self.backend, n_active=n_allowed)
        self.last_aux_loss, self.last_z_loss = res.aux_loss, res.z_loss
        if self.track_load:
            self.load_counts += res.counts.detach().to(self.load_counts)
        return res

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        res = self.forward_with_aux(hidden)
        return res.out.reshape(hidden.shape)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_expert={self.d_expert}, num_experts={self.num_experts}, k={self.k}, "
                f"act={self.act}, n_freq={self.n_freq}, router_input={self.router_input}, scale={self.scale}")

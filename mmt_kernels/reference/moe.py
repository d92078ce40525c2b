"""Reference for family 2: FFT-routed top-k MoE. Plain PyTorch, written to be read; the kernels are
tested against it. Every function computes in fp64 when given fp64 inputs (the tests' golden result)
and in fp32 otherwise, rounding to the input dtype only where a kernel would store a tensor.

Layout conventions shared with the kernels:

* routing: ``ids [T, k]`` expert ids, ``weights [T, k]`` combine weights; slot ``t*k + s`` is the
  s-th choice of token t;
* permutation: ``perm [T*k]`` lists slots in expert order (stable: slots of one expert keep token
  order), ``inv [T*k]`` is its inverse (``perm[inv[i]] == i``), ``offsets [E+1]`` are the segment
  boundaries of each expert in the permuted order;
* experts: ``w_gate, w_up [E, f, d]``, ``w_down [E, d, f]`` (``nn.Linear`` layout per expert),
  ``act`` is ``"silu"`` (Llama, Qwen2) or ``"gelu_tanh"`` (Gemma 3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTS = ("silu", "gelu_tanh")


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def activation(g: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(g)
    if act == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTS}")


# ---- FFT router features --------------------------------------------------------------------


def fft_features(x: torch.Tensor, n_freq: int) -> torch.Tensor:
    """Per token, ``log1p(|rfft(x)|)`` over the last (hidden) dim, keeping the ``n_freq`` lowest bins."""
    spec = torch.fft.rfft(x.to(_acc(x)), dim=-1)[..., :n_freq]
    return torch.log1p(spec.abs()).to(x.dtype)


def dft_basis(d: int, n_freq: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """``[d, 2F]``: columns ``cos(2 pi j k / d)`` then ``-sin(...)``, so ``x @ basis = [Re, Im] of rfft(x)``.

    Angles are reduced modulo d in integer arithmetic and evaluated in fp64, so the basis is exact to
    the storage dtype even for large d.
    """
    j = torch.arange(d, dtype=torch.int64)
    k = torch.arange(n_freq, dtype=torch.int64)
    ang = (j[:, None] * k[None, :]) % d
    theta = ang.double() * (2.0 * math.pi / d)
    return torch.cat([torch.cos(theta), -torch.sin(theta)], dim=1).to(dtype=dtype, device=device)


# ---- routing --------------------------------------------------------------------------------


def route(logits: torch.Tensor, k: int, expert_mask: torch.Tensor | None = None, n_active: int | None = None):
    """Top-k routing. Returns ``(weights [T,k], ids [T,k], aux_loss, z_loss)``.

    ``weights`` is the softmax over the k selected logits (Mixtral); ``expert_mask`` (bool [E]) keeps
    only the allowed experts (others get -inf). ``aux_loss = E_active * sum_e f_e * P_e`` with f_e the
    fraction of slots routed to e and P_e the mean router probability (Switch / Mixtral; 1.0 for a
    perfectly balanced router); ``z_loss = mean_t logsumexp(logits_t)^2`` (ST-MoE). Neither is scaled
    by a loss weight here: the caller chooses the weights. ``n_active`` (the number of allowed experts)
    spares a device-to-host read of ``expert_mask.sum()`` when the caller knows it.
    """
    logits = logits.to(_acc(logits))
    E = logits.shape[-1]
    if n_active is None:
        n_active = E if expert_mask is None else int(expert_mask.sum())
    if not 1 <= k <= n_active:
        raise ValueError(f"route: k={k} must be between 1 and the number of allowed experts ({n_active})")
    if expert_mask is not None:
        logits = logits.masked_fill(~expert_mask.to(device=logits.device, dtype=torch.bool), float("-inf"))
    top, ids = logits.topk(k, dim=-1)
    weights = torch.softmax(top, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    T = logits.shape[0]
    if T == 0:
        zero = logits.sum() * 0
        return weights, ids, zero, zero
    frac = (
        torch.zeros(E, dtype=logits.dtype, device=logits.device).index_add_(
            0, ids.reshape(-1), torch.ones(ids.numel(), dtype=logits.dtype, device=logits.device)
        )
        / ids.numel()
    )
    aux = n_active * (frac * probs.mean(0)).sum()
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return weights, ids, aux, z


# ---- permutation, dispatch, combine ---------------------------------------------------------


def permute(ids: torch.Tensor, num_experts: int):
    """``(perm, inv, offsets)`` for ``ids [T, k]``: a stable sort of the slots by expert id."""
    flat = ids.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise ValueError(f"permute: expert ids must lie in [0, {num_experts})")
    perm = torch.sort(flat, stable=True).indices
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return perm, inv, offsets


def dispatch(x: torch.Tensor, perm: torch.Tensor, k: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens in expert order: ``xp[j] = x[perm[j] // k] (* scale.flatten()[perm[j]])``."""
    xp = x[perm // k]
    if scale is not None:
        xp = (xp.to(_acc(x)) * scale.reshape(-1)[perm].to(_acc(x)).unsqueeze(1)).to(x.dtype)
    return xp


def combine(yp: torch.Tensor, inv: torch.Tensor, k: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Back to token order: ``out[t] = sum_s weights[t, s] * yp[inv[t*k + s]]`` (fp32 accumulation)."""
    T = inv.numel() // k
    rows = yp[inv].to(_acc(yp)).view(T, k, yp.shape[1])
    if weights is not None:
        rows = rows * weights.to(_acc(yp)).view(T, k, 1)
    return rows.sum(1).to(yp.dtype)


# ---- grouped expert MLP ---------------------------------------------------------------------


def grouped_mlp(
    xp: torch.Tensor,
    offsets: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    act: str = "silu",
) -> torch.Tensor:
    """Expert e's SwiGLU over its segment ``xp[offsets[e]:offsets[e+1]]``: ``down(act(gate x) * up x)``."""
    y = xp.new_zeros(xp.shape[0], w_down.shape[1])
    bounds = offsets.tolist()
    for e in range(w_gate.shape[0]):
        s, t = bounds[e], bounds[e + 1]
        if t > s:
            xe = xp[s:t]
            h = activation(xe @ w_gate[e].t(), act) * (xe @ w_up[e].t())
            y[s:t] = h @ w_down[e].t()
    return y


def moe_ffn(
    x: torch.Tensor,
    logits: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    k: int = 2,
    act: str = "silu",
    expert_mask: torch.Tensor | None = None,
    scale: float = 1.0,
):
    """The whole MoE FFN as Hugging Face's Mixtral block writes it: a loop over the hit experts with
    ``index_add_``. Returns ``(out [T, d], aux_loss, z_loss)``. ``scale`` multiplies the combine weights."""
    weights, ids, aux, z = route(logits, k, expert_mask)
    weights = (weights * scale).to(x.dtype)
    out = torch.zeros_like(x)
    hit = F.one_hot(ids, w_gate.shape[0]).permute(2, 1, 0)  # [E, k, T]
    for e in range(w_gate.shape[0]):
        slot, tok = torch.where(hit[e])
        if tok.numel() == 0:
            continue
        xe = x[tok]
        h = activation(xe @ w_gate[e].t(), act) * (xe @ w_up[e].t())
        out.index_add_(0, tok, (h @ w_down[e].t()) * weights[tok, slot, None])
    return out, aux, z

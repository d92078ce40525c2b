"""Fused linear + cross-entropy: the loss of ``hidden @ weight.T`` without ever building the full logits.

Large multilingual vocabularies (Gemma 3: 262k tokens) make the ``[tokens, vocab]`` logits and their gradient
most of a training step's memory. :func:`linear_cross_entropy` walks the tokens in chunks: each chunk's logits
are turned into their gradient in place (one fused pass, op ``cross_entropy_grad_``) and multiplied into the
hidden and weight gradients, either in the forward (default: the unfused loss's flops) or, with
``recompute=True``, in the backward after recomputing the chunk (less memory held between the passes, one more
product). Callers gather the positions that carry a loss first (:func:`gather_loss_positions`), so ignored
positions cost nothing.

Two row-wise ops do the softmax work on a chunk of logits (fp32/bf16/fp16 in, fp32 math):

- ``cross_entropy_lse(logits, target, ignore_index, softcap) -> (loss, lse)``
- ``cross_entropy_grad_(logits!, target, lse, grad_loss, ignore_index, softcap)``
"""

from __future__ import annotations

import torch

from ._registry import OpSpec, register
from .reference import loss as _ref

__all__ = [
    "cross_entropy_grad_",
    "cross_entropy_lse",
    "default_chunk_rows",
    "gather_loss_positions",
    "linear_cross_entropy",
]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _lse_fake(logits, target, ignore_index, softcap):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


CE_LSE = register(
    OpSpec(
        name="cross_entropy_lse",
        schema="(Tensor logits, Tensor target, int ignore_index, float softcap) -> (Tensor loss, Tensor lse)",
        reference=_ref.cross_entropy_lse,
        fake=_lse_fake,
        triton="loss:cross_entropy_lse",
        cuda=False,
    )
)

CE_GRAD = register(
    OpSpec(
        name="cross_entropy_grad_",
        schema="(Tensor(a!) logits, Tensor target, Tensor lse, Tensor grad_loss, "
        "int ignore_index, float softcap) -> ()",
        reference=_ref.cross_entropy_grad_,
        fake=lambda *a: None,
        triton="loss:cross_entropy_grad_",
        cuda=False,
    )
)


def _check_rows(name, logits, target, lse=None, grad_loss=None):
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"{name}: logits must be [N, V] with V >= 1, got shape {tuple(logits.shape)}")
    if logits.dtype not in _DTYPES:
        raise TypeError(f"{name}: logits dtype must be fp32, bf16, fp16 or fp64, got {logits.dtype}")
    if target.dtype != torch.int64 or target.shape != (logits.shape[0],):
        raise ValueError(f"{name}: target must be int64 [{logits.shape[0]}], got {target.dtype} {tuple(target.shape)}")
    for what, t in (("lse", lse), ("grad_loss", grad_loss)):
        if t is not None and (t.dtype != torch.float32 or t.shape != (logits.shape[0],)):
            raise ValueError(f"{name}: {what} must be fp32 [{logits.shape[0]}], got {t.dtype} {tuple(t.shape)}")
    for what, t in (("target", target), ("lse", lse), ("grad_loss", grad_loss)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"{name}: {what} is on {t.device}, logits on {logits.device}")


def cross_entropy_lse(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy and log-sum-exp (fp32 [N] each; 0 on rows whose target is ``ignore_index``).

    Targets outside ``[0, V)`` other than ``ignore_index`` are an error of the caller (not checked per row on
    the device, which would synchronise)."""
    _check_rows("cross_entropy_lse", logits, target)
    which = CE_LSE.choose(logits.device, backend, logits.dtype)
    return CE_LSE(which, logits.contiguous(), target.contiguous(), int(ignore_index), float(softcap or 0.0))


def cross_entropy_grad_(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    backend: str | None = None,
) -> None:
    """Overwrite contiguous ``logits`` with ``grad_loss[r] * d loss[r] / d logits[r]``."""
    _check_rows("cross_entropy_grad_", logits, target, lse, grad_loss)
    if not logits.is_contiguous():
        raise ValueError("cross_entropy_grad_: logits must be contiguous (it is overwritten in place)")
    which = CE_GRAD.choose(logits.device, backend, logits.dtype)
    CE_GRAD(
        which,
        logits,
        target.contiguous(),
        lse.contiguous(),
        grad_loss.contiguous(),
        int(ignore_index),
        float(softcap or 0.0),
    )


def default_chunk_rows(vocab: int, dtype: torch.dtype, budget_bytes: int = 64 << 20) -> int:
    """Rows per chunk so that one chunk of logits takes about ``budget_bytes`` (at least 16 rows)."""
    return max(16, budget_bytes // max(1, vocab * torch.empty((), dtype=dtype).element_size()))


def _chunk_grads(hidden, weight, target, lse, grad_rows, ignore_index, softcap, chunk, backend, need_h, need_w):
    """Recompute each chunk's logits, turn them into their gradient in place, multiply into dh and dW."""
    n = hidden.shape[0]
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        g = hidden[s:e] @ weight.t()
        cross_entropy_grad_(
            g, target[s:e], lse[s:e], grad_rows[: e - s], ignore_index=ignore_index, softcap=softcap, backend=backend
        )
        if need_h:
            torch.mm(g, weight, out=grad_h[s:e])
        if need_w and grad_w.dtype == g.dtype:
            grad_w.addmm_(g.t(), hidden[s:e])  # in place: no [V, H] temporary per chunk
        elif need_w:
            grad_w += (g.t() @ hidden[s:e]).float()
    return grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """Two schedules. ``recompute=False`` (default): each chunk's gradient is computed in the forward, while its
    logits are at hand, and kept ([N, H] and, if the weight trains, [V, H]) until the backward scales it: the
    flops of the unfused loss. ``recompute=True``: the forward keeps only each row's log-sum-exp and the
    backward recomputes the logits: one more [N, H] x [H, V] product, no gradient held between the passes."""

    @staticmethod
    def forward(ctx, hidden, weight, target, ignore_index, softcap, chunk, backend, recompute):
        n = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        lse = hidden.new_empty(n, dtype=torch.float32)
        loss = hidden.new_zeros((), dtype=torch.float32)
        eager = (need_h or need_w) and not recompute
        if eager:
            ones = hidden.new_ones(min(n, chunk), dtype=torch.float32)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            logits = hidden[s:e] @ weight.t()
            row_loss, lse[s:e] = cross_entropy_lse(
                logits, target[s:e], ignore_index=ignore_index, softcap=softcap, backend=backend
            )
            loss += row_loss.sum()
            if eager:
                cross_entropy_grad_(
                    logits,
                    target[s:e],
                    lse[s:e],
                    ones[: e - s],
                    ignore_index=ignore_index,
                    softcap=softcap,
                    backend=backend,
                )
                if need_h:
                    torch.mm(logits, weight, out=grad_h[s:e])
                if need_w and grad_w.dtype == logits.dtype:
                    grad_w.addmm_(logits.t(), hidden[s:e])  # in place: no [V, H] temporary per chunk
                elif need_w:
                    grad_w += (logits.t() @ hidden[s:e]).float()
        ctx.args = (ignore_index, softcap, chunk, backend)
        ctx.eager, ctx.weight_dtype = eager, weight.dtype
        if eager:
            ctx.grads = (grad_h, grad_w)
        else:
            ctx.save_for_backward(hidden, weight, target, lse)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.eager:
            grad_h, grad_w = ctx.grads
            ctx.grads = None
            scale = grad_out.float()
            grad_h = grad_h.mul_(scale.to(grad_h.dtype)) if need_h else None
            grad_w = grad_w.mul_(scale) if need_w else None
            wdtype = ctx.weight_dtype
        else:
            hidden, weight, target, lse = ctx.saved_tensors
            ignore_index, softcap, chunk, backend = ctx.args
            grad_rows = grad_out.float().expand(min(hidden.shape[0], chunk)).contiguous()
            grad_h, grad_w = _chunk_grads(
                hidden, weight, target, lse, grad_rows, ignore_index, softcap, chunk, backend, need_h, need_w
            )
            wdtype = weight.dtype
        if need_w:
            grad_w = grad_w.to(wdtype)
        return grad_h, grad_w, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "sum",
    chunk_rows: int | None = None,
    recompute: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` (hidden ``[N, H]``, weight ``[V, H]``) against ``target`` ``[N]``.

    ``reduction``: ``"sum"`` or ``"mean"`` (over rows whose target is not ``ignore_index``). Under autocast
    the inputs are cast to the autocast dtype, as ``F.linear`` would be. Differentiable in ``hidden`` and
    ``weight``; the full ``[N, V]`` logits never exist (``chunk_rows`` rows at a time). ``recompute``: keep
    nothing but the log-sum-exp between forward and backward, at the cost of recomputing the logits
    (see ``_LinearCrossEntropy``).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden [N, H] and weight [V, H] expected, got "
            f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("linear_cross_entropy: weight has an empty vocabulary")
    if target.shape != (hidden.shape[0],) or target.dtype != torch.int64:
        raise ValueError(
            f"linear_cross_entropy: target must be int64 [{hidden.shape[0]}], got {target.dtype} {tuple(target.shape)}"
        )
    if hidden.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise TypeError(
            f"linear_cross_entropy: hidden/weight dtype must be floating, got {hidden.dtype}, {weight.dtype}"
        )
    if hidden.device != weight.device or target.device != hidden.device:
        raise ValueError(
            f"linear_cross_entropy: hidden on {hidden.device}, weight on {weight.device}, target on {target.device}"
        )
    if reduction not in ("sum", "mean"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'sum' or 'mean', got {reduction!r}")
    if softcap is not None and softcap < 0:
        raise ValueError(f"linear_cross_entropy: softcap must be positive or None, got {softcap}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        raise TypeError(
            f"linear_cross_entropy: hidden is {hidden.dtype}, weight {weight.dtype} (outside autocast they must match)"
        )
    # 512 MiB of logits per chunk (512 rows at a 262k vocabulary in fp32): each chunk's two products read the
    # whole [V, H] weight (and a trained one takes a [V, H] update), so rows per chunk set the products' arithmetic
    # intensity; 64 rows left the fp32 loss 1.5x slower than the unfused one on CPU, 512 rows match it (256: 1.04x),
    # at 16.5% of the unfused loss's peak memory at 2048 x 262144 (bench/results/cpu-x86_64-2cores-fused-loss.md)
    chunk = int(chunk_rows or default_chunk_rows(weight.shape[0], hidden.dtype, 512 << 20))
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk}")
    with torch.autocast(device_type, enabled=False):
        loss = _LinearCrossEntropy.apply(
            hidden, weight, target, int(ignore_index), float(softcap or 0.0), chunk, backend, bool(recompute)
        )
    if reduction == "mean":
        loss = loss / (target != ignore_index).sum().clamp_min(1)
    return loss


def gather_loss_positions(
    hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token pairs that carry a loss: ``hidden[:, t]`` predicts ``labels[:, t + 1]``.

    Returns ``(hidden_rows [M, H], targets [M])`` for the M positions whose next label is not ``ignore_index``.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"gather_loss_positions: hidden [B, T, H] and labels [B, T] expected, got "
            f"{tuple(hidden.shape)} and {tuple(labels.shape)}"
        )
    nxt = labels[:, 1:]
    keep = nxt != ignore_index
    return hidden[:, :-1][keep], nxt[keep]

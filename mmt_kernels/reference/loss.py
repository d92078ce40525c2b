"""Reference for the fused linear + cross-entropy loss: plain PyTorch on full logits (the specification).

Logits ``z = softcap * tanh(l / softcap)`` when ``softcap > 0`` (Gemma 2's final-logit capping), else ``z = l``.
Rows whose target is ``ignore_index`` have zero loss and zero gradient; their ``lse`` is 0.
"""

from __future__ import annotations

import torch


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()  # fp32 math; fp64 stays fp64 (the tests' golden mode)


def _capped(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    z = _wide(logits)
    return softcap * torch.tanh(z / softcap) if softcap > 0 else z


def cross_entropy_lse(logits, target, ignore_index: int, softcap: float):
    """Per-row loss ``lse(z) - z[target]`` and ``lse(z)`` (fp32 [N]; fp64 for fp64 logits); 0 on ignored rows."""
    z = _capped(logits, softcap)
    keep = target != ignore_index
    lse = torch.logsumexp(z, dim=-1) if z.shape[-1] else z.new_zeros(z.shape[0])
    picked = z.gather(1, torch.where(keep, target, 0).unsqueeze(1)).squeeze(1) if z.shape[1] else lse
    zero = torch.zeros_like(lse)
    return torch.where(keep, lse - picked, zero), torch.where(keep, lse, zero)


def cross_entropy_grad_(logits, target, lse, grad_loss, ignore_index: int, softcap: float) -> None:
    """In place: ``logits <- grad_loss[r] * d loss[r] / d logits`` (softmax minus one-hot, through the cap)."""
    l32 = _wide(logits)
    z = _capped(l32, softcap)
    keep = target != ignore_index
    g = torch.exp(z - lse.unsqueeze(1))
    g.scatter_add_(1, torch.where(keep, target, 0).unsqueeze(1), -torch.ones_like(g[:, :1]))
    if softcap > 0:
        g = g * (1 - torch.tanh(l32 / softcap) ** 2)
    g = torch.where(keep.unsqueeze(1), g * grad_loss.to(g.dtype).unsqueeze(1), 0.0)  # ignored rows: exactly 0
    logits.copy_(g.to(logits.dtype))


def linear_cross_entropy(hidden, weight, target, ignore_index: int = -100, softcap: float = 0.0):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``target`` (autograd through full logits)."""
    z = _capped(hidden @ weight.t(), softcap)
    return torch.nn.functional.cross_entropy(z, target, ignore_index=ignore_index, reduction="sum")

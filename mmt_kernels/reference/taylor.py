"""Reference for the Taylor importance accumulator (LANDeRMT neuron detection; docs/kernels.md)."""

from __future__ import annotations

import torch


def taylor_accumulate_(acc: torch.Tensor, act: torch.Tensor, grad: torch.Tensor, token_weight: torch.Tensor) -> None:
    """``acc[j] += sum_t token_weight[t] * |act[t, j] * grad[t, j]|`` in place; act/grad are [N, M].

    With ``token_weight[t] = 1 / len(sequence of t)`` (0 on padding) this adds, per sequence, the mean over its
    tokens of ``|a * dL/da|``: the first-order Taylor estimate of the loss change when neuron j is zeroed.
    Computes in fp64 when given fp64 inputs (the golden result of the tests), else in fp32.
    """
    work = torch.float64 if act.dtype == torch.float64 else torch.float32
    contrib = (act.to(work) * grad.to(work)).abs() * token_weight.to(work).unsqueeze(1)
    acc += contrib.sum(0).to(acc.dtype)


def token_weights(
    *,
    attention_mask: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """fp32 per-token weights ``1/len(seq)`` (0 on padding), flattened in token order.

    Exactly one of: ``attention_mask`` [B, T] (any padding side), ``lengths`` [B] (right padding, T from ``shape``
    [B, T]), ``offsets`` [S+1] (packed sequences, N = offsets[-1]); or only ``shape`` [B, T] (no padding).
    """
    given = [x is not None for x in (attention_mask, lengths, offsets)]
    if sum(given) > 1:
        raise ValueError("token_weights: give at most one of attention_mask, lengths, offsets")
    if attention_mask is not None:
        mask = attention_mask.to(torch.float32)
        n = mask.sum(1, keepdim=True).clamp_min(1.0)
        return (mask / n).reshape(-1)
    if lengths is not None:
        if shape is None or len(shape) != 2:
            raise ValueError("token_weights: lengths need shape=(B, T)")
        B, T = shape
        lengths = lengths.to(torch.int64)
        if lengths.numel() != B or bool((lengths < 0).any()) or bool((lengths > T).any()):
            raise ValueError(f"token_weights: lengths must be {B} values in [0, {T}], got {lengths.tolist()}")
        mask = torch.arange(T, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
        return token_weights(attention_mask=mask)
    if offsets is not None:
        offsets = offsets.to(torch.int64)
        if offsets.dim() != 1 or offsets.numel() < 1 or offsets[0] != 0 or bool((offsets.diff() < 0).any()):
            raise ValueError("token_weights: offsets must be non-decreasing int64 [S+1] starting at 0")
        lens = offsets.diff()
        per_seq = 1.0 / lens.clamp_min(1).to(torch.float32)
        return torch.repeat_interleave(per_seq, lens)
    if shape is None:
        raise ValueError("token_weights: give attention_mask, lengths, offsets or shape")
    if len(shape) == 2:
        B, T = shape
        return torch.full((B * T,), 1.0 / max(T, 1), dtype=torch.float32)
    return torch.full((shape[0],), 1.0 / max(shape[0], 1), dtype=torch.float32)

"""Fused linear + cross-entropy, Triton: the row-wise softmax work on a chunk of logits.

One program per row walks the vocabulary in BLOCK_V tiles with an online max/sum (one read for the log-sum-exp,
one read and one write for the gradient). Loads convert to fp32 at once (bf16 arithmetic is wrong under the
interpreter); tanh is written with exp (no libdevice).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _lse_kernel(
    logits_ptr, target_ptr, loss_ptr, lse_ptr, V, ignore_index, softcap, BLOCK_V: tl.constexpr, CAP: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * V
    t = tl.load(target_ptr + row)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        if CAP:
            z = tl.where(cols < V, softcap * _tanh(z / softcap), float("-inf"))
        m_new = tl.maximum(m, z)
        # lanes that have seen only -inf keep s = 0 (avoid inf - inf)
        s = tl.where(m_new == float("-inf"), 0.0, s * tl.exp(m - m_new) + tl.exp(z - m_new))
        m = m_new
    mx = tl.max(m, axis=0)
    lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), axis=0))
    keep = t != ignore_index
    zt = tl.load(base + tl.where(keep, t, 0)).to(tl.float32)
    if CAP:
        zt = softcap * _tanh(zt / softcap)
    tl.store(loss_ptr + row, tl.where(keep, lse - zt, 0.0))
    tl.store(lse_ptr + row, tl.where(keep, lse, 0.0))


@triton.jit
def _grad_kernel(
    logits_ptr, target_ptr, lse_ptr, gl_ptr, V, ignore_index, softcap, BLOCK_V: tl.constexpr, CAP: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * V
    t = tl.load(target_ptr + row)
    keep = t != ignore_index
    lse = tl.load(lse_ptr + row)
    gscale = tl.load(gl_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        x = tl.load(base + cols, mask=cmask, other=0.0).to(tl.float32)
        if CAP:
            th = _tanh(x / softcap)
            g = tl.exp(softcap * th - lse)
            g = tl.where(cols == t, g - 1.0, g) * (1.0 - th * th)
        else:
            g = tl.exp(x - lse)
            g = tl.where(cols == t, g - 1.0, g)
        g = tl.where(keep, g * gscale, 0.0)  # ignored rows: exactly 0, whatever they held
        tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=cmask)


def _block(V: int) -> int:
    return min(triton.next_power_of_2(V), 4096)


def cross_entropy_lse(logits, target, ignore_index, softcap):
    N, V = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N:
        _lse_kernel[(N,)](logits, target, loss, lse, V, ignore_index, softcap, BLOCK_V=_block(V), CAP=softcap > 0)
    return loss, lse


def cross_entropy_grad_(logits, target, lse, grad_loss, ignore_index, softcap):
    N, V = logits.shape
    if N:
        _grad_kernel[(N,)](logits, target, lse, grad_loss, V, ignore_index, softcap, BLOCK_V=_block(V), CAP=softcap > 0)

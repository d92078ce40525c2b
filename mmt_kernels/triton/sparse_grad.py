"""Neuron-sparse weight gradient, Triton: acc[K, C] += a[:, rows].T @ b, or acc[C, K] (``transposed``).

One program per [BLOCK_K, BLOCK_C] tile of the accumulator walks the N tokens in BLOCK_N steps; the selected
columns of ``a`` are gathered by index as the tile loads (no gathered copy). Loads convert to fp32 (bf16 dot
products are wrong under the interpreter); each program owns its tile, so no atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _kernel(
    acc_ptr,
    a_ptr,
    rows_ptr,
    b_ptr,
    N,
    R,
    K,
    C,
    TRANSPOSED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pk = tl.program_id(0)
    pc = tl.program_id(1)
    ks = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    cs = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    kmask = ks < K
    cmask = cs < C
    cols = tl.load(rows_ptr + ks, mask=kmask, other=0)
    total = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        nmask = ns < N
        at = tl.load(
            a_ptr + ns[None, :].to(tl.int64) * R + cols[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0
        ).to(tl.float32)
        bt = tl.load(
            b_ptr + ns[:, None].to(tl.int64) * C + cs[None, :], mask=nmask[:, None] & cmask[None, :], other=0.0
        ).to(tl.float32)
        total += tl.dot(at, bt, input_precision="ieee")
    if TRANSPOSED:  # [C, K]: the column neurons' layout
        idx = cs[None, :].to(tl.int64) * K + ks[:, None]
    else:
        idx = ks[:, None].to(tl.int64) * C + cs[None, :]
    mask = kmask[:, None] & cmask[None, :]
    old = tl.load(acc_ptr + idx, mask=mask, other=0.0)
    tl.store(acc_ptr + idx, old + total, mask=mask)


def sparse_weight_grad_(acc, a, rows, b, transposed=False):
    N, R = a.shape
    K, C = rows.numel(), b.shape[1]
    if K == 0 or C == 0 or N == 0:
        return
    grid = (triton.cdiv(K, 32), triton.cdiv(C, 32))
    _kernel[grid](acc, a, rows, b, N, R, K, C, TRANSPOSED=transposed, BLOCK_N=32, BLOCK_K=32, BLOCK_C=32)

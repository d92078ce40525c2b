"""Family 1, Triton: Taylor importance accumulator acc[j] += sum_t w[t] * |a[t, j] * g[t, j]|.

One program per block of BLOCK_M neurons walks all tokens in BLOCK_T tiles: a column reduction with no atomics,
so the result is deterministic. Loads convert to fp32 at once (bf16 arithmetic is wrong under the interpreter).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _taylor_kernel(acc_ptr, act_ptr, grad_ptr, w_ptr, N, M, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cmask = cols < M
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t0 in range(0, N, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        tmask = ts < N
        mask = tmask[:, None] & cmask[None, :]
        idx = ts[:, None].to(tl.int64) * M + cols[None, :]
        a = tl.load(act_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + ts, mask=tmask, other=0.0)
        total += tl.sum(tl.abs(a * g) * w[:, None], axis=0)
    old = tl.load(acc_ptr + cols, mask=cmask, other=0.0)
    tl.store(acc_ptr + cols, old + total, mask=cmask)


def taylor_accumulate_(acc, act, grad, token_weight):
    N, M = act.shape
    if N == 0 or M == 0:
        return
    block_m = min(triton.next_power_of_2(M), 128)
    block_t = min(triton.next_power_of_2(N), max(1, 8192 // block_m))
    _taylor_kernel[(triton.cdiv(M, block_m),)](acc, act, grad, token_weight, N, M, BLOCK_T=block_t, BLOCK_M=block_m)

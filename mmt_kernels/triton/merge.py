"""Family 3, Triton: fused K-way merge and radix-select magnitude thresholds.

The K inputs arrive as a tuple of pointers (one kernel specialisation per K), so nothing is stacked:
each program reads its block of every input once, accumulating in fp32 in task order (the reference's
order). Thresholds: four histogram passes (8, 8, 8, 7 bits) over the fp32 bit patterns of |x - base|;
``tl.histogram`` per block, one atomic add of the block histogram; the digit choice between passes is a
few torch ops on the [K, bins] histogram (no host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.merge import keep_threshold24

METHOD_IDS = {"linear": 0, "task_arithmetic": 1, "ties": 2, "dare_linear": 3, "dare_ties": 4}
# Bit 31 of |x| is 0, so 31 bits in 8-bit digits. Wider digits (three passes of 11/10/10 bits) made
# tl.histogram spill (255 registers and ~800 B of stack on sm_90); 256 bins stay in registers.
_SHIFTS = (23, 15, 7, 0)
_DIGIT_BITS = (8, 8, 8, 7)
_HIST_BINS = 512  # 256 digit bins + a bin block for elements whose higher bits miss the prefix


@triton.jit
def _fmix32(h):
    h ^= h >> 16
    h = h * 0x85EBCA6B
    h ^= h >> 13
    h = h * 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit(do_not_specialize=["seed"])  # seed == 1 would become a constant, which has no .to()
def _merge_kernel(
    xs,
    base_ptr,
    out_ptr,
    w_ptr,
    thr_ptr,
    scale_ptr,
    keep_ptr,
    N,
    lam,
    seed,
    K: tl.constexpr,
    METHOD: tl.constexpr,
    HAS_BASE: tl.constexpr,
    SIGN_COUNT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK], dtype=tl.float32)
    tot = tl.zeros([BLOCK], dtype=tl.float32)
    vote = tl.zeros([BLOCK], dtype=tl.float32)
    pos = tl.zeros([BLOCK], dtype=tl.float32)
    neg = tl.zeros([BLOCK], dtype=tl.float32)
    cpos = tl.zeros([BLOCK], dtype=tl.float32)
    cneg = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        x = tl.load(xs[k] + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + k)
        if METHOD == 0:
            t = x
        else:
            if HAS_BASE:
                t = x - b
            else:
                t = x
            if METHOD == 2:
                t = tl.where(tl.abs(t) >= tl.load(thr_ptr + k), t, 0.0)
            if METHOD >= 3:
                # Same counter-based hash as merge_hash.h / the reference: (seed, task, element index).
                key = _fmix32(_fmix32(tl.full([], k, tl.uint32) + 0x9E3779B9) ^ seed.to(tl.uint32))
                h = _fmix32(offs.to(tl.uint32) ^ key)
                h = _fmix32(h + key)
                keep = (h >> 8) < tl.load(keep_ptr + k).to(tl.uint32)
                t = tl.where(keep, t * tl.load(scale_ptr + k), 0.0)
        if METHOD == 2 or METHOD == 4:
            if SIGN_COUNT:
                v = tl.where(t > 0, 1.0, tl.where(t < 0, -1.0, 0.0))
            else:
                v = t
            wt = w * t
            # k == 0 assigns (as the reference starts from its first term), later tasks add.
            if k == 0:
                vote = v
                pos = tl.where(t > 0, wt, 0.0)
                neg = tl.where(t < 0, wt, 0.0)
            else:
                vote = vote + v
                pos = pos + tl.where(t > 0, wt, 0.0)
                neg = neg + tl.where(t < 0, wt, 0.0)
            cpos = cpos + tl.where(t > 0, 1.0, 0.0)
            cneg = cneg + tl.where(t < 0, 1.0, 0.0)
        else:
            if k == 0:
                tot = w * t
            else:
                tot = tot + w * t
    if METHOD == 0:
        r = tot
    else:
        if METHOD == 2 or METHOD == 4:
            m = tl.where(vote >= 0, pos / tl.maximum(cpos, 1.0), neg / tl.maximum(cneg, 1.0))
        else:
            m = tot
        if HAS_BASE:
            r = b + lam * m
        else:
            r = lam * m
    tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _hist_kernel(
    x_ptr,
    base_ptr,
    hist_ptr,
    prefix_ptr,
    N,
    task,
    SHIFT: tl.constexpr,
    DIGIT_MASK: tl.constexpr,
    FIXED_SHIFT: tl.constexpr,
    HAS_BASE: tl.constexpr,
    BINS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BASE:
        x = x - tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.abs(x).to(tl.uint32, bitcast=True)
    digit = ((u >> SHIFT) & DIGIT_MASK).to(tl.int32)
    ok = mask
    if FIXED_SHIFT < 32:
        prefix = tl.load(prefix_ptr + task).to(tl.uint32)
        ok = ok & ((u >> FIXED_SHIFT) == (prefix >> FIXED_SHIFT))
    # Elements that do not count land in the upper half of the histogram, which is never read.
    digit = tl.where(ok, digit, BINS // 2)
    h = tl.histogram(digit, BINS)
    tl.atomic_add(hist_ptr + task * BINS + tl.arange(0, BINS), h)


def _check_sizes(op: str, tensors, base) -> None:
    # Every kernel reads n elements of each input (base included): a shorter one would be read past its end.
    n = tensors[0].numel()
    for name, t in [(f"tensors[{k}]", t) for k, t in enumerate(tensors)] + [("base", base)]:
        if t is not None and (t.numel() != n or t.dtype != tensors[0].dtype or t.device != tensors[0].device):
            raise ValueError(
                f"{op}: {name} is {t.dtype} [{t.numel()}] on {t.device}; tensors[0] is "
                f"{tensors[0].dtype} [{n}] on {tensors[0].device}"
            )


def magnitude_threshold(tensors, base, ks, block: int = 4096) -> torch.Tensor:
    _check_sizes("merge_threshold", tensors, base)
    if len(ks) != len(tensors) or any(not 0 <= k <= tensors[0].numel() for k in ks):
        raise ValueError(f"merge_threshold: ks must hold one count in [0, {tensors[0].numel()}] per tensor, got {ks}")
    K, n = len(tensors), tensors[0].numel()
    dev = tensors[0].device
    out = torch.full((K,), float("inf"), dtype=torch.float32, device=dev)
    if n == 0 or all(k == 0 for k in ks):
        return out
    prefix = torch.zeros(K, dtype=torch.int64, device=dev)  # uint32 bit patterns held in int64
    remaining = torch.tensor([max(int(k), 1) for k in ks], dtype=torch.int64, device=dev)
    grid = (triton.cdiv(n, block),)
    for p, (shift, bits) in enumerate(zip(_SHIFTS, _DIGIT_BITS)):
        hist = torch.zeros(K, _HIST_BINS, dtype=torch.int32, device=dev)
        prefix32 = prefix.to(torch.int32)  # bit 31 of |x| is 0, so the int32 view is exact
        for k in range(K):
            _hist_kernel[grid](
                tensors[k],
                base if base is not None else tensors[k],
                hist,
                prefix32,
                n,
                k,
                SHIFT=shift,
                DIGIT_MASK=(1 << bits) - 1,
                FIXED_SHIFT=32 if p == 0 else _SHIFTS[p - 1],
                HAS_BASE=base is not None,
                BINS=_HIST_BINS,
                BLOCK=block,
            )
        # From the top digit down: the first digit whose cumulative count reaches `remaining`.
        counts = hist[:, : 1 << bits].to(torch.int64).flip(1)
        cum = counts.cumsum(1)
        j = (cum < remaining[:, None]).sum(1).clamp_max((1 << bits) - 1)
        above = torch.where(j > 0, cum.gather(1, (j - 1).clamp_min(0)[:, None]).squeeze(1), torch.zeros_like(j))
        digit = (1 << bits) - 1 - j
        prefix = prefix | (digit << shift)
        remaining = remaining - above
    vals = prefix.to(torch.int32).view(torch.float32)
    kst = torch.tensor([int(k) for k in ks], device=dev)
    return torch.where(kst > 0, vals, out)


def merge(
    tensors,
    base,
    weights,
    thresholds,
    densities,
    method: str,
    lam: float,
    seed: int,
    sign_by_count: bool,
    block: int = 1024,
) -> torch.Tensor:
    _check_sizes("merge", tensors, base)
    K, n = len(tensors), tensors[0].numel()
    dev = tensors[0].device
    mid = METHOD_IDS[method]
    use_base = base is not None and mid != 0
    out = torch.empty_like(base if use_base else tensors[0])
    if n == 0:
        return out
    w = torch.tensor(weights, dtype=torch.float32, device=dev)
    thr = thresholds if thresholds is not None else w
    if mid >= 3:
        scale = torch.tensor([1.0 / p for p in densities], dtype=torch.float64).float().to(dev)
        keep = torch.tensor([keep_threshold24(p) for p in densities], dtype=torch.int64, device=dev)
    else:
        scale, keep = w, w
    grid = (triton.cdiv(n, block),)
    _merge_kernel[grid](
        tuple(tensors),
        base if use_base else tensors[0],
        out,
        w,
        thr,
        scale,
        keep,
        n,
        float(lam),
        int(seed) & 0xFFFFFFFF,
        K=K,
        METHOD=mid,
        HAS_BASE=use_base,
        SIGN_COUNT=bool(sign_by_count),
        BLOCK=block,
    )
    return out

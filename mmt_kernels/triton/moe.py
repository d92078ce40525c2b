"""Family 2, Triton: permute, dispatch, combine, a grouped SwiGLU GEMM over expert segments, and the FFT
router features as a DFT GEMM. Launchers take the same arguments as the C++ ops in csrc/ops.cpp.

Nothing here reads a device value on the host: the grouped GEMM's grid is sized by an upper bound on
the number of row tiles (``cdiv(N, BM) + E``), and each program finds its expert and row range from
per-expert tile offsets computed on the device (the idea of vLLM's ``moe_align_block_size`` without
padding the tokens). Under ``TRITON_INTERPRET=1`` every dot runs in fp32 (bf16 arithmetic is wrong in
the interpreter, see docs/kernels.md); on a GPU 16-bit operands go to ``tl.dot`` natively with fp32
accumulation and fp32 operands use exact ``ieee`` products (tf32 would exceed the tolerances).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _dot_f32(dtype: torch.dtype) -> bool:
    return _INTERPRET or dtype == torch.float32


# ---- activations (no libdevice: tanh through exp) --------------------------------------------


@triton.jit
def _act_fwd(g, ACT: tl.constexpr):
    if ACT == 0:
        return g / (1.0 + tl.exp(-g))
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
        return 0.5 * g * (1.0 + t)


@triton.jit
def _act_bwd(g, ACT: tl.constexpr):
    if ACT == 0:
        s = 1.0 / (1.0 + tl.exp(-g))
        return s * (1.0 + g * (1.0 - s))
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
        return 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)


# ---- permute: chunk histograms, device-side prefix sums, stable scatter -----------------------


# Both kernels work on chunks of BLOCK slots with [BLOCK] or [BLOCK, BLOCK] tiles, whatever the number of
# experts (a one-hot [BLOCK, E] tile spilled at E = 12288).
@triton.jit
def _permute_count_kernel(ids_ptr, counts_ptr, N, E, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    ids = tl.load(ids_ptr + offs, mask=valid, other=0)
    # Integer atomics: the counts do not depend on their order.
    tl.atomic_add(counts_ptr + pid.to(tl.int64) * E + ids, tl.full([BLOCK], 1, tl.int32), mask=valid)


@triton.jit
def _permute_scatter_kernel(ids_ptr, base_ptr, perm_ptr, inv_ptr, N, E, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    offs = pid * BLOCK + lane
    valid = offs < N
    ids = tl.load(ids_ptr + offs, mask=valid, other=-1)
    # Rank of each slot among the earlier slots of its expert in this chunk: stable by construction.
    same = (ids[:, None] == ids[None, :]) & (lane[None, :] < lane[:, None])
    rank = tl.sum(same.to(tl.int32), axis=1)
    base = tl.load(base_ptr + pid.to(tl.int64) * E + ids, mask=valid, other=0)
    pos = base + rank
    tl.store(inv_ptr + offs, pos.to(tl.int64), mask=valid)
    tl.store(perm_ptr + pos, offs.to(tl.int64), mask=valid)


def permute(expert_ids: torch.Tensor, num_experts: int):
    ids = expert_ids.reshape(-1).contiguous()
    N, E = ids.numel(), num_experts
    block = max(16, min(128, triton.next_power_of_2(max(N, 1))))
    chunks = triton.cdiv(N, block)
    perm = torch.empty(N, dtype=torch.int64, device=ids.device)
    inv = torch.empty_like(perm)
    counts = torch.zeros(max(chunks, 1), E, dtype=torch.int32, device=ids.device)
    if N:
        _permute_count_kernel[(chunks,)](ids, counts, N, E, BLOCK=block)
    totals = counts.sum(0, dtype=torch.int64)
    offsets = torch.cat([totals.new_zeros(1), totals.cumsum(0)])
    # base[c, e] = where chunk c's slots of expert e start: device-side prefix sums, no host sync.
    base = (offsets[:-1].unsqueeze(0) + counts.cumsum(0, dtype=torch.int64) - counts).contiguous()
    if N:
        _permute_scatter_kernel[(chunks,)](ids, base, perm, inv, N, E, BLOCK=block)
    return perm, inv, offsets


# ---- dispatch / combine ---------------------------------------------------------------------


@triton.jit
def _dispatch_kernel(
    x_ptr, perm_ptr, scale_ptr, out_ptr, N, D, k, HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    mask = rmask[:, None] & (cols < D)[None, :]
    slot = tl.load(perm_ptr + rows, mask=rmask, other=0)
    v = tl.load(x_ptr + (slot // k)[:, None] * D + cols[None, :], mask=mask, other=0.0)
    if HAS_SCALE:
        v = v.to(tl.float32) * tl.load(scale_ptr + slot, mask=rmask, other=0.0)[:, None]
    # int64 offsets: rows * D passes 2^31 on large dispatches
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(
    yp_ptr, inv_ptr, w_ptr, out_ptr, T, D, k, HAS_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr
):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tmask = toks < T
    mask = tmask[:, None] & (cols < D)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for s in range(k):  # gather the k rows of each token in a fixed order: no atomics, deterministic
        row = tl.load(inv_ptr + toks * k + s, mask=tmask, other=0)
        v = tl.load(yp_ptr + row[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            v = v * tl.load(w_ptr + toks * k + s, mask=tmask, other=0.0)[:, None]
        acc += v
    tl.store(out_ptr + toks.to(tl.int64)[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_wgrad_kernel(dout_ptr, yp_ptr, inv_ptr, out_ptr, N, D, k, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    slots = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    smask = slots < N
    row = tl.load(inv_ptr + slots, mask=smask, other=0)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        mask = smask[:, None] & (cols < D)[None, :]
        g = tl.load(dout_ptr + (slots // k).to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        y = tl.load(yp_ptr + row[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(g * y, axis=1)
    tl.store(out_ptr + slots, acc, mask=smask)


def _row_blocks(rows: int, d: int):
    block_d = min(triton.next_power_of_2(max(d, 1)), 256 if _INTERPRET else 128)
    block_r = max(1, min(triton.next_power_of_2(max(rows, 1)), 4096 // block_d if _INTERPRET else 16))
    return block_r, block_d


def dispatch(x, perm, scale, k):
    N, D = perm.numel(), x.shape[1]
    out = torch.empty(N, D, dtype=x.dtype, device=x.device)
    if N and D:
        br, bd = _row_blocks(N, D)
        _dispatch_kernel[(triton.cdiv(N, br), triton.cdiv(D, bd))](
            x,
            perm,
            scale if scale is not None else x,
            out,
            N,
            D,
            k,
            HAS_SCALE=scale is not None,
            BLOCK_R=br,
            BLOCK_D=bd,
        )
    return out


def combine(yp, inv, weights, k):
    N, D = inv.numel(), yp.shape[1]
    T = N // k
    out = torch.empty(T, D, dtype=yp.dtype, device=yp.device)
    if T and D:
        bt, bd = _row_blocks(T, D)
        _combine_kernel[(triton.cdiv(T, bt), triton.cdiv(D, bd))](
            yp,
            inv,
            weights if weights is not None else yp,
            out,
            T,
            D,
            k,
            HAS_W=weights is not None,
            BLOCK_T=bt,
            BLOCK_D=bd,
        )
    return out


def combine_weight_grad(dout, yp, inv, k):
    N, D = inv.numel(), yp.shape[1]
    out = torch.empty(N, dtype=torch.float32, device=yp.device)
    if N:
        br, bd = _row_blocks(N, D)
        _combine_wgrad_kernel[(triton.cdiv(N, br),)](dout, yp, inv, out, N, D, k, BLOCK_R=br, BLOCK_D=bd)
    return out


# ---- grouped GEMM over expert segments ------------------------------------------------------
# MODE 0: C = A @ B_e                       (down projection forward)
# MODE 1: G = A @ B_e, U = A @ B2_e, H = act(G) * U   (gate/up forward; stores G, U, H)
# MODE 2: dH = A @ B_e; dG = dH * U * act'(G), dU = dH * act(G)   (stores dG in C, dU in C2)
# MODE 3: C = A @ B_e + A2 @ B2_e           (dx = dG W_gate + dU W_up)
# B_e[kk, n] lives at b_ptr + e * stride_be + kk * stride_bk + n * stride_bn.


@triton.jit
def _grouped_mm_kernel(
    a_ptr,
    a2_ptr,
    b_ptr,
    b2_ptr,
    c_ptr,
    c2_ptr,
    c3_ptr,
    g_ptr,
    u_ptr,
    offsets_ptr,
    tiles_ptr,
    E,
    NC,
    K,
    stride_be,
    stride_bk,
    stride_bn,
    MODE: tl.constexpr,
    ACT: tl.constexpr,
    DOT_F32: tl.constexpr,
    E_P2: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Which expert owns row tile pid_m: the number of experts whose tiles end at or before it.
    experts = tl.arange(0, E_P2)
    tile_end = tl.load(tiles_ptr + 1 + experts, mask=experts < E, other=2147483647)
    e = tl.sum((tile_end <= pid_m).to(tl.int32), axis=0)
    live = e < E
    e = tl.minimum(e, E - 1)
    seg_start = tl.load(offsets_ptr + e)
    seg_end = tl.load(offsets_ptr + e + 1)
    row0 = seg_start + (pid_m - tl.load(tiles_ptr + e)) * BM
    rows = row0 + tl.arange(0, BM)
    rmask = (rows < seg_end) & live
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < NC
    k_end = tl.where(live, K, 0)  # tiles past the last expert do no work

    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc2 = tl.zeros([BM, BN], dtype=tl.float32)
    b_base = b_ptr + e.to(tl.int64) * stride_be
    b2_base = b2_ptr + e.to(tl.int64) * stride_be
    for k0 in range(0, k_end, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        a_off = rows.to(tl.int64)[:, None] * K + ks[None, :]
        amask = rmask[:, None] & kmask[None, :]
        b_off = ks[:, None] * stride_bk + cols[None, :] * stride_bn
        bmask = kmask[:, None] & cmask[None, :]
        a = tl.load(a_ptr + a_off, mask=amask, other=0.0)
        b = tl.load(b_base + b_off, mask=bmask, other=0.0)
        if DOT_F32:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b)
        if MODE == 1 or MODE == 3:
            b2 = tl.load(b2_base + b_off, mask=bmask, other=0.0)
            if MODE == 3:
                a2 = tl.load(a2_ptr + a_off, mask=amask, other=0.0)
            else:
                a2 = a
            if DOT_F32:
                p2 = tl.dot(a2.to(tl.float32), b2.to(tl.float32), input_precision="ieee")
            else:
                p2 = tl.dot(a2, b2)
            if MODE == 3:
                acc += p2
            else:
                acc2 += p2

    c_off = rows.to(tl.int64)[:, None] * NC + cols[None, :]
    cm = rmask[:, None] & cmask[None, :]
    out_ty = c_ptr.dtype.element_ty
    if MODE == 1:
        g = acc.to(out_ty)
        u = acc2.to(out_ty)
        tl.store(c_ptr + c_off, g, mask=cm)
        tl.store(c2_ptr + c_off, u, mask=cm)
        gf = g.to(tl.float32)  # from the stored (rounded) values, as the backward will see them
        tl.store(c3_ptr + c_off, (_act_fwd(gf, ACT) * u.to(tl.float32)).to(out_ty), mask=cm)
    elif MODE == 2:
        dh = acc.to(out_ty).to(tl.float32)
        g = tl.load(g_ptr + c_off, mask=cm, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + c_off, mask=cm, other=0.0).to(tl.float32)
        tl.store(c_ptr + c_off, (dh * u * _act_bwd(g, ACT)).to(out_ty), mask=cm)
        tl.store(c2_ptr + c_off, (dh * _act_fwd(g, ACT)).to(out_ty), mask=cm)
    else:
        tl.store(c_ptr + c_off, acc.to(out_ty), mask=cm)


# C_e[P, Q] = A_e^T @ B_e over expert e's rows (weight gradients); experts with train_mask 0 write zeros.
@triton.jit
def _grouped_wgrad_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    g_ptr,
    u_ptr,
    offsets_ptr,
    mask_ptr,
    P,
    Q,
    H_FROM_GU: tl.constexpr,
    ACT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_F32: tl.constexpr,
    BP: tl.constexpr,
    BQ: tl.constexpr,
    BR: tl.constexpr,
):
    e = tl.program_id(0)
    ps = tl.program_id(1) * BP + tl.arange(0, BP)
    qs = tl.program_id(2) * BQ + tl.arange(0, BQ)
    pmask = ps < P
    qmask = qs < Q
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    if HAS_MASK:
        end = tl.where(tl.load(mask_ptr + e) != 0, end, start)  # frozen expert: skip the reduction
    acc = tl.zeros([BP, BQ], dtype=tl.float32)
    for r0 in range(start, end, BR):
        rs = r0 + tl.arange(0, BR)
        rm = rs < end
        a = tl.load(a_ptr + rs.to(tl.int64)[:, None] * P + ps[None, :], mask=rm[:, None] & pmask[None, :], other=0.0)
        bm = rm[:, None] & qmask[None, :]
        b_off = rs.to(tl.int64)[:, None] * Q + qs[None, :]
        if H_FROM_GU:  # B = act(G) * U, recomputed from the saved pre-activations instead of stored
            g = tl.load(g_ptr + b_off, mask=bm, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + b_off, mask=bm, other=0.0).to(tl.float32)
            b = (_act_fwd(g, ACT) * u).to(a_ptr.dtype.element_ty)
        else:
            b = tl.load(b_ptr + b_off, mask=bm, other=0.0)
        if DOT_F32:
            acc += tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(a), b)
    c_off = e.to(tl.int64) * P * Q + ps[:, None] * Q + qs[None, :]
    tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=pmask[:, None] & qmask[None, :])


def _mm_blocks(dtype):
    if _INTERPRET:
        return 32, 64, 64  # few, large programs: the interpreter costs ~1 ms per program
    return (32, 64, 32) if dtype == torch.float32 else (64, 128, 32)


def _tiles(offsets: torch.Tensor, bm: int) -> torch.Tensor:
    counts = offsets[1:] - offsets[:-1]
    return torch.cat([offsets.new_zeros(1), ((counts + bm - 1) // bm).cumsum(0)]).contiguous()


def _grouped_mm(
    mode,
    a,
    b,
    c,
    offsets,
    tiles,
    E,
    NC,
    K,
    strides,
    *,
    a2=None,
    b2=None,
    c2=None,
    c3=None,
    g=None,
    u=None,
    act=0,
    bm=32,
    bn=64,
    bk=32,
):
    N = a.shape[0]
    if N == 0 or NC == 0:
        return
    grid = (triton.cdiv(N, bm) + E, triton.cdiv(NC, bn))
    dummy = c
    # 16-bit tiles are 64x128 with two fp32 accumulators (gate and up): 4 warps would need 255+ registers.
    warps = 4 if a.dtype == torch.float32 else 8
    _grouped_mm_kernel[grid](
        a,
        a2 if a2 is not None else a,
        b,
        b2 if b2 is not None else b,
        c,
        c2 if c2 is not None else dummy,
        c3 if c3 is not None else dummy,
        g if g is not None else dummy,
        u if u is not None else dummy,
        offsets,
        tiles,
        E,
        NC,
        K,
        *strides,
        MODE=mode,
        ACT=act,
        DOT_F32=_dot_f32(a.dtype),
        E_P2=triton.next_power_of_2(max(E, 2)),
        BM=bm,
        BN=bn,
        BK=bk,
        num_warps=warps,
    )


def grouped_mlp(xp, offsets, w_gate, w_up, w_down, act):
    N, d = xp.shape
    E, f = w_gate.shape[0], w_gate.shape[1]
    bm, bn, bk = _mm_blocks(xp.dtype)
    tiles = _tiles(offsets, bm)
    g = torch.empty(N, f, dtype=xp.dtype, device=xp.device)
    u, h = torch.empty_like(g), torch.empty_like(g)
    y = torch.empty(N, d, dtype=xp.dtype, device=xp.device)
    # gate/up: B_e[kk, n] = W[e, n, kk]; down: B_e[kk, n] = W_down[e, n, kk]
    _grouped_mm(
        1, xp, w_gate, g, offsets, tiles, E, f, d, (f * d, 1, d), b2=w_up, c2=u, c3=h, act=act, bm=bm, bn=bn, bk=bk
    )
    if d:
        if f == 0:
            y.zero_()
        else:
            _grouped_mm(0, h, w_down, y, offsets, tiles, E, d, f, (d * f, 1, f), bm=bm, bn=bn, bk=bk)
    return y, g, u


def grouped_mlp_backward(dy, xp, g, u, offsets, w_gate, w_up, w_down, train_mask, act, need_dx, need_dw):
    N, d = xp.shape
    E, f = w_gate.shape[0], w_gate.shape[1]
    empty = xp.new_empty(0)
    dx = torch.empty(N, d, dtype=xp.dtype, device=xp.device) if need_dx else empty
    dwg = torch.empty_like(w_gate) if need_dw else empty
    dwu = torch.empty_like(w_up) if need_dw else empty
    dwd = torch.empty_like(w_down) if need_dw else empty
    if not (need_dx or need_dw):
        return dx, dwg, dwu, dwd
    bm, bn, bk = _mm_blocks(xp.dtype)
    tiles = _tiles(offsets, bm)
    dg = torch.empty(N, f, dtype=xp.dtype, device=xp.device)
    du = torch.empty_like(dg)
    # dH = dY @ W_down[e]  (B_e[kk, n] = W_down[e, kk, n]) with the SwiGLU backward in the epilogue
    if f:
        if d:
            _grouped_mm(
                2, dy, w_down, dg, offsets, tiles, E, f, d, (d * f, f, 1), c2=du, g=g, u=u, act=act, bm=bm, bn=bn, bk=bk
            )
        else:
            dg.zero_()
            du.zero_()
    if need_dx and d:
        if f == 0:
            dx.zero_()
        else:  # dX = dG @ W_gate[e] + dU @ W_up[e]  (B_e[kk, n] = W[e, kk, n])
            _grouped_mm(3, dg, w_gate, dx, offsets, tiles, E, d, f, (f * d, d, 1), a2=du, b2=w_up, bm=bm, bn=bn, bk=bk)
    if need_dw:
        mask = train_mask.to(device=xp.device, dtype=torch.int8).contiguous() if train_mask is not None else None
        bp, bq, br = (32, 64, 64) if _INTERPRET else ((32, 64, 32) if xp.dtype == torch.float32 else (64, 64, 64))
        f32 = _dot_f32(xp.dtype)
        common = dict(HAS_MASK=mask is not None, DOT_F32=f32, BP=bp, BQ=bq, BR=br, ACT=act)
        m = mask if mask is not None else offsets
        if d and f:
            # dW_down[e] = dY_e^T @ H_e, H recomputed from (G, U) on the fly
            _grouped_wgrad_kernel[(E, triton.cdiv(d, bp), triton.cdiv(f, bq))](
                dy, dy, dwd, g, u, offsets, m, d, f, H_FROM_GU=True, **common
            )
            # dW_gate[e] = dG_e^T @ X_e, dW_up[e] = dU_e^T @ X_e
            for a, c in ((dg, dwg), (du, dwu)):
                _grouped_wgrad_kernel[(E, triton.cdiv(f, bp), triton.cdiv(d, bq))](
                    a, xp, c, a, a, offsets, m, f, d, H_FROM_GU=False, **common
                )
    return dx, dwg, dwu, dwd


# ---- FFT features ---------------------------------------------------------------------------


@triton.jit
def _log1p(m):
    # Accurate log1p without libdevice (Goldberg): log(u) * m / (u - 1) with u = 1 + m rounded.
    u = 1.0 + m
    return tl.where(u == 1.0, m, tl.log(u) * (m / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _fft_kernel(x_ptr, basis_ptr, feats_ptr, reim_ptr, T, D, F, BT: tl.constexpr, BF: tl.constexpr, BK: tl.constexpr):
    ts = tl.program_id(0) * BT + tl.arange(0, BT)
    fs = tl.program_id(1) * BF + tl.arange(0, BF)
    tmask = ts < T
    fmask = fs < F
    re = tl.zeros([BT, BF], dtype=tl.float32)
    im = tl.zeros([BT, BF], dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < D
        x = tl.load(
            x_ptr + ts.to(tl.int64)[:, None] * D + ks[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0
        ).to(tl.float32)
        bmask = kmask[:, None] & fmask[None, :]
        b_off = ks[:, None] * (2 * F) + fs[None, :]
        cos = tl.load(basis_ptr + b_off, mask=bmask, other=0.0)
        sin = tl.load(basis_ptr + b_off + F, mask=bmask, other=0.0)
        re += tl.dot(x, cos, input_precision="ieee")
        im += tl.dot(x, sin, input_precision="ieee")
    mask = tmask[:, None] & fmask[None, :]
    off = ts.to(tl.int64)[:, None] * (2 * F) + fs[None, :]
    tl.store(reim_ptr + off, re, mask=mask)
    tl.store(reim_ptr + off + F, im, mask=mask)
    mag = tl.sqrt(re * re + im * im)
    tl.store(
        feats_ptr + ts.to(tl.int64)[:, None] * F + fs[None, :], _log1p(mag).to(feats_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def _fft_bwd_kernel(
    grad_ptr, reim_ptr, basis_ptr, dx_ptr, T, D, F, BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr
):
    ts = tl.program_id(0) * BT + tl.arange(0, BT)
    ds = tl.program_id(1) * BD + tl.arange(0, BD)
    tmask = ts < T
    dmask = ds < D
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for f0 in range(0, F, BF):
        fs = f0 + tl.arange(0, BF)
        fmask = fs < F
        m2 = tmask[:, None] & fmask[None, :]
        r_off = ts.to(tl.int64)[:, None] * (2 * F) + fs[None, :]
        re = tl.load(reim_ptr + r_off, mask=m2, other=0.0)
        im = tl.load(reim_ptr + r_off + F, mask=m2, other=0.0)
        gr = tl.load(grad_ptr + ts.to(tl.int64)[:, None] * F + fs[None, :], mask=m2, other=0.0).to(tl.float32)
        mag = tl.sqrt(re * re + im * im)
        # d log1p(|z|)/dz = z / (|z| (1 + |z|)); subgradient 0 at z = 0 (torch's sgn(0) = 0)
        s = tl.where(mag > 0, gr / (tl.where(mag > 0, mag, 1.0) * (1.0 + mag)), 0.0)
        bmask = fmask[:, None] & dmask[None, :]
        b_off = ds[None, :] * (2 * F) + fs[:, None]  # basis^T tile [BF, BD]
        cos = tl.load(basis_ptr + b_off, mask=bmask, other=0.0)
        sin = tl.load(basis_ptr + b_off + F, mask=bmask, other=0.0)
        acc += tl.dot(s * re, cos, input_precision="ieee")
        acc += tl.dot(s * im, sin, input_precision="ieee")
    tl.store(
        dx_ptr + ts.to(tl.int64)[:, None] * D + ds[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=tmask[:, None] & dmask[None, :],
    )


def _fft_blocks(n):
    if _INTERPRET:
        return 32, min(64, max(16, triton.next_power_of_2(n))), 64
    return 64, 64, 32


def fft_features(x, basis):
    T, D = x.shape
    F = basis.shape[1] // 2
    feats = torch.empty(T, F, dtype=x.dtype, device=x.device)
    reim = torch.empty(T, 2 * F, dtype=torch.float32, device=x.device)
    if T and F:
        bt, bf, bk = _fft_blocks(F)
        _fft_kernel[(triton.cdiv(T, bt), triton.cdiv(F, bf))](x, basis, feats, reim, T, D, F, BT=bt, BF=bf, BK=bk)
    return feats, reim


def fft_features_backward(grad, reim, basis):
    T, F = grad.shape
    D = basis.shape[0]
    dx = torch.empty(T, D, dtype=grad.dtype, device=grad.device)
    if T and D:
        if F == 0:
            return dx.zero_()
        bt, bd, bf = _fft_blocks(D)
        # fp32 'ieee' dots run on FMA units with operands in registers: 8 warps keep them from spilling
        _fft_bwd_kernel[(triton.cdiv(T, bt), triton.cdiv(D, bd))](
            grad.contiguous(), reim, basis, dx, T, D, F, BT=bt, BD=bd, BF=bf, num_warps=8
        )
    return dx

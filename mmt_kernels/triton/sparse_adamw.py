"""Family 1, Triton: strict neuron-sparse AdamW over a [BLOCK_K, BLOCK_C] tile of selected neurons.

The launcher takes contiguous tensors (the registered op checks it): offsets come from the shapes. A compact
state (and grad) is [K, C] for row neurons and [C, K] ([C, U] with state rows) for columns: element (k, c) sits at
``k * s_k + c * s_c`` with the strides the launcher passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sparse_adamw_kernel(
    param_ptr,
    grad_ptr,
    m_ptr,
    v_ptr,
    rows_ptr,
    srows_ptr,
    scale_ptr,
    step_size_ptr,
    bc2_sqrt_ptr,
    K,
    C,
    stride_n,
    stride_c,
    s_k,
    s_c,
    g_k,
    g_c,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    decay,
    eps,
    step_size,
    bc2_sqrt,
    HAS_SCALE: tl.constexpr,
    HAS_ROW_STEP: tl.constexpr,
    COMPACT: tl.constexpr,
    HAS_STATE_ROWS: tl.constexpr,
    COMPACT_GRAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    # int64 offsets: cs * stride_c and ks * C pass 2^31 on large weights
    ks = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    cs = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    kmask = ks < K
    mask = kmask[:, None] & (cs < C)[None, :]
    neurons = tl.load(rows_ptr + ks, mask=kmask, other=0)
    pidx = neurons[:, None] * stride_n + cs[None, :] * stride_c
    if HAS_STATE_ROWS:  # compact state holding more neurons than are selected now
        srows = tl.load(srows_ptr + ks, mask=kmask, other=0)
        sidx = srows[:, None] * s_k + cs[None, :] * s_c
    elif COMPACT:
        sidx = ks[:, None] * s_k + cs[None, :] * s_c
    else:
        sidx = pidx

    # Bias corrections come from the host (fp64): 1 - beta^s in fp32 loses up to 5e-6 relative.
    if HAS_ROW_STEP:
        step_size = tl.load(step_size_ptr + ks, mask=kmask, other=0.0)
        bc2_sqrt = tl.load(bc2_sqrt_ptr + ks, mask=kmask, other=1.0)
    else:
        step_size = tl.zeros([BLOCK_K], dtype=tl.float32) + step_size
        bc2_sqrt = tl.zeros([BLOCK_K], dtype=tl.float32) + bc2_sqrt

    if COMPACT_GRAD:  # fp32 in the compact state's layout, selected neuron k at index k
        g = tl.load(grad_ptr + ks[:, None] * g_k + cs[None, :] * g_c, mask=mask, other=0.0)
    else:
        g = tl.load(grad_ptr + pidx, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr + ks, mask=kmask, other=0.0)[:, None]
    w = tl.load(param_ptr + pidx, mask=mask, other=0.0).to(tl.float32)
    m = beta1 * tl.load(m_ptr + sidx, mask=mask, other=0.0) + one_minus_beta1 * g
    v = beta2 * tl.load(v_ptr + sidx, mask=mask, other=0.0) + one_minus_beta2 * g * g
    w = w * decay - step_size[:, None] * m / (tl.sqrt(v) / bc2_sqrt[:, None] + eps)
    tl.store(m_ptr + sidx, m, mask=mask)
    tl.store(v_ptr + sidx, v, mask=mask)
    tl.store(param_ptr + pidx, w.to(param_ptr.dtype.element_ty), mask=mask)


def bias_corrections(lr, beta1, beta2, step, row_step):
    """(lr / (1 - beta1^s), sqrt(1 - beta2^s)) in fp64: Python floats for one step, fp32 [K] tensors per row."""
    if row_step is None:
        return lr / (1.0 - beta1**step), (1.0 - beta2**step) ** 0.5
    s = row_step.to(torch.float64)
    return (lr / (1.0 - beta1**s)).float(), (1.0 - beta2**s).sqrt().float()


def sparse_adamw_(
    param,
    exp_avg,
    exp_avg_sq,
    grad,
    rows,
    row_scale,
    row_step,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step,
    neuron_dim=0,
    compact=False,
    state_rows=None,
    compact_grad=False,
):
    K = rows.numel()
    if param.dim() == 1:
        C, stride_n, stride_c = 1, 1, 0
    elif neuron_dim == 0:
        C, stride_n, stride_c = param.shape[1], param.shape[1], 1
    else:
        C, stride_n, stride_c = param.shape[0], 1, param.shape[1]
    if K == 0 or C == 0:
        return
    columns = param.dim() == 2 and neuron_dim == 1
    U = exp_avg.numel() // C if state_rows is not None else K  # neurons in the compact state
    s_k, s_c = (1, U) if columns else (C, 1)
    g_k, g_c = (1, K) if columns else (C, 1)
    # Column neurons: K is the contiguous axis of the param row and of the [C, K] state: favour a wide K tile.
    block_c = min(triton.next_power_of_2(C), 256 if neuron_dim == 0 else 16)
    block_k = min(triton.next_power_of_2(K), max(1, 4096 // block_c))
    grid = (triton.cdiv(K, block_k), triton.cdiv(C, block_c))
    step_sizes, bc2_sqrts = bias_corrections(lr, beta1, beta2, step, row_step)
    dummy = exp_avg
    _sparse_adamw_kernel[grid](
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        rows,
        state_rows if state_rows is not None else rows,
        row_scale if row_scale is not None else dummy,
        step_sizes if row_step is not None else dummy,
        bc2_sqrts if row_step is not None else dummy,
        K,
        C,
        stride_n,
        stride_c,
        s_k,
        s_c,
        g_k,
        g_c,
        float(beta1),
        float(beta2),
        1.0 - beta1,
        1.0 - beta2,
        1.0 - lr * weight_decay,
        float(eps),
        step_sizes if row_step is None else 0.0,
        bc2_sqrts if row_step is None else 0.0,
        HAS_SCALE=row_scale is not None,
        HAS_ROW_STEP=row_step is not None,
        COMPACT=compact,
        HAS_STATE_ROWS=state_rows is not None,
        COMPACT_GRAD=compact_grad,
        BLOCK_K=block_k,
        BLOCK_C=block_c,
    )


def sparse_adamw_multi_(
    params,
    exp_avgs,
    exp_avg_sqs,
    grads,
    rows,
    state_rows,
    row_scales,
    row_steps,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step,
    neuron_dims,
    compact=False,
    compact_grad=False,
):
    """One launch per tensor: Triton has no portable way to walk a table of raw pointers of mixed dtypes
    (the CUDA backend does the single-launch version)."""
    for i, p in enumerate(params):
        sparse_adamw_(
            p,
            exp_avgs[i],
            exp_avg_sqs[i],
            grads[i],
            rows[i],
            row_scales[i],
            row_steps[i],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            step=step,
            neuron_dim=neuron_dims[i],
            compact=compact,
            state_rows=state_rows[i],
            compact_grad=compact_grad,
        )

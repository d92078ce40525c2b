"""Reference for family 1: strict AdamW on selected neurons only."""

from __future__ import annotations

import torch


def neuron_view(t: torch.Tensor, neuron_dim: int) -> torch.Tensor:
    """``t`` as [neurons, elements-per-neuron]: rows of a 2-D weight, columns if neuron_dim=1, a 1-D bias."""
    if t.dim() == 1:
        return t.unsqueeze(1)
    return t if neuron_dim == 0 else t.t()


def compact_view(t: torch.Tensor, k: int, c: int, neuron_dim: int) -> torch.Tensor:
    """A compact state or gradient as [K neurons, C]: stored [K, C] for rows, [C, K] for columns (neuron_dim=1,
    so that a param row's K selected elements are contiguous there too)."""
    return t.view(k, c) if neuron_dim == 0 else t.view(c, k).t()


def sparse_adamw_(
    param,
    exp_avg,
    exp_avg_sq,
    grad,
    rows,
    row_scale=None,
    row_step=None,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step,
    neuron_dim=0,
    compact=False,
    compact_grad=False,
):
    """Decoupled-weight-decay Adam (``torch.optim.AdamW`` math) on neurons ``rows`` of ``param``, in place.

    Unselected neurons are untouched: no decay, no moment update. State is fp32; ``compact`` state is
    [K, C] for rows (row k belongs to neuron rows[k]) and [C, K] for columns (column k belongs to neuron
    rows[k]); bias correction uses ``row_step[k]`` if given, else ``step``. ``compact_grad``: ``grad`` is fp32
    in the compact state's layout ([K, C] for rows, [C, K] for columns).
    """
    acc = torch.float64 if param.dtype == torch.float64 else torch.float32  # fp64 = golden for tests
    p = neuron_view(param, neuron_dim)
    K, C = rows.numel(), p.shape[1]
    g = (compact_view(grad, K, C, neuron_dim) if compact_grad else neuron_view(grad, neuron_dim)[rows]).to(acc)
    if row_scale is not None:
        g = g * row_scale.to(acc).unsqueeze(1)
    if compact:
        m_view = compact_view(exp_avg, K, C, neuron_dim)
        v_view = compact_view(exp_avg_sq, K, C, neuron_dim)
        m, v = m_view, v_view
    else:
        m_full, v_full = neuron_view(exp_avg, neuron_dim), neuron_view(exp_avg_sq, neuron_dim)
        m, v = m_full[rows], v_full[rows]
    steps = (
        row_step.double()
        if row_step is not None
        else torch.full((rows.numel(),), float(step), dtype=torch.float64, device=rows.device)
    )
    step_size = (lr / (1.0 - beta1**steps)).to(acc).unsqueeze(1)
    bc2_sqrt = (1.0 - beta2**steps).sqrt().to(acc).unsqueeze(1)

    w = p[rows].to(acc) * (1.0 - lr * weight_decay)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    w = w - step_size * m / (v.sqrt() / bc2_sqrt + eps)

    p[rows] = w.to(param.dtype)
    if compact:
        m_view.copy_(m)
        v_view.copy_(v)
    else:
        m_full[rows] = m
        v_full[rows] = v


def sparse_adamw_multi_(
    params,
    exp_avgs,
    exp_avg_sqs,
    grads,
    rows,
    state_rows,
    row_scales,
    row_steps,
    *,
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
    """``sparse_adamw_`` on each tensor i. With ``state_rows[i]`` the compact state is [U, C] for rows ([C, U] for
    columns, U >= K) and selected neuron k owns state row (column) ``state_rows[i][k]`` (e.g. the union of neurons
    over language pairs)."""
    for i, p in enumerate(params):
        m, v, sr = exp_avgs[i], exp_avg_sqs[i], state_rows[i]
        if sr is None:
            sparse_adamw_(
                p,
                m,
                v,
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
                compact_grad=compact_grad,
            )
            continue
        per_neuron = neuron_view(p, neuron_dims[i]).shape[1]
        # [U, C] as it is, or a [C, U] column state seen as [U, C]; gather the selected neurons' state
        m2, v2 = (compact_view(t, t.numel() // max(per_neuron, 1), per_neuron, neuron_dims[i]) for t in (m, v))
        ms, vs = (t[sr] if neuron_dims[i] == 0 else t[sr].t().contiguous() for t in (m2, v2))
        sparse_adamw_(
            p,
            ms,
            vs,
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
            compact=True,
            compact_grad=compact_grad,
        )
        m2[sr] = compact_view(ms, sr.numel(), per_neuron, neuron_dims[i])
        v2[sr] = compact_view(vs, sr.numel(), per_neuron, neuron_dims[i])

"""Family 1: neuron-sparse AdamW.

``sparse_adamw_`` updates only the selected neurons of a parameter (rows of a ``[out, in]`` weight,
or columns with ``neuron_dim=1``, e.g. a down projection), strictly: unselected neurons get no
decay, no moment update, no change at all.
"""

from __future__ import annotations

import torch

from . import reference as _ref
from ._registry import OpSpec, check_indices, register


def _reference(
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
    neuron_dim,
    compact,
):
    _ref.sparse_adamw_(
        param,
        exp_avg,
        exp_avg_sq,
        grad,
        rows,
        row_scale,
        row_step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        step=step,
        neuron_dim=neuron_dim,
        compact=compact,
    )


def _fake(
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
    neuron_dim,
    compact,
):
    return None


SPARSE_ADAMW = register(
    OpSpec(
        name="sparse_adamw_",
        schema="(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor grad, Tensor rows, "
        "Tensor? row_scale, Tensor? row_step, float lr, float beta1, float beta2, float eps, float weight_decay, "
        "int step, int neuron_dim, bool compact) -> ()",
        reference=_reference,
        fake=_fake,
        triton="sparse_adamw:sparse_adamw_",
    )
)


def _compact_shape(k, c, neuron_dim) -> str:
    """The compact layout, for messages: [K, C] for row neurons, [C, K] for columns (a param row's selected
    elements contiguous)."""
    return f"[{k}, {c}]" if neuron_dim == 0 else f"[{c}, {k}]"


def _check(
    param, exp_avg, exp_avg_sq, grad, rows, row_scale, neuron_dim, compact, row_step=None, step=1, check_rows=True
):
    """Python-side checks shared by every backend, so the reference fails as clearly as the kernels."""
    if param.dim() not in (1, 2):
        raise ValueError(f"sparse_adamw_: param must be 1-D or 2-D, got shape {tuple(param.shape)}")
    if neuron_dim not in (0, 1) or (neuron_dim == 1 and param.dim() != 2):
        raise ValueError(f"sparse_adamw_: neuron_dim must be 0, or 1 for a 2-D param; got {neuron_dim}")
    if grad.shape != param.shape or grad.dtype != param.dtype:
        raise ValueError(
            f"sparse_adamw_: grad {tuple(grad.shape)}/{grad.dtype} does not match param "
            f"{tuple(param.shape)}/{param.dtype}"
        )
    if param.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"sparse_adamw_: param dtype must be fp32, bf16 or fp16, got {param.dtype}")
    if rows.dtype != torch.int64 or rows.dim() != 1:
        raise TypeError(f"sparse_adamw_: rows must be a 1-D int64 tensor, got {rows.dtype} {tuple(rows.shape)}")
    n_neurons = param.shape[neuron_dim] if param.dim() == 2 else param.shape[0]
    per_neuron = param.numel() // max(n_neurons, 1)
    for name, s in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if s.dtype != torch.float32:
            raise TypeError(f"sparse_adamw_: {name} must be fp32, got {s.dtype}")
        want = (rows.numel() * per_neuron) if compact else param.numel()
        # a 2-D compact state must have the layout's shape: a [K, C] column state is the old, wrong layout
        want_2d = (rows.numel(), per_neuron) if neuron_dim == 0 else (per_neuron, rows.numel())
        if s.numel() != want or (s.shape != param.shape if not compact else s.dim() == 2 and s.shape != want_2d):
            raise ValueError(
                f"sparse_adamw_: {name} has shape {tuple(s.shape)}; expected "
                + (
                    f"{_compact_shape(rows.numel(), per_neuron, neuron_dim)} (compact)"
                    if compact
                    else f"{tuple(param.shape)}"
                )
            )
    if row_scale is not None and (row_scale.dtype != torch.float32 or row_scale.numel() != rows.numel()):
        raise ValueError(
            f"sparse_adamw_: row_scale must be fp32 [{rows.numel()}], got {row_scale.dtype} {tuple(row_scale.shape)}"
        )
    for name, t in (
        ("exp_avg", exp_avg),
        ("exp_avg_sq", exp_avg_sq),
        ("grad", grad),
        ("rows", rows),
        ("row_scale", row_scale),
        ("row_step", row_step),
    ):
        if t is not None and t.device != param.device:
            raise ValueError(f"sparse_adamw_: {name} is on {t.device}, param on {param.device}")
    if row_step is not None:
        if row_step.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"sparse_adamw_: row_step must be int32 or int64, got {row_step.dtype}")
        if row_step.dim() != 1 or row_step.numel() != rows.numel():
            raise ValueError(f"sparse_adamw_: row_step must be [K={rows.numel()}], got shape {tuple(row_step.shape)}")
        if row_step.numel() and not torch.compiler.is_compiling():  # a step of 0 divides by 1 - beta^0 = 0
            torch._assert_async((row_step >= 1).all(), "sparse_adamw_: row_step values must be >= 1")
    elif step < 1:
        raise ValueError(f"sparse_adamw_: step must be >= 1, got {step}")
    if check_rows:  # in range and strictly increasing: a repeated neuron would be updated twice, racing
        check_indices("sparse_adamw_", "rows", rows, n_neurons, increasing=True)


def sparse_adamw_(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad: torch.Tensor,
    rows: torch.Tensor,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    step: int = 1,
    row_scale: torch.Tensor | None = None,
    row_step: torch.Tensor | None = None,
    neuron_dim: int = 0,
    compact: bool = False,
    backend: str | None = None,
) -> None:
    """One strict AdamW step on neurons ``rows`` (sorted int64) of ``param``, in place.

    ``exp_avg``/``exp_avg_sq`` are fp32, either param-shaped or, with ``compact=True``, one entry per selected
    neuron: ``[K, C]`` for rows (row k = neuron ``rows[k]``), ``[C, K]`` for columns (``neuron_dim=1``, column
    k = neuron ``rows[k]``: like the param, whose row c holds the K selected elements). ``row_step`` ([K]) gives per-neuron step counts for bias correction
    (neurons that train only for some language pairs); ``row_scale`` ([K] fp32) scales each gradient.
    """
    _check(param, exp_avg, exp_avg_sq, grad, rows, row_scale, neuron_dim, compact, row_step, step)
    which = SPARSE_ADAMW.choose(param.device, backend)
    SPARSE_ADAMW(
        which,
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
        neuron_dim,
        compact,
    )


# ---- several tensors per call ---------------------------------------------------------------------------------
def _multi_reference(
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
    compact,
    compact_grad=False,
):
    _ref.sparse_adamw_multi_(
        params,
        exp_avgs,
        exp_avg_sqs,
        grads,
        rows,
        state_rows,
        row_scales,
        row_steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        step=step,
        neuron_dims=neuron_dims,
        compact=compact,
        compact_grad=compact_grad,
    )


def _multi_fake(
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
    compact,
    compact_grad=False,
):
    return None


SPARSE_ADAMW_MULTI = register(
    OpSpec(
        name="sparse_adamw_multi_",
        schema="(Tensor(a!)[] params, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor[] grads, Tensor[] rows, "
        "Tensor?[] state_rows, Tensor?[] row_scales, Tensor?[] row_steps, float lr, float beta1, float beta2, "
        "float eps, float weight_decay, int step, int[] neuron_dims, bool compact, bool compact_grad=False) -> ()",
        reference=_multi_reference,
        fake=_multi_fake,
        triton="sparse_adamw:sparse_adamw_multi_",
    )
)


def sparse_adamw_multi_(
    params,
    exp_avgs,
    exp_avg_sqs,
    grads,
    rows,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    step: int = 1,
    neuron_dims=None,
    state_rows=None,
    row_scales=None,
    row_steps=None,
    compact: bool = False,
    compact_grad: bool = False,
    backend: str | None = None,
    validate: bool = True,
) -> None:
    """``sparse_adamw_`` on several tensors in one call (one kernel launch on the CUDA backend).

    Lists are per tensor; ``neuron_dims``/``state_rows``/``row_scales``/``row_steps`` default to 0/None.
    ``state_rows[i]`` (int64 [K_i], needs ``compact=True``) maps selected neuron k to its entry of a compact state
    that may hold more neurons than are selected now (NeuronSparseAdamW keeps the union of every selection a
    parameter has trained): row ``state_rows[i][k]`` of ``[U_i, C_i]`` for row neurons, column of ``[C_i, U_i]``
    for column neurons. ``row_steps[i]`` is int64. All tensors share one device.
    ``compact_grad=True`` (needs ``compact``): each ``grads[i]`` is fp32 in the compact layout, ``[K_i, C_i]``
    for rows, ``[C_i, K_i]`` for columns (``W.compact_grad`` from :func:`~mmt_kernels.sparse_linear`).
    ``validate=False`` skips the index checks (rows in range and increasing, state rows in range, steps >= 1),
    for callers that validated them once (NeuronSparseAdamW): on a GPU they cost a few small kernels per tensor.
    """
    params, exp_avgs, exp_avg_sqs, grads, rows = (list(x) for x in (params, exp_avgs, exp_avg_sqs, grads, rows))
    n = len(params)
    fill = lambda x, v: [v] * n if x is None else list(x)  # noqa: E731
    neuron_dims, state_rows, row_scales, row_steps = (
        fill(neuron_dims, 0),
        fill(state_rows, None),
        fill(row_scales, None),
        fill(row_steps, None),
    )
    for name, lst in (
        ("exp_avgs", exp_avgs),
        ("exp_avg_sqs", exp_avg_sqs),
        ("grads", grads),
        ("rows", rows),
        ("neuron_dims", neuron_dims),
        ("state_rows", state_rows),
        ("row_scales", row_scales),
        ("row_steps", row_steps),
    ):
        if len(lst) != n:
            raise ValueError(f"sparse_adamw_multi_: {name} has {len(lst)} entries for {n} params")
    if compact_grad and not compact:
        raise ValueError("sparse_adamw_multi_: compact_grad=True needs compact=True (compact state)")
    if n == 0:
        return
    device = params[0].device
    for i in range(n):
        sr = state_rows[i]
        where = f"sparse_adamw_multi_[{i}]"
        if params[i].device != device:
            raise ValueError(f"{where}: param on {params[i].device}, param 0 on {device}: one device per call")
        grad_i = grads[i]
        if compact_grad:  # the shared checks below compare grad with param: check the compact one here
            nd = neuron_dims[i]
            per = params[i].numel() // max(params[i].shape[nd] if params[i].dim() == 2 else params[i].shape[0], 1)
            g = grads[i]
            want_2d = (rows[i].numel(), per) if nd == 0 else (per, rows[i].numel())
            if (
                g.dtype != torch.float32
                or g.numel() != rows[i].numel() * per
                or (g.dim() == 2 and g.shape != want_2d)
                or g.device != device
            ):
                raise ValueError(
                    f"{where}: a compact grad must be fp32 {_compact_shape(rows[i].numel(), per, nd)} (one entry "
                    f"per selected neuron) on {device}, got {g.dtype} {tuple(g.shape)} on {g.device}"
                )
            grad_i = params[i]
        if sr is None:
            try:
                _check(
                    params[i],
                    exp_avgs[i],
                    exp_avg_sqs[i],
                    grad_i,
                    rows[i],
                    row_scales[i],
                    neuron_dims[i],
                    compact,
                    row_steps[i],
                    step,
                    check_rows=validate,
                )
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{where}: {exc}") from None
        else:
            if not compact:
                raise ValueError(f"{where}: state_rows need compact=True")
            if sr.dtype != torch.int64 or sr.shape != rows[i].shape or sr.device != device:
                raise ValueError(
                    f"{where}: state_rows must be int64 {tuple(rows[i].shape)} on {device}, got "
                    f"{sr.dtype} {tuple(sr.shape)} on {sr.device}"
                )
            nd = neuron_dims[i]
            per = params[i].numel() // max(params[i].shape[nd] if params[i].dim() == 2 else params[i].shape[0], 1)
            fake_k = exp_avgs[i].numel() // max(per, 1)  # the check wants K neurons; the state here holds U
            try:
                _check(
                    params[i],
                    exp_avgs[i],
                    exp_avg_sqs[i],
                    grad_i,
                    torch.empty(fake_k, dtype=torch.int64, device=device),
                    None,
                    nd,
                    True,
                    step=step,
                    check_rows=False,
                )
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{where}: {exc}") from None
            if rows[i].dtype != torch.int64 or rows[i].dim() != 1:
                raise TypeError(f"{where}: rows must be a 1-D int64 tensor, got {rows[i].dtype}")
            if validate:
                n_neurons = params[i].shape[nd] if params[i].dim() == 2 else params[i].shape[0]
                check_indices(where, "rows", rows[i], n_neurons, increasing=True)
                check_indices(where, "state_rows", sr, fake_k)
                if row_steps[i] is not None and row_steps[i].numel() and not torch.compiler.is_compiling():
                    torch._assert_async((row_steps[i] >= 1).all(), f"{where}: row_steps values must be >= 1")
        rs = row_steps[i]
        if rs is not None and (rs.dtype != torch.int64 or rs.numel() != rows[i].numel() or rs.device != device):
            raise ValueError(
                f"{where}: row_steps must be int64 [{rows[i].numel()}] on {device}, got {rs.dtype} "
                f"{tuple(rs.shape)} on {rs.device}"
            )
    which = SPARSE_ADAMW_MULTI.choose(device, backend)
    SPARSE_ADAMW_MULTI(
        which,
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
        compact,
        compact_grad,
    )

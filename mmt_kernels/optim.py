"""``NeuronSparseAdamW``: AdamW that trains only selected neurons of each parameter (family 1).

A *neuron* is a row of a ``[out, in]`` weight (``neuron_dim=0``: gate/up projections, any output channel), a column
(``neuron_dim=1``: the down projection's input channels, GPT-2 ``Conv1D`` fc weights) or an element of a 1-D bias.
The active selection is switched between steps with :meth:`NeuronSparseAdamW.set_selection`, e.g. per language pair
(LANDeRMT: general neurons plus the source's and the target's specific ones).

Two modes:

* ``strict=True`` (default): unselected neurons get no decay, no moment update, no change at all. State is
  compact: each parameter keeps fp32 moments for the union of neurons it has ever trained (``[U, C]`` for row
  neurons, ``[C, U]`` for columns, laid out like the parameter so that a parameter row's selected elements are
  contiguous in the state too) and a step counter per neuron, so bias correction stays right when a neuron trains
  only on some steps. Memory is proportional to that union, not to the parameter.
* ``strict=False``: the original LANDeRMT scripts' behaviour: ``torch.optim.AdamW`` over the masked (and
  optionally scaled) gradient with full-size state, so masked rows still decay and move on stale moments.

All updates of a param group run through one ``sparse_adamw_multi_`` call (a single kernel launch on CUDA), two
when some parameters carry compact gradients.

Compact gradients (strict mode): a weight trained through :func:`~mmt_kernels.sparse_linear` has no ``.grad`` but
``weight.compact_grad``, fp32 ``[K, C]`` (rows) or ``[C, K]`` (columns), one entry per neuron of its current
selection in sorted order. ``step`` consumes it as it is; the dense ``dW`` never exists. :meth:`clip_grad_norm_` clips
what the optimizer applies: the gradient of the selected neurons only (compact buffers as they are, dense
gradients restricted to the selection; frozen parameters excluded), before any per-neuron scale. So training with
and without compact gradients clips identically.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from .sparse_adamw import sparse_adamw_multi_

__all__ = ["NeuronSparseAdamW"]

# Saved in state_dict()["neuron_sparse"]["state_layout"]. 2: a column-neuron parameter's compact state is
# [C, U]; 1 (checkpoints without the key): it was [U, C], transposed on load.
STATE_LAYOUT = 2


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (FSDP2 parameters and their gradients), else ``t`` itself."""
    if not hasattr(t, "device_mesh"):
        return t
    with torch.no_grad():
        return t.to_local()


def _span(p: torch.Tensor, neuron_dim: int) -> tuple[int, int]:
    """(global index of this process's first neuron of ``p``, global neuron count). FSDP2 shards dim 0: a row
    shard holds neurons [offset, offset + local rows) of a row (or 1-D) parameter and every column neuron."""
    d = neuron_dim if p.dim() == 2 else 0
    if not hasattr(p, "device_mesh"):
        return 0, p.shape[d]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return int(offset[d]), p.shape[d]


def _neurons_and_width(p: torch.Tensor, neuron_dim: int) -> tuple[int, int]:
    """(neurons, width) of ``p``, or of this process's shard of a DTensor ``p``."""
    shape = _local(p).shape
    if len(shape) == 1:
        return shape[0], 1
    if len(shape) != 2:
        raise ValueError(f"NeuronSparseAdamW: parameters must be 1-D or 2-D, got shape {tuple(shape)}")
    return shape[neuron_dim], shape[1 - neuron_dim]


class NeuronSparseAdamW(torch.optim.Optimizer):
    """AdamW over selected neurons.

    Args:
        params: parameters or param groups (keys ``lr``, ``betas``, ``eps``, ``weight_decay``, ``neuron_dim``).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay, default 0.01).
        neuron_dim: default neuron axis of 2-D params (0 = rows, 1 = columns); per group via the group key, per
            parameter via ``neuron_dims={param: dim}``.
        strict: see the module docstring.
        backend: force an ``mmt_kernels`` backend (``None`` = automatic).

    With no selection set for a parameter, all its neurons train (plain AdamW). ``set_selection`` replaces the
    selection of the parameters it names; an empty index tensor freezes a parameter for the next steps.

    DTensor parameters (FSDP2, sharded on dim 0): every process updates its own shard. Selections are given in
    global neuron indices and kept as this shard's (rows of a row shard; columns keep their indices); the state
    (compact or full) is this shard's alone, never gathered: a column parameter's ``[C, U]`` state is split along
    C like the parameter's rows. After an engine swaps the parameter objects, call
    :meth:`remap_parameters` before the first selection.
    """

    shard_local_state = True  # under FSDP2 the state tensors are plain local shards, not DTensors
    accepts_compact_grad = True  # step() consumes ``p.compact_grad`` (see the module docstring)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        neuron_dim: int = 0,
        neuron_dims: Mapping[torch.Tensor, int] | None = None,
        strict: bool = True,
        backend: str | None = None,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(
                f"NeuronSparseAdamW: lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}"
            )
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"NeuronSparseAdamW: betas must be in [0, 1), got {betas}")
        if neuron_dim not in (0, 1):
            raise ValueError(f"NeuronSparseAdamW: neuron_dim must be 0 or 1, got {neuron_dim}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, neuron_dim=neuron_dim)
        super().__init__(params, defaults)
        self.strict = bool(strict)
        self.backend = backend
        self._dims: dict[torch.Tensor, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                    raise TypeError(f"NeuronSparseAdamW: parameter dtype must be fp32, bf16 or fp16, got {p.dtype}")
                self._dims[p] = group["neuron_dim"]
        for p, d in (neuron_dims or {}).items():
            if p not in self._dims:
                raise ValueError("NeuronSparseAdamW: neuron_dims names a tensor that is not an optimized parameter")
            if d not in (0, 1) or (d == 1 and p.dim() != 2):
                raise ValueError(f"NeuronSparseAdamW: neuron_dim {d} is invalid for shape {tuple(p.shape)}")
            self._dims[p] = d
        for p, d in self._dims.items():
            _neurons_and_width(p, d)  # rejects 3-D+ parameters now rather than at the first step
        self._rows: dict[torch.Tensor, torch.Tensor] = {}  # active selection (sorted int64 on p.device)
        self._pos: dict[torch.Tensor, torch.Tensor] = {}  # its rows in the compact state (strict)
        self._scale: dict[torch.Tensor, torch.Tensor] = {}  # optional fp32 per-selected-neuron grad scale
        self._all: dict[torch.Tensor, torch.Tensor] = {}  # cached arange(R)
        # parameters whose selection is empty: frozen. A shard can hold none of a non-empty selection's neurons:
        # then strict mode leaves it alone, but the non-strict mode still decays and steps all its rows
        self._frozen: set[torch.Tensor] = set()
        # set_selection fast path: the same index/scale tensor objects as a previous call (a method switching
        # between per-pair selections every step) skip validation and host-device copies. Entries keep the
        # source object alive so its id cannot be reused; the union size tells whether positions are stale.
        self._seen: dict[torch.Tensor, dict[tuple[int, int], tuple[Any, Any, torch.Tensor, Any, int]]] = {}

    # ---- selections ---------------------------------------------------------------------------------------------
    def neuron_dim(self, p: torch.Tensor) -> int:
        return self._dims[p]

    def set_selection(
        self,
        selection: Mapping[torch.Tensor, torch.Tensor | None],
        scales: Mapping[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Select the neurons each named parameter trains from the next step on.

        ``selection[p]``: neuron indices (any int tensor/list; sorted and deduplicated here; ``None`` = all
        neurons). ``scales[p]`` (optional): one gradient multiplier per selected neuron, in the sorted order of
        the indices, or one per neuron of the parameter (``[R]``), e.g. LANDeRMT's importance-scaled variant.
        Parameters not named keep their current selection. Validation runs here, on the host, so ``step``
        itself never waits for the device. Passing the very same tensor objects again (e.g. one cached
        selection per language pair) reuses the earlier validation: do not modify them in place.
        """
        scales = scales or {}
        for p in scales:
            if p not in selection:
                raise ValueError(
                    "NeuronSparseAdamW.set_selection: a scale was given for a parameter without a "
                    "selection in the same call"
                )
        for p, rows in selection.items():
            if p not in self._dims:
                raise ValueError("NeuronSparseAdamW.set_selection: tensor is not an optimized parameter")
            scale_in = scales.get(p)
            if rows is not None and torch.as_tensor(rows).numel() == 0:
                self._frozen.add(p)
            else:
                self._frozen.discard(p)
            key = (id(rows), id(scale_in))
            hit = self._seen.get(p, {}).get(key) if rows is not None else None
            if (
                hit is not None
                and hit[0] is rows
                and hit[1] is scale_in
                and (not self.strict or hit[4] == self.state[p]["neurons"].numel())
            ):
                self._rows[p], pos, scale_dev = hit[2], hit[3], hit[5] if len(hit) > 5 else None
                if self.strict:
                    self._pos[p] = pos
                if scale_dev is None:
                    self._scale.pop(p, None)
                else:
                    self._scale[p] = scale_dev
                continue
            start, R = _span(p, self._dims[p])  # global neurons; this process holds [start, start + n_local)
            n_local, _ = _neurons_and_width(p, self._dims[p])
            sharded = start != 0 or n_local != R
            if rows is None:
                self._rows.pop(p, None)
                self._pos.pop(p, None)
                rows_cpu = keep = None
            else:
                rows_cpu = torch.as_tensor(rows).detach().to("cpu", torch.int64).reshape(-1)
                rows_cpu = torch.unique(rows_cpu)  # sorted, deduplicated
                if rows_cpu.numel() and (rows_cpu[0] < 0 or rows_cpu[-1] >= R):
                    raise IndexError(
                        f"NeuronSparseAdamW.set_selection: neuron indices must be in [0, {R}) for a "
                        f"parameter of shape {tuple(p.shape)} (neuron_dim {self._dims[p]}), got "
                        f"[{int(rows_cpu[0])}, {int(rows_cpu[-1])}]"
                    )
                keep = (rows_cpu >= start) & (rows_cpu < start + n_local) if sharded else None
            scale = scales.get(p)
            if scale is None:
                self._scale.pop(p, None)
            else:
                scale = torch.as_tensor(scale).detach().to("cpu", torch.float32).reshape(-1)
                k = R if rows_cpu is None else rows_cpu.numel()
                if scale.numel() == R and rows_cpu is not None and k != R:
                    scale = scale[rows_cpu]
                if scale.numel() != k:
                    raise ValueError(
                        f"NeuronSparseAdamW.set_selection: scale has {scale.numel()} values; expected "
                        f"{k} (one per selected neuron) or {R} (one per neuron)"
                    )
                if sharded:  # this shard's neurons' scales
                    scale = scale[start : start + n_local] if keep is None else scale[keep]
                self._scale[p] = scale.to(p.device)
            if keep is not None:  # global indices -> this shard's
                rows_cpu = rows_cpu[keep] - start
            if rows_cpu is not None:
                self._rows[p] = rows_cpu.to(p.device)
            if self.strict and rows_cpu is not None:
                self._pos[p] = self._grow(p, rows_cpu)
            if rows is not None and isinstance(rows, torch.Tensor):
                cache = self._seen.setdefault(p, {})
                if len(cache) > 256:  # bounded: many distinct ad-hoc selections fall back to the slow path
                    cache.clear()
                cache[key] = (
                    rows,
                    scale_in,
                    self._rows[p],
                    self._pos.get(p),
                    self.state[p]["neurons"].numel() if self.strict else 0,
                    self._scale.get(p),
                )

    def selection(self, p: torch.Tensor) -> torch.Tensor | None:
        """The active neuron indices of ``p`` (None = all)."""
        return self._rows.get(p)

    def _all_rows(self, p: torch.Tensor) -> torch.Tensor:
        rows = self._all.get(p)
        if rows is None:
            R, _ = _neurons_and_width(p, self._dims[p])
            rows = self._all[p] = torch.arange(R, device=p.device)
        return rows

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            R, C = _neurons_and_width(p, self._dims[p])
            if self.strict:
                shape = (0, C) if self._dims[p] == 0 or p.dim() == 1 else (C, 0)  # [U, C] rows, [C, U] columns
                state["neurons"] = torch.empty(0, dtype=torch.int64, device=p.device)
                state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                state["neuron_step"] = torch.zeros(0, dtype=torch.int64, device=p.device)
            else:
                state["exp_avg"] = torch.zeros(_local(p).shape, dtype=torch.float32, device=p.device)
                state["exp_avg_sq"] = torch.zeros(_local(p).shape, dtype=torch.float32, device=p.device)
            state["step"] = 0
            state["neuron_dim"] = self._dims[p]
        return state

    def _grow(self, p: torch.Tensor, rows_cpu: torch.Tensor) -> torch.Tensor:
        """Add ``rows`` to the compact state's neuron union (new neurons start at zero moments, step 0);
        return each selected neuron's state row."""
        state = self._init_state(p)
        neurons = state["neurons"]
        known = neurons.cpu()
        new = rows_cpu[~torch.isin(rows_cpu, known)] if known.numel() else rows_cpu
        if new.numel():
            union = torch.cat([known, new]).sort().values
            old_at = torch.searchsorted(union, known).to(p.device)
            _, C = _neurons_and_width(p, self._dims[p])
            columns = self._columns(p)
            moments = (C, union.numel()) if columns else (union.numel(), C)
            for key, shape in (("exp_avg", moments), ("exp_avg_sq", moments), ("neuron_step", (union.numel(),))):
                grown = torch.zeros(shape, dtype=state[key].dtype, device=p.device)
                if columns and key != "neuron_step":
                    grown[:, old_at] = state[key]
                else:
                    grown[old_at] = state[key]
                state[key] = grown
            state["neurons"] = neurons = union.to(p.device)
            known = union
        return torch.searchsorted(known, rows_cpu).to(p.device)

    def _columns(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s neurons are columns: its compact state and gradient are then [C, U] / [C, K]."""
        return self._dims[p] == 1 and p.dim() == 2

    # ---- gradients ----------------------------------------------------------------------------------------------
    def _applied_grad(self, p: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        """(the gradient ``step`` applies to ``p``, whether it is compact); None when ``p`` does not step."""
        cg = getattr(p, "compact_grad", None)
        if cg is not None and p.grad is not None:
            raise RuntimeError(
                "NeuronSparseAdamW: a parameter has both .grad and .compact_grad; route it through one path"
            )
        if cg is None and p.grad is None:
            return None, False
        rows = self._rows.get(p)
        if rows is not None and rows.numel() == 0 and (self.strict or p in self._frozen):
            return None, False  # frozen for this selection (strict: no selected neuron on this shard)
        if cg is None:
            return p.grad, False
        if not self.strict:
            raise RuntimeError(
                "NeuronSparseAdamW(strict=False) needs dense gradients (it masks them); got compact_grad"
            )
        R, C = _neurons_and_width(p, self._dims[p])
        k = R if rows is None else rows.numel()
        want = (C, k) if self._columns(p) else (k, C)
        if cg.dtype != torch.float32 or cg.shape != want:
            raise RuntimeError(
                f"NeuronSparseAdamW: compact_grad of a parameter of shape {tuple(p.shape)} is {cg.dtype} "
                f"{tuple(cg.shape)}; the current selection needs fp32 [{want[0]}, {want[1]}] (was the selection "
                "changed between the backward and the step?)"
            )
        return cg, True

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the gradients this optimizer applies to a total ``norm_type`` norm of at most ``max_norm``
        (``torch.nn.utils.clip_grad_norm_``'s formula) and return their norm before clipping.

        Counted: compact gradients whole; dense gradients of parameters with a selection only at the selected
        neurons; other dense gradients whole; frozen parameters (empty selection) not at all. Dense gradients
        are scaled whole (their unselected entries are never applied)."""
        counted, scaled, mesh = [], [], None
        for group in self.param_groups:
            for p in group["params"]:
                g, compact = self._applied_grad(p)
                if g is None:
                    continue
                if hasattr(g, "device_mesh"):  # FSDP2: this shard's part; the norm is reduced over shards below
                    mesh = g.device_mesh
                g = _local(g)
                scaled.append(g)
                rows = self._rows.get(p)
                if compact or rows is None:
                    counted.append(g)
                else:
                    nd = self._dims[p] if g.dim() == 2 else 0
                    counted.append(g.index_select(nd, rows))  # rows are this shard's (see set_selection)
        if not counted and mesh is None:
            return torch.zeros(())
        device = counted[0].device if counted else scaled[0].device
        norms = torch._foreach_norm(counted, norm_type) if counted else []
        stacked = torch.stack([n.float() for n in norms]) if norms else torch.zeros(1, device=device)
        p_inf = norm_type == float("inf")
        if mesh is None:
            total = torch.linalg.vector_norm(stacked, norm_type)
        else:
            import torch.distributed as dist

            part = stacked.max() if p_inf else stacked.pow(norm_type).sum()
            dist.all_reduce(part, op=dist.ReduceOp.MAX if p_inf else dist.ReduceOp.SUM, group=mesh.get_group())
            total = part if p_inf else part.pow(1.0 / norm_type)
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        if scaled:
            torch._foreach_mul_(scaled, coef)
        return total

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                cg = getattr(p, "compact_grad", None)
                if cg is not None:
                    if set_to_none:
                        p.compact_grad = None
                    else:
                        cg.zero_()

    # ---- the step -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            by_device: dict[tuple[torch.device, bool], dict[str, list]] = {}
            for p in group["params"]:
                grad, compact_grad = self._applied_grad(p)
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("NeuronSparseAdamW does not take sparse gradients")
                rows = self._rows.get(p)
                state = self._init_state(p)
                lists = by_device.setdefault(
                    (p.device, compact_grad),
                    {
                        k: []
                        for k in (
                            "params",
                            "exp_avgs",
                            "exp_avg_sqs",
                            "grads",
                            "rows",
                            "state_rows",
                            "row_scales",
                            "row_steps",
                            "neuron_dims",
                            "owners",
                        )
                    },
                )
                if not compact_grad:  # compact gradients are never DTensors (dense dW under FSDP2)
                    grad = _local(grad)
                    if grad.dtype != p.dtype:
                        grad = grad.to(p.dtype)
                grad = grad.contiguous()
                scale = self._scale.get(p)
                state["step"] += 1
                if self.strict:
                    if rows is None:
                        rows = self._all_rows(p)
                        pos = self._pos.get(p)
                        if pos is None or pos.numel() != rows.numel():
                            pos = self._pos[p] = self._grow(p, rows.cpu())
                    else:
                        pos = self._pos[p]
                    # per-neuron step counts: a neuron's bias correction follows how often *it* trained
                    state["neuron_step"].index_add_(0, pos, torch.ones_like(pos))
                    lists["state_rows"].append(pos)
                    lists["row_steps"].append(state["neuron_step"][pos])
                    lists["row_scales"].append(scale)
                else:
                    # original LANDeRMT: AdamW over the masked (scaled) gradient; every row steps and decays
                    grad = self._masked_grad(p, grad, rows, scale)
                    rows = self._all_rows(p)
                    lists["state_rows"].append(None)
                    lists["row_steps"].append(None)
                    lists["row_scales"].append(None)
                lists["params"].append(_local(p))
                lists["owners"].append(p)
                lists["exp_avgs"].append(state["exp_avg"])
                lists["exp_avg_sqs"].append(state["exp_avg_sq"])
                lists["grads"].append(grad)
                lists["rows"].append(rows)
                lists["neuron_dims"].append(self._dims[p])
            for (_, compact_grad), lists in by_device.items():
                if self.strict:
                    sparse_adamw_multi_(
                        lists["params"],
                        lists["exp_avgs"],
                        lists["exp_avg_sqs"],
                        lists["grads"],
                        lists["rows"],
                        lr=group["lr"],
                        beta1=beta1,
                        beta2=beta2,
                        eps=group["eps"],
                        weight_decay=group["weight_decay"],
                        step=1,
                        neuron_dims=lists["neuron_dims"],
                        state_rows=lists["state_rows"],
                        row_scales=lists["row_scales"],
                        row_steps=lists["row_steps"],
                        compact=True,
                        compact_grad=compact_grad,
                        backend=self.backend,
                        validate=False,
                    )  # set_selection validated them
                else:  # one global step count per param in this mode; group params by it
                    by_step: dict[int, list[int]] = {}
                    for i, p in enumerate(lists["owners"]):
                        by_step.setdefault(self.state[p]["step"], []).append(i)
                    for step, idx in by_step.items():
                        pick = lambda k: [lists[k][i] for i in idx]  # noqa: E731
                        sparse_adamw_multi_(
                            pick("params"),
                            pick("exp_avgs"),
                            pick("exp_avg_sqs"),
                            pick("grads"),
                            pick("rows"),
                            lr=group["lr"],
                            beta1=beta1,
                            beta2=beta2,
                            eps=group["eps"],
                            weight_decay=group["weight_decay"],
                            step=step,
                            neuron_dims=pick("neuron_dims"),
                            compact=False,
                            backend=self.backend,
                            validate=False,
                        )
        return loss

    def _masked_grad(self, p, grad, rows, scale):
        if rows is None and scale is None:
            return grad
        d = self._dims[p] if p.dim() == 2 else 0
        R, _ = _neurons_and_width(p, self._dims[p])
        factor = torch.zeros(R, dtype=torch.float32, device=p.device)
        if rows is None:
            rows = self._all_rows(p)
        factor[rows] = 1.0 if scale is None else scale
        shape = [1] * grad.dim()
        shape[d] = R
        return (grad.float() * factor.view(shape)).to(grad.dtype)

    def remap_parameters(self, mapping: Mapping[torch.Tensor, torch.Tensor]) -> None:
        """Re-key the per-parameter bookkeeping after an engine replaced parameter objects (accelerate's FSDP2
        ``prepare`` swaps each for a DTensor shard and switches ``param_groups`` itself). Before any selection."""
        moved = [p for p in self._dims if p in mapping]
        if any(p in self._rows or p in self._scale or self.state.get(p) for p in moved):
            raise RuntimeError("NeuronSparseAdamW.remap_parameters: call it before set_selection and step")
        for p in moved:
            self._dims[mapping[p]] = self._dims.pop(p)
            self._all.pop(p, None), self._seen.pop(p, None), self.state.pop(p, None), self._frozen.discard(p)

    # ---- (de)serialisation --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        sd["neuron_sparse"] = {
            "strict": self.strict,
            "selection": {index[p]: r.cpu() + _span(p, self._dims[p])[0] for p, r in self._rows.items()},  # global
            "scale": {index[p]: s.cpu() for p, s in self._scale.items()},
            "frozen": sorted(index[p] for p in self._frozen),
            "state_layout": STATE_LAYOUT,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("neuron_sparse", {})
        if extra and bool(extra.get("strict")) != self.strict:
            raise ValueError(
                f"NeuronSparseAdamW.load_state_dict: checkpoint has strict={extra.get('strict')}, "
                f"this optimizer strict={self.strict}"
            )
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(saved_ids) != len(params):
            raise ValueError(
                f"NeuronSparseAdamW.load_state_dict: {len(saved_ids)} saved parameters, {len(params)} here"
            )
        layout = int(extra.get("state_layout", 1))
        if layout not in (1, STATE_LAYOUT):
            raise ValueError(
                f"NeuronSparseAdamW.load_state_dict: unknown state_layout {layout} (this version reads 1 and "
                f"{STATE_LAYOUT}); was the checkpoint written by a newer mmt_kernels?"
            )
        base = {k: v for k, v in state_dict.items() if k != "neuron_sparse"}
        super().load_state_dict(base)
        # torch casts floating state to the param dtype; the moments here are fp32 whatever the param: restore
        for sid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(sid)
            if saved is None:
                continue
            st = self.state[p]
            for k, v in saved.items():
                st[k] = v.detach().clone().to(p.device) if isinstance(v, torch.Tensor) else v
            if st.get("neuron_dim", self._dims[p]) != self._dims[p]:
                raise ValueError(
                    f"NeuronSparseAdamW.load_state_dict: parameter {sid} was trained with "
                    f"neuron_dim {st['neuron_dim']}, here {self._dims[p]}"
                )
            if self.strict and "neurons" in st:
                self._check_compact_state(p, sid, st, layout)
        self._rows.clear(), self._pos.clear(), self._scale.clear(), self._seen.clear(), self._frozen.clear()
        sel = {params[saved_ids.index(i)]: r for i, r in extra.get("selection", {}).items()}
        scl = {params[saved_ids.index(i)]: s for i, s in extra.get("scale", {}).items()}
        if sel:
            self.set_selection(sel, {p: s for p, s in scl.items() if p in sel})
        if "frozen" in extra:  # a shard's empty part of a selection is not a frozen parameter
            self._frozen = {params[saved_ids.index(i)] for i in extra["frozen"]}

    def _check_compact_state(self, p: torch.Tensor, sid: Any, st: dict[str, Any], layout: int) -> None:
        """A loaded compact state in this version's layout: a layout-1 column state ([U, C]) is transposed; any
        other shape is refused (a wrong layout would load silently wrong)."""
        _, C = _neurons_and_width(p, self._dims[p])
        U = st["neurons"].numel()
        columns = self._columns(p)
        if columns and layout == 1:
            for key in ("exp_avg", "exp_avg_sq"):
                if st[key].shape == (U, C):
                    st[key] = st[key].t().contiguous()
        want = (C, U) if columns else (U, C)
        for key in ("exp_avg", "exp_avg_sq"):
            if tuple(st[key].shape) != want:
                raise ValueError(
                    f"NeuronSparseAdamW.load_state_dict: parameter {sid} (shape {tuple(p.shape)}, neuron_dim "
                    f"{self._dims[p]}) has {key} of shape {tuple(st[key].shape)}; expected [{want[0]}, {want[1]}] "
                    f"({'[C, U]' if columns else '[U, C]'} for its {U} state neurons)"
                )

    def state_bytes(self) -> int:
        """Bytes of optimizer state tensors (moments, neuron indices, step counters)."""
        return sum(
            v.numel() * v.element_size()
            for st in self.state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor)
        )

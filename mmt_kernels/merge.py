"""Family 3: batched weight merging (linear, task arithmetic, TIES, DARE) over K tensors.

``merge(tensors, base, method=...)`` merges K same-shape tensors of fine-tuned models (or K task
vectors when ``base`` is None) in one fused pass per output element with fp32 accumulation; see
:mod:`mmt_kernels.reference.merge` for the exact definitions. TIES thresholds come from
``magnitude_threshold`` (radix select, no sort), which ``merge`` calls for you when ``method='ties'``.

Example::

    from mmt_kernels import merge_tensors
    merged = merge_tensors([w_de, w_fr, w_zh], base=w0, method="ties", density=0.2, weights=[1, 1, 1])
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._registry import OpSpec, register
from .reference import merge as _ref

METHODS = _ref.METHODS
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _threshold_fake(tensors, base, ks):
    return tensors[0].new_empty((len(tensors),), dtype=torch.float32)


def _merge_reference(tensors, base, weights, thresholds, densities, method, lam, seed, sign_by_count):
    return _ref.merge(
        tensors, base, weights, thresholds, densities, method=method, lam=lam, seed=seed, sign_by_count=sign_by_count
    )


def _merge_fake(tensors, base, weights, thresholds, densities, method, lam, seed, sign_by_count):
    return torch.empty_like(tensors[0], memory_format=torch.contiguous_format)


# fp64 is the reference's golden mode only.
MERGE_THRESHOLD = register(
    OpSpec(
        name="merge_threshold",
        schema="(Tensor[] tensors, Tensor? base, int[] ks) -> Tensor",
        reference=_ref.magnitude_threshold,
        fake=_threshold_fake,
        triton="merge:magnitude_threshold",
        fp64=("reference",),
    )
)
MERGE = register(
    OpSpec(
        name="merge",
        schema="(Tensor[] tensors, Tensor? base, float[] weights, Tensor? thresholds, float[] densities, str method, "
        "float lam, int seed, bool sign_by_count) -> Tensor",
        reference=_merge_reference,
        fake=_merge_fake,
        triton="merge:merge",
        fp64=("reference",),
    )
)


CUDA_MAX_TASKS = 32  # the CUDA kernels take their K pointers as kernel arguments (kMergeMaxTasks)


def _unable(K: int) -> tuple[str, ...]:
    return ("cuda",) if K > CUDA_MAX_TASKS else ()


def _as_list(tensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):  # stacked [K, ...]: views, no copy
        return list(tensors.unbind(0))
    return list(tensors)


def _check(op: str, tensors: list[torch.Tensor], base: torch.Tensor | None) -> None:
    """Python-side checks shared by every backend, so the reference fails as clearly as the kernels."""
    if not tensors:
        raise ValueError(f"{op}: needs at least one tensor")
    t0 = tensors[0]
    if t0.dtype not in _DTYPES + (torch.float64,):
        raise TypeError(f"{op}: tensors must be fp32, bf16 or fp16 (fp64 for the reference), got {t0.dtype}")
    for k, t in enumerate(tensors):
        if t.shape != t0.shape:
            raise ValueError(f"{op}: tensors[{k}] has shape {tuple(t.shape)}, tensors[0] {tuple(t0.shape)}")
        if t.dtype != t0.dtype:
            raise TypeError(f"{op}: tensors[{k}] is {t.dtype}, tensors[0] {t0.dtype}; convert them to one dtype")
        if t.device != t0.device:
            raise ValueError(f"{op}: tensors[{k}] is on {t.device}, tensors[0] on {t0.device}")
    if base is not None:
        if base.shape != t0.shape:
            raise ValueError(f"{op}: base has shape {tuple(base.shape)}, tensors {tuple(t0.shape)}")
        if base.dtype != t0.dtype:
            raise TypeError(f"{op}: base is {base.dtype}, tensors {t0.dtype}; convert them to one dtype")
        if base.device != t0.device:
            raise ValueError(f"{op}: base is on {base.device}, tensors on {t0.device}")
    if t0.numel() >= 1 << 32:
        raise ValueError(f"{op}: tensors of 2^32 or more elements are not supported ({t0.numel()})")


def _per_task(name: str, value, K: int) -> list[float]:
    if value is None:
        raise ValueError(f"merge: {name} is required for this method")
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (int, float)):
        return [float(value)] * K
    value = [float(v) for v in value]
    if len(value) != K:
        raise ValueError(f"merge: {len(value)} {name} for {K} tensors")
    return value


def magnitude_threshold(
    tensors: Sequence[torch.Tensor] | torch.Tensor,
    base: torch.Tensor | None = None,
    *,
    density: float | Sequence[float],
    backend: str | None = None,
) -> torch.Tensor:
    """fp32 [K]: per task, the smallest magnitude TIES keeps at ``density`` (the floor(density*numel)-th
    largest ``|x_k - base|``); +inf where that count is 0. Exact, by radix select on the bit patterns."""
    tensors = [t.contiguous() for t in _as_list(tensors)]
    base = base.contiguous() if base is not None else None
    _check("magnitude_threshold", tensors, base)
    dens = _per_task("density", density, len(tensors))
    n = tensors[0].numel()
    for d in dens:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"magnitude_threshold: density must be in [0, 1], got {d}")
    ks = [int(d * n) for d in dens]  # peft's k = int(density * numel)
    which = MERGE_THRESHOLD.choose(tensors[0].device, backend, tensors[0].dtype, _unable(len(tensors)))
    return MERGE_THRESHOLD(which, tensors, base, ks)


def merge(
    tensors: Sequence[torch.Tensor] | torch.Tensor,
    base: torch.Tensor | None = None,
    *,
    method: str,
    weights: float | Sequence[float] | torch.Tensor | None = None,
    density: float | Sequence[float] = 1.0,
    lam: float = 1.0,
    seed: int = 0,
    sign: str = "total",
    thresholds: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Merge K same-shape tensors into one; returns a new tensor in the inputs' dtype.

    tensors: K fine-tuned tensors (a list, or one stacked ``[K, ...]`` tensor), or task vectors when
        ``base`` is None.
    base: the pre-trained tensor; task vectors are ``tensors[k] - base``. ``linear`` ignores it.
    method: ``linear`` | ``task_arithmetic`` | ``ties`` | ``dare_linear`` | ``dare_ties``.
    weights: one per tensor (default: 1/K for ``linear``, 1 otherwise, as in peft).
    density: TIES: fraction of largest-magnitude entries each task keeps; DARE: keep probability.
        A float or one per tensor.
    lam: scale of the merged task vector (TIES's lambda); unused by ``linear``.
    seed: DARE's drop mask is a hash of (seed, task index, element index): reproducible on every backend.
    sign: ``total`` (elect the sign of the summed trimmed values) or ``count`` (of the summed signs).
    thresholds: precomputed fp32 [K] TIES thresholds (see :func:`magnitude_threshold`).
    """
    if method not in METHODS:
        raise ValueError(f"merge: unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if sign not in ("total", "count"):
        raise ValueError(f"merge: sign must be 'total' or 'count', got {sign!r}")
    tensors = [t.contiguous() for t in _as_list(tensors)]
    base = base.contiguous() if base is not None else None
    _check("merge", tensors, base)
    K = len(tensors)
    w = _per_task("weights", (1.0 / K if method == "linear" else 1.0) if weights is None else weights, K)
    dens = _per_task("density", density, K)
    if method.startswith("dare"):
        for d in dens:
            if not 0.0 < d <= 1.0:
                raise ValueError(f"merge: DARE density must be in (0, 1], got {d}")
    if method == "ties" and thresholds is None:
        thresholds = magnitude_threshold(tensors, base, density=dens, backend=backend)
    if thresholds is not None:
        if thresholds.numel() != K:
            raise ValueError(f"merge: thresholds has {thresholds.numel()} entries for {K} tensors")
        thresholds = thresholds.to(
            device=tensors[0].device, dtype=torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
        )
        thresholds = thresholds.contiguous()
    which = MERGE.choose(tensors[0].device, backend, tensors[0].dtype, _unable(K))
    use_thr = thresholds if method == "ties" else None
    return MERGE(which, tensors, base, w, use_thr, dens, method, float(lam), int(seed), sign == "count")


def dare_keep_mask(
    numel: int, task: int, seed: int, density: float, device=None, backend: str | None = None
) -> torch.Tensor:
    """bool [numel]: the elements of task ``task`` that DARE keeps (identical on every backend).

    On a kernel backend the mask is read off the fused DARE itself: a ``dare_linear`` merge of ``task`` zero
    tensors and one tensor of ones is nonzero exactly where task ``task`` keeps an element (its hash key
    depends on the seed and the task index only). That is one vectorised pass per input instead of the
    reference's two hashes in int64 tensor ops, ~50x slower.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"dare_keep_mask: density must be in [0, 1], got {density}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if density == 0.0:
        return torch.zeros(numel, dtype=torch.bool, device=device)
    K = task + 1
    which = MERGE.choose(device, backend, torch.float32, _unable(K))
    if which == "reference" or numel == 0:
        return _ref.dare_keep_mask(numel, task, seed, density, device)
    zeros = torch.zeros(numel, dtype=torch.float32, device=device)
    ones = torch.ones(numel, dtype=torch.float32, device=device)
    dens = [1.0] * task + [float(density)]
    out = MERGE(which, [zeros] * task + [ones], None, [1.0] * K, None, dens, "dare_linear", 1.0, int(seed), False)
    return out != 0

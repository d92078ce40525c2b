"""Merge methods on one tensor: the settings of a merge config applied through ``mmt_kernels.merge``."""
from __future__ import annotations

import torch

import mmt_kernels.merge as kmerge  # looked up at call time, so the kernel entry point can be wrapped


def merge_tensor(xs: list[torch.Tensor], base: torch.Tensor | None, *, method: str, weights: list[float],
                 densities: list[float], lam: float, seed: int, sign: str, backend: str | None) -> torch.Tensor:
    """One merged tensor from K inputs of one dtype and device (task vectors when ``base`` is None)."""
    return kmerge.merge(xs, base, method=method, weights=weights, density=densities, lam=lam, seed=seed, sign=sign,
                        backend=backend)


def sign_conflict(task_vectors: list[torch.Tensor]) -> dict[str, float]:
    """Among elements where at least two tasks are nonzero, the fraction whose signs disagree."""
    pos = sum((t > 0).to(torch.int32) for t in task_vectors)
    neg = sum((t < 0).to(torch.int32) for t in task_vectors)
    active = (pos + neg) >= 2
    n_active = int(active.sum())
    conflict = int((active & (pos > 0) & (neg > 0)).sum())
    return {"sign_conflict": conflict / max(n_active, 1), "active_fraction": n_active / max(pos.numel(), 1)}

"""Reference for family 3: merging K fine-tuned tensors (or task vectors) into one.

Definitions follow the published methods as implemented in ``peft.utils.merge_utils``:

* ``linear``:          out = sum_k w_k x_k                       (x are full models; ``base`` unused)
* ``task_arithmetic``: out = base + lam * sum_k w_k tau_k,       tau_k = x_k - base (or x_k without base)
* ``ties`` (Yadav et al. 2023): trim tau_k to its top-``density`` magnitudes (per tensor, per task),
  elect a sign per element from the *unweighted* trimmed values (``total``: sign of their sum; ``count``:
  sign of the sum of their signs; a tie elects +), then average the weighted values that agree with it:
  out = base + lam * sum_k w_k t_k [sign t_k == g] / max(1, #agreeing)
* ``dare_linear`` / ``dare_ties`` (Yu et al. 2024): drop each tau_k element with probability 1 - p_k and
  rescale the survivors by 1/p_k, then task arithmetic / the TIES sign election and disjoint mean.

Differences from peft, on purpose:
* TIES keeps every element with |tau| >= the k-th largest magnitude (k = floor(density * numel)), so
  elements tied with the threshold are all kept; ``torch.topk`` keeps exactly k and breaks ties
  arbitrarily. The threshold makes every backend keep the same elements.
* DARE's drop mask is a counter-based hash of (seed, task, element index), not ``torch.bernoulli``:
  the same seed drops the same elements on every backend and device, whatever the tiling.
* DARE rescales by multiplying with fp32(1/p) (peft divides by p): at most 1 ulp apart.

The loops are over k in order and the accumulators start from the first term, so fp32 results are
reproduced exactly by kernels that keep the same order, and ``linear`` of one model with weight 1 is
bit-identical to that model. fp64 inputs are computed in fp64 (golden results for tests).
"""

from __future__ import annotations

import torch

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
MASK32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding uint32 values (a bijection on 32 bits)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & MASK32
    return h ^ (h >> 16)


def task_key(seed: int, task: int) -> int:
    """Per-(seed, task) 32-bit key of the DARE hash; every backend derives it the same way."""
    k = _fmix32(torch.tensor((task + 0x9E3779B9) & MASK32, dtype=torch.int64))
    return int(_fmix32((k ^ (seed & MASK32)) & MASK32))


def keep_threshold24(p: float) -> int:
    """An element survives DARE iff (hash >> 8) < this: a 24-bit fixed-point keep probability."""
    return min(1 << 24, int(p * (1 << 24)))


def dare_keep_mask(numel: int, task: int, seed: int, density: float, device=None) -> torch.Tensor:
    """bool [numel]: which elements of task ``task`` survive DARE's drop with keep probability ``density``."""
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    key = task_key(seed, task)
    h = _fmix32(idx ^ key)
    h = _fmix32((h + key) & MASK32)
    return (h >> 8) < keep_threshold24(density)


def magnitude_threshold(tensors, base=None, ks=None) -> torch.Tensor:
    """[K]: the ks[k]-th largest |x_k - base| (|x_k| without base); +inf where ks[k] == 0 (keep nothing).

    fp32 result (fp64 for fp64 inputs); differences are formed in that precision.
    """
    acc = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    out = torch.empty(len(tensors), dtype=acc, device=tensors[0].device)
    for k, x in enumerate(tensors):
        tau = x.to(acc) - base.to(acc) if base is not None else x.to(acc)
        mag = tau.abs().flatten()
        n, kk = mag.numel(), int(ks[k])
        if not 0 <= kk <= n:
            raise ValueError(f"magnitude_threshold: ks[{k}]={kk} outside [0, {n}]")
        out[k] = float("inf") if kk == 0 else mag.kthvalue(n - kk + 1).values
    return out


def merge(
    tensors,
    base=None,
    weights=None,
    thresholds=None,
    densities=None,
    *,
    method: str,
    lam: float = 1.0,
    seed: int = 0,
    sign_by_count: bool = False,
) -> torch.Tensor:
    """Merge ``tensors`` (K same-shape tensors) as described in the module docstring.

    ``weights``: K floats. ``thresholds``: [K] magnitudes for ``ties`` (see :func:`magnitude_threshold`).
    ``densities``: K keep probabilities in (0, 1] for the ``dare_*`` methods. Returns base's dtype
    (the tensors' dtype without base).
    """
    if method not in METHODS:
        raise ValueError(f"merge: unknown method {method!r}; expected one of {METHODS}")
    acc = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    dev = tensors[0].device
    w = torch.tensor(weights, dtype=acc, device=dev)
    b = base.to(acc) if base is not None and method != "linear" else None
    ties_like = method in ("ties", "dare_ties")
    total = elect = count = None
    for k, x in enumerate(tensors):
        t = x.to(acc)
        if method == "linear":
            term = w[k] * t
            total = term if total is None else total + term
            continue
        if b is not None:
            t = t - b
        if method == "ties":
            t = torch.where(t.abs() >= thresholds[k].to(acc), t, torch.zeros_like(t))
        elif method.startswith("dare"):
            keep = dare_keep_mask(t.numel(), k, seed, densities[k], dev).view(t.shape)
            scale = torch.tensor(1.0 / densities[k], dtype=torch.float64).to(acc)
            t = torch.where(keep, t * scale.to(dev), torch.zeros_like(t))
        if not ties_like:
            term = w[k] * t
            total = term if total is None else total + term
        else:
            vote = t.sign() if sign_by_count else t
            elect = vote if elect is None else elect + vote
            # Keep the weighted values per sign; the election picks one side once all K are seen.
            pos = torch.where(t > 0, w[k] * t, torch.zeros_like(t))
            neg = torch.where(t < 0, w[k] * t, torch.zeros_like(t))
            cpos = (t > 0).to(acc)
            cneg = (t < 0).to(acc)
            if count is None:
                total, count = (pos, neg), (cpos, cneg)
            else:
                total, count = (total[0] + pos, total[1] + neg), (count[0] + cpos, count[1] + cneg)
    if method == "linear":
        return total.to(tensors[0].dtype)
    if ties_like:
        up = elect >= 0
        merged = torch.where(up, total[0] / count[0].clamp_min(1), total[1] / count[1].clamp_min(1))
    else:
        merged = total
    out = b + lam * merged if b is not None else lam * merged
    return out.to(base.dtype if base is not None else tensors[0].dtype)

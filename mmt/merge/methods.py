"""Merge methods on one tensor, built on ``mmt_kernels.merge``.

Task-vector methods are three steps per tensor: each task vector ``tau_k = x_k - base`` is sparsified,
the survivors are combined (summed, or, for the consensus methods, a sign is elected per element and
only the task values that agree with it are averaged), and the result is added to the base:

* ``linear``, ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``: the fused kernel does all three
  (see ``mmt_kernels.reference.merge`` for the exact definitions).
* ``ties`` with ``tie_break: exact_k`` keeps exactly ``k = max(1, floor(density * numel))`` entries per task,
  the entries tied at the cut-off chosen as ``torch.argsort(|tau|, descending=True)`` orders them, which is
  mergekit's selection. ``tie_break: threshold`` (default) keeps every entry at or above the k-th largest
  magnitude, so ties at the cut-off are all kept and every backend agrees without sorting.
* ``breadcrumbs`` (Davari & Belilovsky, 2023): per task, drop the ``gamma`` fraction of largest magnitudes
  (outliers) and then the smallest, keeping ``floor(density * numel)`` entries; then task arithmetic.
  ``breadcrumbs_ties`` combines the survivors by TIES sign election. ``tie_break`` applies at both cut-offs.
* ``della`` (Deep et al., 2024, MagPrune): within each row, an entry's keep probability rises linearly with
  its magnitude rank (ties ranked by index) from ``density - epsilon`` (smallest) to ``density + epsilon``
  (largest); survivors are divided by their keep probability; then TIES sign election (``della``) or a
  sum (``della_linear``). The draw is a CPU generator seeded from ``seed``, the task and the tensor name.
* ``slerp``: spherical interpolation of the flattened tensors from the base (``t = 0``) to the one model
  (``t = 1``); nearly collinear pairs (|cos| > 0.9995) are interpolated linearly.
* ``model_stock`` (Jang et al., 2024): ``t = K cos / (1 + (K - 1) cos)`` from the mean pairwise cosine of the
  task vectors (per row with ``filter_wise``); out = t * mean(x_k) + (1 - t) * base.
* ``nuslerp`` (mergekit's NuSLERP): spherical interpolation of exactly two models at ``t = w_1 / (w_0 + w_1)``
  from the two models' ``weight`` (0.5 when they sum to ~0); with a base_model, of their task vectors, added
  to the base. ``nuslerp_flatten: true`` (default) treats the tensor as one vector; ``false`` interpolates each
  vector along the last dim (each row of a matrix), or along dim 0 (each column) with ``nuslerp_row_wise: true``,
  mergekit's naming. Vectors with ``1 - cos^2 <= 1e-16`` are interpolated linearly.
* ``sce`` (Wan et al., 2024, FuseChat, arXiv:2408.07990): Select the ``select_topk`` fraction of the elements
  whose task values vary most across the models (population variance, ``k = floor(select_topk * nonzero)``,
  ``torch.topk`` order at ties, as mergekit); Calculate each model's weight as its mean squared selected task
  value over the sum of these; Erase the values whose sign disagrees with the sign of their sum (``sign: count``:
  of their signs' sum); the merge is base + lam * the weighted mean of the surviving values (weights of the
  surviving models only), mergekit's ``sce``. Takes no ``weight``.

``semantics: mergekit`` (set when a mergekit config is read) follows mergekit where it differs: weights
enter the sign vote and the consensus mean divides by the agreeing tasks' weights; ``normalize`` and
``rescale`` default per method as there (DARE and breadcrumbs sum without normalizing; DARE and DELLA
rescale survivors to the task vector's L1 norm). With unit weights and the default settings, TIES is
the same formula in both, and the fused kernel computes it.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import torch

import mmt_kernels.merge as kmerge  # looked up at call time, so the kernel entry point can be wrapped
from mmt.errors import MergeError

if TYPE_CHECKING:
    from .plan import MergeConfig, TensorSettings

_CONSENSUS = ("ties", "dare_ties", "breadcrumbs_ties", "della")
# mergekit's per-method defaults of `normalize` and `rescale`.
_MERGEKIT_NORMALIZE = {
    "linear": True,
    "task_arithmetic": False,
    "ties": True,
    "dare_ties": False,
    "dare_linear": False,
    "breadcrumbs": False,
    "breadcrumbs_ties": False,
    "della": True,
    "della_linear": False,
}
_MERGEKIT_RESCALE = {"dare_ties": True, "dare_linear": True, "della": True, "della_linear": True}


def kernel_merge(
    xs: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    method: str,
    weights: list[float],
    densities: list[float],
    lam: float,
    seed: int,
    sign: str,
    backend: str | None,
    thresholds: torch.Tensor | None = None,
) -> torch.Tensor:
    """One merged tensor from K inputs of one dtype and device (task vectors when ``base`` is None)."""
    return kmerge.merge(
        xs,
        base,
        method=method,
        weights=weights,
        density=densities,
        lam=lam,
        seed=seed,
        sign=sign,
        backend=backend,
        thresholds=thresholds,
    )


def _kth_largest(xs: list[torch.Tensor], base: torch.Tensor | None, ks: list[int], backend) -> torch.Tensor:
    """fp32 [K]: the ks[k]-th largest |x_k - base| (+inf where ks[k] == 0), by the kernels' radix select."""
    n = xs[0].numel()
    # magnitude_threshold takes densities and floors density * numel; the half step makes that floor exact.
    dens = [min(1.0, (k + 0.5) / n) for k in ks]
    return kmerge.magnitude_threshold(xs, base, density=dens, backend=backend)


def _magnitudes(x: torch.Tensor, base: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """|x - base| as mergekit ranks it: the difference in the compute dtype, the magnitude in fp32."""
    return (x.to(work) - base.to(work)).abs().float().reshape(-1)


def _top_k_mask(w: torch.Tensor, k: int, thr: float, exact: bool) -> torch.Tensor:
    """bool: the k largest of ``w`` (exact) or every entry >= thr, the k-th largest (threshold)."""
    keep = w >= thr
    if exact and int(keep.sum()) > k:  # ties at the cut-off: keep the ones argsort puts first
        keep = torch.zeros_like(keep)
        keep[torch.argsort(w, descending=True)[:k]] = True
    return keep


def _ties_exact_k(xs, b, dens, work, backend) -> list[torch.Tensor]:
    n = xs[0].numel()
    ks = [0 if d <= 0 else n if d >= 1 else max(1, int(d * n)) for d in dens]
    out = []
    for x, k in zip(xs, ks):
        w = _magnitudes(x, b, work)
        thr = float(_kth_largest([w], None, [k], backend)[0])
        keep = _top_k_mask(w, k, thr, exact=True) if k else torch.zeros_like(w, dtype=torch.bool)
        out.append(torch.where(keep.view(x.shape), x, b))
        del w, keep
    return out


def _breadcrumbs_masks(xs, b, dens, gammas, work, exact: bool, backend) -> list[torch.Tensor]:
    n = xs[0].numel()
    out = []
    for x, d, g in zip(xs, dens, gammas):
        keep_n = int(d * n)
        drop_low = max(0, n - keep_n - int(g * n))  # fewer outliers dropped when density needs them
        drop_top = n - drop_low - keep_n
        w = _magnitudes(x, b, work)
        if exact:
            keep = torch.zeros_like(w, dtype=torch.bool)
            keep[torch.sort(w, descending=False).indices[drop_low : drop_low + keep_n]] = True
        else:
            lo, hi = _kth_largest([w, w], None, [n - drop_low, drop_top], backend).tolist()
            keep = (w >= lo) & (w < hi) if drop_top else w >= lo
        out.append(torch.where(keep.view(x.shape), x, b))
        del w, keep
    return out


def _draw_seed(seed: int, name: str, task: int) -> int:
    return (seed ^ zlib.crc32(f"{name}#{task}".encode())) & 0x7FFFFFFFFFFFFFFF


def della_keep_probability(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MagPrune's keep probability per entry: linear in its magnitude rank within its row (ties by index)."""
    rows = tau.reshape(tau.shape[0], -1) if tau.dim() >= 2 else tau.reshape(1, -1)
    n = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=rows.device).expand_as(order))
    rel = rank.float() / (n - 1) if n > 1 else torch.full(rows.shape, 0.5, device=rows.device)
    return ((density - epsilon) + rel * (2 * epsilon)).reshape(tau.shape)


def _della(taus, s: "TensorSettings", name: str, seed: int, rescale: str | None) -> list[torch.Tensor]:
    out = []
    for k, (tau, d, eps) in enumerate(zip(taus, s.densities, s.epsilons)):
        p = della_keep_probability(tau, d, eps)
        gen = torch.Generator().manual_seed(_draw_seed(seed, name, k))
        keep = torch.rand(tau.shape, generator=gen).to(tau.device) < p
        kept = torch.where(keep, tau, torch.zeros_like(tau))
        out.append(kept / p if rescale == "inverse_p" else _rescale(tau, kept, rescale))
    return out


def _rescale(tau: torch.Tensor, kept: torch.Tensor, how: str | None) -> torch.Tensor:
    """mergekit's rescale: survivors scaled so that the task vector keeps its L1 norm."""
    if how != "l1":
        return kept
    before, after = tau.abs().sum(), kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def combine(
    taus: list[torch.Tensor],
    weights: list[float],
    *,
    consensus: bool,
    normalize: bool,
    weighted_vote: bool,
    lam: float,
    sign: str,
) -> torch.Tensor:
    """lam * the combination of sparsified fp32 task vectors (the general path; the kernel covers the common ones).

    consensus: elect a sign per element (of the sum, or of the sum of signs with ``sign: count``; ties elect
    +), keep the values that agree. normalize: divide by the weights (agreeing ones, under consensus); with
    ``weighted_vote`` the vote and the divisor are weighted (mergekit), else unweighted (mmt's TIES).
    """
    terms = [w * t for w, t in zip(weights, taus)]
    if not consensus:
        total = sum(terms)
        if normalize:
            wsum = sum(weights)
            total = total / (wsum if abs(wsum) >= 1e-8 else 1.0)
        return lam * total
    votes = terms if weighted_vote else taus
    elect = sum(v.sign() for v in votes) if sign == "count" else sum(votes)
    up = elect >= 0
    total = torch.zeros_like(taus[0])
    div = torch.zeros_like(taus[0])
    for w, t, term in zip(weights, taus, terms):
        agree = torch.where(up, t > 0, t < 0)
        total += torch.where(agree, term, 0.0)
        div += agree.to(t.dtype) * (w if weighted_vote else 1.0)
    if normalize:
        total = total / torch.where(div == 0, 1.0, div)
    return lam * total


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation of the flattened tensors (fp32), linear when they are nearly collinear."""
    a, b = v0.float().reshape(-1), v1.float().reshape(-1)
    na, nb = a.norm(), b.norm()
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = float(((a / na) * (b / nb)).sum().clamp(-1, 1))
    if abs(dot) > dot_threshold:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    theta = torch.acos(torch.tensor(dot, dtype=torch.float64))
    sin_theta = torch.sin(theta)
    ca = float(torch.sin((1 - t) * theta) / sin_theta)
    cb = float(torch.sin(t * theta) / sin_theta)
    return (ca * a + cb * b).reshape(v0.shape)


def model_stock(xs: list[torch.Tensor], base: torch.Tensor, filter_wise: bool = False) -> torch.Tensor:
    """Model Stock's interpolation between the models' mean and the base (fp32)."""
    shape = base.shape
    if filter_wise and base.dim() >= 1:
        w0 = base.float().reshape(base.shape[0], -1) if base.dim() >= 2 else base.float().reshape(1, -1)
    else:
        w0 = base.float().reshape(1, -1)
    ws = [x.float().reshape(w0.shape) for x in xs]
    offsets = [w - w0 for w in ws]
    cos = []
    for i, oa in enumerate(offsets):
        for ob in offsets[i + 1 :]:
            prod = oa.norm(dim=-1) * ob.norm(dim=-1)
            cos.append(((oa * ob).sum(dim=-1) / prod.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    den = 1 + (k - 1) * c
    singular = den.abs() < 1e-6  # opposite updates: no finite estimate, keep the base
    t = torch.where(singular, torch.zeros_like(c), k * c / torch.where(singular, torch.ones_like(den), den))
    mean = sum(ws) / k
    return (t * mean + (1 - t) * w0).reshape(shape)


def nuslerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, *, flatten: bool = True, row_wise: bool = False, eps: float = 1e-8
) -> torch.Tensor:
    """NuSLERP (fp32): v0 at t = 0 to v1 at t = 1, of the whole tensor (flatten) or per vector (see module doc)."""
    shape = v0.shape
    a, c = v0.float(), v1.float()
    if flatten:
        a, c = a.reshape(-1), c.reshape(-1)
    elif row_wise:  # the vectors run along dim 0
        a, c = a.transpose(0, -1), c.transpose(0, -1)
    ua = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    uc = c / c.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * uc).sum(dim=-1, keepdim=True).clamp(-1, 1)
    linear = (1 - cos * cos) <= eps * eps
    theta = torch.acos(torch.where(linear, 0.0, cos))  # acos(1) = 0 keeps the unused branch finite
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * c) / torch.sin(theta)
    out = torch.where(linear, (1 - t) * a + t * c, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def sce(taus: list[torch.Tensor], select_topk: float, sign: str = "total") -> torch.Tensor:
    """SCE's merged task vector (fp32) from K task vectors: select by variance, weight by energy, erase, mean."""
    tv = torch.stack([t.float() for t in taus])
    if select_topk < 1:
        var = torch.var(tv, dim=0, correction=0)
        k = int(int(torch.count_nonzero(var)) * select_topk)
        keep = torch.zeros(var.numel(), dtype=tv.dtype, device=tv.device)
        if k:
            keep[torch.topk(var.abs().reshape(-1), k=k, largest=True).indices] = 1
        tv = tv * keep.view(var.shape).unsqueeze(0)
        del var, keep
    energy = tv.square().reshape(tv.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    w = torch.full_like(energy, 1.0 / tv.shape[0]) if abs(total) < 1e-6 else energy / total
    w = w.view(-1, *[1] * (tv.dim() - 1))
    elect = tv.sign().sum(dim=0) if sign == "count" else tv.sum(dim=0)
    majority = (elect >= 0).to(tv.dtype) * 2 - 1
    w_kept = w * (tv.sign() == majority)
    return (tv * w_kept).sum(dim=0) / w_kept.sum(dim=0).clamp(min=1e-6)


def merge_one(
    cfg: "MergeConfig",
    name: str,
    xs: list[torch.Tensor],
    b: torch.Tensor | None,
    s: "TensorSettings",
    seed: int,
    backend: str | None,
) -> torch.Tensor:
    """The merged tensor ``name`` from K inputs (and the base) already in the compute dtype and on the device."""
    method = cfg.method
    work = xs[0].dtype
    if method == "slerp":
        return slerp(s.t, b, xs[0])
    if method == "model_stock":
        return model_stock(xs, b, cfg.filter_wise)
    if method == "nuslerp":
        w0, w1 = s.weights
        t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
        how = dict(flatten=cfg.nuslerp_flatten, row_wise=cfg.nuslerp_row_wise)
        if b is None:
            return nuslerp(t, xs[0], xs[1], **how)
        bf = b.float()
        return bf + nuslerp(t, xs[0].float() - bf, xs[1].float() - bf, **how)
    if method == "sce":
        delta = sce([x.float() - b.float() for x in xs], s.select_topk, cfg.sign)
        return b.float() + s.lam * delta
    mergekit = cfg.semantics == "mergekit"
    consensus = method in _CONSENSUS
    normalize = cfg.normalize
    if normalize is None:
        normalize = _MERGEKIT_NORMALIZE[method] if mergekit else method in _CONSENSUS
    rescale = cfg.rescale
    if rescale is None:
        rescale = _MERGEKIT_RESCALE.get(method, False) if mergekit else method.startswith(("dare", "della"))
    rescale_how = ("l1" if mergekit else "inverse_p") if rescale else None
    unit = all(w == 1.0 for w in s.weights)
    kw = dict(weights=s.weights, densities=s.densities, lam=s.lam, seed=seed, sign=cfg.sign, backend=backend)

    if method == "linear":
        if mergekit and normalize:  # mergekit's linear is the weighted mean
            wsum = sum(s.weights)
            kw["weights"] = [w / (wsum if abs(wsum) >= 1e-8 else 1.0) for w in s.weights]
        return kernel_merge(xs, b, method="linear", **kw)
    # The fused kernel: TIES-family means over the agreeing count, other methods sum; unweighted votes.
    kernel_combines = normalize == consensus and (not mergekit or unit or not consensus)
    if method in ("task_arithmetic", "ties") and kernel_combines and cfg.tie_break == "threshold":
        return kernel_merge(xs, b, method=method, **kw)
    if method.startswith("dare") and kernel_combines and rescale_how == "inverse_p":
        return kernel_merge(xs, b, method=method, **kw)
    if method == "ties" and kernel_combines:  # exact_k: trimmed inputs, then the kernel's election and mean
        trimmed = _ties_exact_k(xs, b, s.densities, work, backend)
        zero = torch.zeros(len(xs), device=b.device)
        return kernel_merge(trimmed, b, method="ties", thresholds=zero, **kw)
    if method.startswith("breadcrumbs"):
        kept = _breadcrumbs_masks(xs, b, s.densities, s.gammas, work, cfg.tie_break == "exact_k", backend)
        if kernel_combines:
            zero = torch.zeros(len(xs), device=b.device)
            km = "ties" if consensus else "task_arithmetic"
            return kernel_merge(kept, b, method=km, thresholds=zero if consensus else None, **kw)
        taus = [x.float() - b.float() for x in kept]
    elif method == "ties":
        if cfg.tie_break == "exact_k":
            kept = _ties_exact_k(xs, b, s.densities, work, backend)
            taus = [x.float() - b.float() for x in kept]
        else:
            n = xs[0].numel()
            thr = _kth_largest(xs, b, [int(d * n) for d in s.densities], backend)
            taus = [x.float() - b.float() for x in xs]
            taus = [torch.where(t.abs() >= th, t, 0.0) for t, th in zip(taus, thr.tolist())]
    elif method.startswith("dare"):
        taus = []
        for k, (x, d) in enumerate(zip(xs, s.densities)):
            tau = x.float() - b.float()
            keep = kmerge.dare_keep_mask(tau.numel(), k, seed, d, tau.device, backend).view(tau.shape)
            kept = torch.where(keep, tau, 0.0)
            taus.append(kept / d if rescale_how == "inverse_p" else _rescale(tau, kept, rescale_how))
    elif method == "task_arithmetic":
        taus = [x.float() - b.float() for x in xs]
    elif method.startswith("della"):
        taus = _della([x.float() - b.float() for x in xs], s, name, seed, rescale_how)
        if kernel_combines:
            zero = torch.zeros(len(xs), device=b.device)
            km = "ties" if consensus else "task_arithmetic"
            delta = kernel_merge(taus, None, method=km, thresholds=zero if consensus else None, **kw)
            return b.float() + delta
    else:
        raise MergeError(f"method {method!r} has no implementation")  # validate() lists the methods
    delta = combine(
        taus, s.weights, consensus=consensus, normalize=normalize, weighted_vote=mergekit, lam=s.lam, sign=cfg.sign
    )
    return b.float() + delta


def sign_conflict(task_vectors: list[torch.Tensor]) -> dict[str, float]:
    """Among elements where at least two tasks are nonzero, the fraction whose signs disagree."""
    pos = sum((t > 0).to(torch.int32) for t in task_vectors)
    neg = sum((t < 0).to(torch.int32) for t in task_vectors)
    active = (pos + neg) >= 2
    n_active = int(active.sum())
    conflict = int((active & (pos > 0) & (neg > 0)).sum())
    return {"sign_conflict": conflict / max(n_active, 1), "active_fraction": n_active / max(pos.numel(), 1)}

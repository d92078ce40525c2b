"""mmt merge's methods on single tensors, each against a direct PyTorch implementation of its published definition."""

from __future__ import annotations

import math

import pytest
import torch

from mmt.errors import MergeError
from mmt.merge import methods as mt
from mmt.merge.plan import MergeConfig, evaluate_setting, relative_depth, tensor_settings

NAME = "model.layers.1.mlp.down_proj.weight"


def _cfg(method, k=3, **kw):
    raw = dict(method=method, base_model="base", models=[f"m{i}" for i in range(k)], output="out")
    raw.update(kw)
    return MergeConfig.from_dict(raw)


def _run(cfg, xs, b, name=NAME, seed=7, layers=3):
    return mt.merge_one(cfg, name, xs, b, tensor_settings(cfg, name, layers), seed, "reference")


def _inputs(shape=(48, 40), k=3, dtype=torch.bfloat16, seed=0):
    """bf16 base and K fine-tuned tensors whose task vectors have many exact magnitude ties."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g).to(dtype)
    xs = [(b.float() + torch.randn(shape, generator=g) * 0.05).to(dtype) for _ in range(k)]
    return xs, b


# ---- direct definitions ---------------------------------------------------------------------------------------


def _argsort_top_k(delta, density):
    """Keep exactly k = max(1, floor(density * n)) entries, in the order torch.argsort(descending) gives."""
    n = delta.numel()
    if density >= 1:
        return delta
    k = max(1, int(density * n))
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]] = 1
    return delta * mask.view(delta.shape)


def _consensus(deltas, weights, lam, normalize=True, weighted=True):
    """TIES combination: elect the sign of the (weighted) sum, keep agreeing values, divide by their weights."""
    d = torch.stack(deltas)
    w = torch.tensor(weights, dtype=d.dtype).view(-1, *[1] * (d.dim() - 1))
    d = d * w
    vote = d if weighted else torch.stack(deltas)
    majority = (vote.sum(dim=0) >= 0).to(d.dtype) * 2 - 1
    mask = d.sign() == majority
    mixed = (d * mask).sum(dim=0)
    div = ((w if weighted else torch.ones_like(w)) * mask).sum(dim=0)
    div[div == 0] = 1
    if normalize:
        mixed = mixed / div
    return lam * mixed


def test_exact_k_reproduces_argsort_ties_bit_for_bit():
    xs, b = _inputs()
    deltas = [x.float() - b.float() for x in xs]
    for weights, semantics in (([1.0, 1.0, 1.0], "mmt"), ([1.0, 1.0, 1.0], "mergekit"), ([0.5, 1.0, 2.0], "mergekit")):
        cfg = _cfg(
            "ties",
            density=0.2,
            tie_break="exact_k",
            semantics=semantics,
            models=[{"path": f"m{i}", "weight": w} for i, w in enumerate(weights)],
        )
        got = _run(cfg, [x.float() for x in xs], b.float()).to(torch.bfloat16)
        want = (b.float() + _consensus([_argsort_top_k(d, 0.2) for d in deltas], weights, 1.0)).to(torch.bfloat16)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (weights, semantics)
    # The fixture has ties at the cut-off, so the threshold rule keeps more and differs.
    thr = _run(_cfg("ties", density=0.2), [x.float() for x in xs], b.float()).to(torch.bfloat16)
    assert not torch.equal(thr, got)
    n = b.numel()
    kept_thr = int((deltas[0].abs() >= deltas[0].abs().flatten().kthvalue(n - int(0.2 * n) + 1).values).sum())
    assert kept_thr > int(0.2 * n)


def test_exact_k_small_density_keeps_one_and_threshold_keeps_none():
    xs, b = _inputs(shape=(7,))
    got = _run(_cfg("ties", density=0.1, tie_break="exact_k"), xs, b)  # floor(0.7) = 0, mergekit keeps 1
    want = b.float() + _consensus([_argsort_top_k(x.float() - b.float(), 0.1) for x in xs], [1.0] * 3, 1.0)
    torch.testing.assert_close(got.float(), want.to(torch.bfloat16).float(), rtol=0, atol=0)
    assert torch.equal(_run(_cfg("ties", density=0.1), xs, b), b)


def _breadcrumbs_direct(delta, density, gamma, exact):
    n = delta.numel()
    keep_n = int(density * n)
    drop_low = max(0, n - keep_n - int(gamma * n))
    w = delta.abs().reshape(-1).float()
    if exact:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.sort(w).indices[drop_low : drop_low + keep_n]] = True
    else:  # every entry tied with a kept magnitude is kept, every one tied with a dropped outlier is dropped
        srt = torch.sort(w, descending=True).values
        drop_top = n - drop_low - keep_n
        lo = srt[drop_top + keep_n - 1] if keep_n + drop_top else math.inf
        hi = srt[drop_top - 1] if drop_top else math.inf
        mask = (w >= lo) & (w < hi)
    return delta * mask.view(delta.shape)


@pytest.mark.parametrize("tie_break", ["threshold", "exact_k"])
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs(method, tie_break):
    xs, b = _inputs()
    xs, b = [x.float() for x in xs], b.float()
    weights = [1.0, 0.5, 2.0]
    cfg = _cfg(
        method,
        density=0.3,
        gamma=0.05,
        lam=0.7,
        tie_break=tie_break,
        models=[{"path": f"m{i}", "weight": w} for i, w in enumerate(weights)],
    )
    got = _run(cfg, xs, b)
    deltas = [_breadcrumbs_direct(x - b, 0.3, 0.05, tie_break == "exact_k") for x in xs]
    if method == "breadcrumbs":
        want = b + 0.7 * sum(w * d for w, d in zip(weights, deltas))
    else:  # mmt's TIES: unweighted vote, mean over the agreeing tasks
        cnt = torch.zeros_like(b)
        vote = sum(deltas)
        for d in deltas:
            cnt += torch.where(vote >= 0, d > 0, d < 0).float()
        num = sum(torch.where(torch.where(vote >= 0, d > 0, d < 0), w * d, 0.0) for w, d in zip(weights, deltas))
        want = b + 0.7 * num / cnt.clamp_min(1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # the outliers really go: the largest task value of task 0 is not in the merge
    top = (xs[0] - b).abs().argmax()
    assert deltas[0].reshape(-1)[top] == 0


def test_della_keep_probability_is_linear_in_the_rank_per_row():
    tau = torch.tensor([[0.3, -0.1, 0.2, -0.4, 0.0], [1.0, 1.0, -2.0, 0.5, 0.1]])
    p = mt.della_keep_probability(tau, 0.5, 0.2)
    rank = torch.tensor([[3, 1, 2, 4, 0], [2, 3, 4, 1, 0]], dtype=torch.float32)  # ties ranked by index
    torch.testing.assert_close(p, 0.3 + rank / 4 * 0.4)
    assert torch.allclose(
        mt.della_keep_probability(torch.randn(6), 0.5, 0.1).sort().values, torch.linspace(0.4, 0.6, 6)
    )


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_matches_magprune_definition(method):
    xs, b = _inputs(shape=(64, 50))
    xs, b = [x.float() for x in xs], b.float()
    weights = [1.0, 1.0, 1.0]
    cfg = _cfg(method, density=0.4, epsilon=0.1, seed=3)
    got = _run(cfg, xs, b, seed=11)
    deltas = []
    for k, x in enumerate(xs):
        tau = x - b
        rows = tau.abs()
        rank = rows.argsort(dim=1, stable=True).argsort(dim=1).float()
        p = 0.3 + rank / (rows.shape[1] - 1) * 0.2
        u = torch.rand(tau.shape, generator=torch.Generator().manual_seed(mt._draw_seed(11, NAME, k)))
        deltas.append(torch.where(u < p, tau / p, 0.0))
    if method == "della":
        want = b + _consensus(deltas, weights, 1.0, weighted=False)
    else:
        want = b + sum(deltas)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    kept = (deltas[0] != 0).float()
    assert abs(kept.mean().item() - 0.4) < 0.03  # density is the mean keep rate
    big = (xs[0] - b).abs() > (xs[0] - b).abs().median()
    assert kept[big].mean() > kept[~big].mean() + 0.05  # larger magnitudes survive more often


def _slerp_direct(t, v0, v1):
    a, b = v0.double().flatten(), v1.double().flatten()
    cos = torch.dot(a / a.norm(), b / b.norm()).clamp(-1, 1)
    if cos.abs() > 0.9995:
        return ((1 - t) * a + t * b).view(v0.shape)
    theta = torch.acos(cos)
    return ((torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)).view(v0.shape)


def test_slerp():
    g = torch.Generator().manual_seed(5)
    v0, v1 = torch.randn(30, 20, generator=g), torch.randn(30, 20, generator=g)
    for t in (0.0, 0.3, 0.5, 1.0):
        got = _run(_cfg("slerp", k=1, t=t), [v1], v0)
        torch.testing.assert_close(got.double(), _slerp_direct(t, v0, v1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_run(_cfg("slerp", k=1, t=0.0), [v1], v0), v0, rtol=1e-6, atol=1e-6)
    # collinear: linear interpolation; the norm is interpolated too
    got = _run(_cfg("slerp", k=1, t=0.25), [2 * v0], v0)
    torch.testing.assert_close(got, 1.25 * v0)
    # a gradient over the layers: layer 1 of 3 sits at t = 0.5
    cfg = _cfg("slerp", k=1, t=[0.0, 1.0])
    torch.testing.assert_close(_run(cfg, [v1], v0).double(), _slerp_direct(0.5, v0, v1), rtol=1e-5, atol=1e-5)


def test_model_stock():
    g = torch.Generator().manual_seed(6)
    w0 = torch.randn(12, 10, generator=g)
    ws = [w0 + torch.randn(12, 10, generator=g) * 0.1 for _ in range(3)]
    for filter_wise in (False, True):
        got = _run(_cfg("model_stock", filter_wise=filter_wise), ws, w0)
        rows = (lambda x: x) if filter_wise else (lambda x: x.reshape(1, -1))
        d = [rows(w - w0) for w in ws]
        cos = (
            torch.stack(
                [torch.nn.functional.cosine_similarity(d[i], d[j], dim=-1) for i in range(3) for j in range(i + 1, 3)]
            )
            .mean(0)
            .unsqueeze(-1)
        )
        t = 3 * cos / (1 + 2 * cos)
        want = (t * rows(sum(ws) / 3) + (1 - t) * rows(w0)).view(w0.shape)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # two models at right angles: cos = 0, t = 0, the base is kept
    e = torch.zeros(2, 2)
    right_angle = [e + torch.tensor([[1.0, 0], [0, 0]]), e + torch.tensor([[0, 1.0], [0, 0]])]
    got = _run(_cfg("model_stock", k=2), right_angle, e)
    torch.testing.assert_close(got, e)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "task_arithmetic", "ties"])
def test_mergekit_weighting_and_normalisation(method):
    """semantics: mergekit: weighted vote, weight-normalised mean for ties, plain sums for dare, L1 rescale."""
    xs, b = _inputs()
    xs, b = [x.float() for x in xs], b.float()
    weights = [0.5, 1.0, 1.5]
    cfg = _cfg(
        method,
        density=0.5,
        semantics="mergekit",
        lam=0.9,
        models=[{"path": f"m{i}", "weight": w} for i, w in enumerate(weights)],
    )
    got = _run(cfg, xs, b, seed=5)
    deltas = [x - b for x in xs]
    if method.startswith("dare"):
        kept = []
        for k, d in enumerate(deltas):
            m = d * mt.kmerge.dare_keep_mask(d.numel(), k, 5, 0.5).view(d.shape)
            kept.append(m * (d.abs().sum() / m.abs().sum()))
        deltas = kept
    elif method == "ties":
        deltas = [
            d * (d.abs() >= d.abs().flatten().kthvalue(d.numel() - int(0.5 * d.numel()) + 1).values) for d in deltas
        ]
    if method in ("ties", "dare_ties"):
        want = b + _consensus(deltas, weights, 0.9, normalize=method == "ties")
    else:
        want = b + 0.9 * sum(w * d for w, d in zip(weights, deltas))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_settings_filters_and_gradients():
    flt = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.2, 0.6]}, {"value": 0.9}]
    assert evaluate_setting(flt, "model.layers.0.self_attn.q_proj.weight", 0.0) == 0.1
    assert evaluate_setting(flt, "model.layers.2.mlp.up_proj.weight", 1.0) == pytest.approx(0.6)
    assert evaluate_setting(flt, "model.layers.1.mlp.up_proj.weight", 0.5) == pytest.approx(0.4)
    assert evaluate_setting(flt, "model.norm.weight", 0.0) == 0.9
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.25) == pytest.approx(0.5)
    assert relative_depth("model.layers.3.mlp.up_proj.weight", 4) == 1.0
    assert relative_depth("model.embed_tokens.weight", 4) == 0.0
    cfg = _cfg(
        "ties",
        density=[{"filter": "mlp", "value": [0.2, 0.6]}, {"value": 0.5}],
        lam=[1.0, 0.5],
        models=[{"path": "m0", "density": [{"filter": "down_proj", "value": 0.9}]}, "m1", "m2"],
    )
    s = tensor_settings(cfg, "model.layers.1.mlp.down_proj.weight", 3)  # t = 0.5
    assert s.densities == [0.9, pytest.approx(0.4), pytest.approx(0.4)] and s.lam == pytest.approx(0.75)
    s = tensor_settings(cfg, "model.layers.0.self_attn.q_proj.weight", 3)
    assert s.densities == [0.5, 0.5, 0.5] and s.lam == 1.0
    with pytest.raises(MergeError, match=r"no density filter matches tensor model\.norm\.weight"):
        tensor_settings(_cfg("ties", density=[{"filter": "mlp", "value": 0.3}]), "model.norm.weight", 3)
    with pytest.raises(MergeError, match=r"tensor model\.layers\.0\.mlp\.x: density 1\.5"):
        tensor_settings(
            _cfg("ties", density=[{"filter": "mlp", "value": 1.5}, {"value": 0.2}]), "model.layers.0.mlp.x", 3
        )
    with pytest.raises(MergeError, match=r"density\[0\]: a filter entry"):
        _cfg("ties", density=[{"filtr": "mlp", "value": 0.3}])


def test_config_errors_for_new_methods():
    with pytest.raises(MergeError, match="slerp interpolates base_model towards exactly one model"):
        _cfg("slerp", k=2)
    with pytest.raises(MergeError, match="model_stock needs at least 2 models"):
        _cfg("model_stock", k=1)
    with pytest.raises(MergeError, match="tie_break must be one of threshold, exact_k"):
        _cfg("ties", tie_break="argsort")
    with pytest.raises(MergeError, match="della needs 0 < density - epsilon"):
        tensor_settings(_cfg("della", density=0.1, epsilon=0.2), NAME, 3)
    with pytest.raises(MergeError, match="rescale applies to the dare and della methods, not 'ties'"):
        _cfg("ties", rescale=True)
    with pytest.raises(MergeError, match="LoRA adapters merge with"):
        MergeConfig.from_dict(dict(method="della", adapters=["a"]))


# ---- nuslerp and sce ------------------------------------------------------------------------------------------


def _nuslerp_direct(t, v0, v1, flatten=True, row_wise=False):
    """float64, one vector at a time: the slerp formula, linear when the vectors are (anti)parallel."""
    a, c = v0.double(), v1.double()
    if flatten:
        a, c = a.reshape(1, -1), c.reshape(1, -1)
    elif row_wise:  # vectors along dim 0
        a, c = a.movedim(0, -1), c.movedim(0, -1)
    moved = a.shape
    a, c = a.reshape(-1, moved[-1]), c.reshape(-1, moved[-1])
    out = torch.empty_like(a)
    for i in range(a.shape[0]):
        x, y = a[i], c[i]
        cos = float(torch.dot(x, y) / (max(float(x.norm()), 1e-7) * max(float(y.norm()), 1e-7)))
        cos = min(1.0, max(-1.0, cos))
        if 1 - cos * cos <= 1e-16:
            out[i] = (1 - t) * x + t * y
        else:
            th = math.acos(cos)
            out[i] = (math.sin((1 - t) * th) * x + math.sin(t * th) * y) / math.sin(th)
    out = out.reshape(moved)
    if row_wise and not flatten:
        out = out.movedim(-1, 0)
    return out.reshape(v0.shape)


def _nus_cfg(weights=(1.0, 1.0), base=True, **kw):
    raw = dict(method="nuslerp", models=[{"path": f"m{i}", "weight": w} for i, w in enumerate(weights)], output="o")
    if base:
        raw["base_model"] = "base"
    raw.update(kw)
    return MergeConfig.from_dict(raw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(48, 40), (7,), (1,), (3, 5, 2)], ids=str)
@pytest.mark.parametrize("how", ["flatten", "rows", "row_wise"])
def test_nuslerp_matches_its_definition(dtype, shape, how):
    xs, b = _inputs(shape=shape, k=2, dtype=dtype, seed=len(shape))
    flags = {
        "flatten": {},
        "rows": dict(nuslerp_flatten=False),
        "row_wise": dict(nuslerp_flatten=False, nuslerp_row_wise=True),
    }[how]
    for weights, t in (((1.0, 1.0), 0.5), ((2.0, 1.0), 1 / 3), ((1.0, -1.0), 0.5), ((1.0, 0.0), 0.0)):
        for base in (True, False):
            got = _run(_nus_cfg(weights, base, **flags), xs, b if base else None)
            assert got.dtype == torch.float32 and got.shape == b.shape
            if base:
                want = b.double() + _nuslerp_direct(
                    t, xs[0] - b.double(), xs[1] - b.double(), "flatten" == how, how == "row_wise"
                )
            else:
                want = _nuslerp_direct(t, xs[0], xs[1], how == "flatten", how == "row_wise")
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # t = 0 is the first model
    torch.testing.assert_close(
        _run(_nus_cfg((1.0, 0.0), False, **flags), xs, None), xs[0].float(), rtol=1e-5, atol=1e-6
    )


def test_nuslerp_keeps_the_norm_of_orthogonal_vectors_and_is_linear_when_parallel():
    v0, v1 = torch.tensor([[3.0, 0.0], [1.0, 2.0]]), torch.tensor([[0.0, 3.0], [2.0, 4.0]])
    got = _run(_nus_cfg(base=False, nuslerp_flatten=False), [v0, v1], None)
    torch.testing.assert_close(got[0], torch.tensor([3 / math.sqrt(2), 3 / math.sqrt(2)]))  # on the circle
    torch.testing.assert_close(got[1], torch.tensor([1.5, 3.0]))  # parallel rows: the midpoint
    # per column (nuslerp_row_wise) is per row of the transpose
    cols = _run(_nus_cfg(base=False, nuslerp_flatten=False, nuslerp_row_wise=True), [v0, v1], None)
    rows_t = _run(_nus_cfg(base=False, nuslerp_flatten=False), [v0.T.contiguous(), v1.T.contiguous()], None)
    torch.testing.assert_close(cols, rows_t.T)


def _sce_direct(taus, topk, count=False):
    """float64: Select (top-k variance), Calculate (sum-of-squares weights), Erase (minority signs), weighted mean."""
    d = torch.stack([t.double().reshape(-1) for t in taus])
    if topk < 1:
        var = ((d - d.mean(0)) ** 2).mean(0)
        k = int(int((var != 0).sum()) * topk)
        keep = torch.zeros_like(var, dtype=torch.bool)
        if k:
            order = var.argsort(descending=True)
            assert k == len(var) or var[order[k - 1]] > var[order[k]], "ties at the cut-off: pick another fixture"
            keep[order[:k]] = True
        d = d * keep
    energy = (d**2).sum(1)
    eta = energy / energy.sum() if energy.sum() > 0 else torch.full_like(energy, 1 / len(taus))
    vote = d.sign().sum(0) if count else d.sum(0)
    agree = d.sign() == torch.where(vote >= 0, 1.0, -1.0)
    w = eta[:, None] * agree
    return ((w * d).sum(0) / w.sum(0).clamp(min=1e-6)).reshape(taus[0].shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(48, 40), (7,), (1,), (3, 5, 2)], ids=str)
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.05])
def test_sce_matches_its_definition(dtype, shape, topk):
    g = torch.Generator().manual_seed(sum(shape))
    b = (torch.randn(shape, generator=g) * 0.02).to(dtype)  # small base: bf16 task values without many ties
    xs = [(b.float() + torch.randn(shape, generator=g) * s).to(dtype) for s in (0.05, 0.1, 0.02)]
    taus = [x.double() - b.double() for x in xs]
    for lam, sign in ((1.0, "total"), (0.6, "count")):
        got = _run(_cfg("sce", select_topk=topk, lam=lam, sign=sign), xs, b)
        want = b.double() + lam * _sce_direct(taus, topk, count=sign == "count")
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    if math.prod(shape) * topk < 1:  # nothing selected: the base
        assert torch.equal(got, b.float())


def test_sce_selects_by_variance_and_weights_by_energy():
    b = torch.zeros(4)
    # element 0 varies most, element 3 not at all; model 1 has 4x model 0's energy on what is kept
    xs = [torch.tensor([1.0, 0.1, 0.1, 0.3]), torch.tensor([-2.0, 0.3, 0.2, 0.3])]
    got = _run(_cfg("sce", k=2, select_topk=0.5), xs, b)  # 3 nonzero variances, k = 1: element 0
    torch.testing.assert_close(got, torch.tensor([-2.0, 0.0, 0.0, 0.0]))  # +1 is erased by the elected sign
    got = _run(_cfg("sce", k=2), xs, b)
    e0, e1 = 1 + 0.01 + 0.01 + 0.09, 4 + 0.09 + 0.04 + 0.09
    w0, w1 = e0 / (e0 + e1), e1 / (e0 + e1)
    want = torch.tensor([-2.0, (w0 * 0.1 + w1 * 0.3) / (w0 + w1), (w0 * 0.1 + w1 * 0.2) / (w0 + w1), 0.3])
    torch.testing.assert_close(got, want)


def test_nuslerp_and_sce_config_errors():
    with pytest.raises(MergeError, match="nuslerp interpolates exactly 2 models .* got 3"):
        _cfg("nuslerp", k=3)
    with pytest.raises(MergeError, match="nuslerp interpolates exactly 2 models .* got 1"):
        _nus_cfg(weights=(1.0,))
    with pytest.raises(MergeError, match=r"nuslerp takes per-model weights, not t .* got t=0\.3"):
        _nus_cfg(t=0.3)
    with pytest.raises(MergeError, match="nuslerp_row_wise: true needs nuslerp_flatten: false"):
        _nus_cfg(nuslerp_row_wise=True)
    with pytest.raises(MergeError, match="nuslerp_flatten must be true or false, got 'yes'"):
        _nus_cfg(nuslerp_flatten="yes")
    with pytest.raises(MergeError, match="nuslerp_flatten and nuslerp_row_wise apply to nuslerp, not 'ties'"):
        _cfg("ties", nuslerp_flatten=False)
    with pytest.raises(MergeError, match="normalize does not apply to nuslerp"):
        _nus_cfg(normalize=True)
    for bad in (0, 0.0, -0.1, 1.5):
        with pytest.raises(MergeError, match=rf"select_topk {float(bad)} is outside \(0, 1\]"):
            _cfg("sce", select_topk=bad)
    cfg = _cfg("sce", select_topk=[{"filter": "mlp", "value": 2.0}, {"value": 0.5}])
    with pytest.raises(MergeError, match=rf"tensor {NAME}: select_topk 2\.0 is outside"):
        tensor_settings(cfg, NAME, 3)
    assert tensor_settings(cfg, "model.norm.weight", 3).select_topk == 0.5
    with pytest.raises(MergeError, match="select_topk applies to sce, not 'ties'"):
        _cfg("ties", select_topk=0.5)
    with pytest.raises(MergeError, match="sce needs at least 2 models"):
        _cfg("sce", k=1)
    with pytest.raises(MergeError, match=r"sce computes each model's weight .* weight 0\.5 for m1"):
        _cfg("sce", k=2, models=["m0", {"path": "m1", "weight": 0.5}])
    with pytest.raises(MergeError, match="method 'sce' needs base_model"):
        MergeConfig.from_dict(dict(method="sce", models=["a", "b"]))
    with pytest.raises(MergeError, match="normalize does not apply to sce"):
        _cfg("sce", normalize=False)


def test_mergekit_configs_of_nuslerp_and_sce_are_read():
    mk = {
        "merge_method": "nuslerp",
        "base_model": "base",
        "models": [
            {"model": "base"},
            {"model": "a", "parameters": {"weight": 2.0}},
            {"model": "b", "parameters": {"weight": 1.0}},
        ],
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        "output": "o",
    }
    cfg = MergeConfig.from_dict(mk)
    assert [(s.path, s.weight) for s in cfg.models] == [("a", 2.0), ("b", 1.0)]
    assert cfg.base_model == "base" and cfg.semantics == "mergekit"
    assert (cfg.nuslerp_flatten, cfg.nuslerp_row_wise) == (False, True)
    cfg = MergeConfig.from_dict({**mk, "base_model": None, "models": mk["models"][1:], "parameters": {}})
    assert cfg.base_model is None and cfg.nuslerp_flatten is True
    sce = {"merge_method": "sce", "base_model": "base", "models": ["a", "b"], "parameters": {"select_topk": [0.2, 0.6]}}
    cfg = MergeConfig.from_dict({**sce, "output": "o"})
    assert cfg.select_topk == [0.2, 0.6] and tensor_settings(cfg, NAME, 3).select_topk == pytest.approx(0.4)
    bad = {**sce, "models": [{"model": "a", "parameters": {"select_topk": 0.5}}, "b"]}
    with pytest.raises(MergeError, match="select_topk"):
        MergeConfig.from_dict(bad)


def test_examples_of_nuslerp_and_sce_load():
    from pathlib import Path

    from mmt.merge.plan import load_merge_config

    root = Path(__file__).resolve().parents[2] / "examples" / "merge"
    nus = load_merge_config(root / "nuslerp.yaml")
    assert nus.method == "nuslerp" and [s.weight for s in nus.models] == [2.0, 1.0]
    sce = load_merge_config(root / "sce.yaml")
    assert sce.method == "sce" and sce.select_topk == 0.3 and len(sce.models) == 3 and sce.semantics == "mergekit"

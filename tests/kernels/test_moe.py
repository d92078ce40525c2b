"""Family 2 (FFT-routed top-k MoE): every available backend against the reference.

Outputs the kernels allocate are poisoned through PyTorch's deterministic mode, which fills every
``torch.empty``/``at::empty`` with NaN (floats) or the largest integer: an element a kernel forgets to
write fails the comparison. Tolerances follow tests/kernels/tolerance.py (2x the reference's own error
in the same precision against an fp64 golden result, plus a few ulps).
"""

from __future__ import annotations

import pytest
import torch

import mmt_kernels.moe as moe
from mmt_kernels import _backend
from mmt_kernels.moe.experts import _ref_mlp
from mmt_kernels.reference import moe as ref

from .tolerance import assert_close_to_golden

BACKENDS = [b for b in ("reference", "cpu", "triton") if _backend.available(b, "cpu", "moe_permute")[0]]
COMPILED = [b for b in BACKENDS if b != "reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def poison_empty():
    """Every uninitialised allocation is NaN (or INT_MAX) while a test runs."""
    prev, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = fill
    torch.use_deterministic_algorithms(prev, warn_only=warn)


def test_poisoning_is_active():
    assert torch.isnan(torch.empty(3)).all()


def make_ids(T, k, E, mode, gen):
    """Expert ids [T, k] with distinct experts per token; mode 'one' sends every token's first choice to
    expert 0, 'gaps' leaves the odd experts empty."""
    if mode == "random":
        return torch.rand(T, E, generator=gen).topk(k, dim=1).indices
    scores = torch.rand(T, E, generator=gen)
    if mode == "one":
        scores[:, 0] += 10
    elif mode == "gaps":
        scores[:, 1::2] -= 10
    return scores.topk(k, dim=1).indices


PERMUTE_CASES = [
    (0, 2, 4, "random"),
    (1, 1, 1, "random"),
    (37, 2, 5, "random"),
    (50, 3, 7, "gaps"),
    (64, 2, 6, "one"),
    (300, 8, 64, "random"),
    (129, 4, 4, "random"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,k,E,mode", PERMUTE_CASES)
def test_permute_matches_stable_sort(backend, T, k, E, mode):
    ids = make_ids(T, k, E, mode, torch.Generator().manual_seed(T + E))
    perm, inv, offsets = moe.moe_permute(ids, E, backend=backend)
    rperm, rinv, roffsets = ref.permute(ids, E)
    assert torch.equal(perm, rperm) and torch.equal(inv, rinv) and torch.equal(offsets, roffsets)
    assert torch.equal(perm[inv], torch.arange(T * k))


@pytest.mark.parametrize("backend", COMPILED)
def test_permute_rejects_bad_ids(backend):
    if backend == "triton":
        pytest.skip("the Triton kernel cannot raise (device_assert never fires in the interpreter)")
    with pytest.raises(RuntimeError, match="outside"):
        moe.moe_permute(torch.tensor([[0, 5]]), 4, backend=backend)


def _golden_pair(fn, inputs, dtype):
    """(low-precision reference result, fp64 golden result) of ``fn`` on ``inputs``."""
    low = fn(*[t.to(dtype) if t.is_floating_point() else t for t in inputs])
    gold = fn(*[t.double() if t.is_floating_point() else t for t in inputs])
    return low, gold


DC_CASES = [(1, 1, 1, 1), (37, 2, 5, 33), (64, 2, 6, 130), (20, 4, 4, 257), (0, 2, 3, 8)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,k,E,d", DC_CASES)
def test_dispatch_combine_forward_backward(backend, dtype, T, k, E, d):
    gen = torch.Generator().manual_seed(T * 7 + d)
    ids = make_ids(T, k, E, "random", gen)
    perm, inv, _ = ref.permute(ids, E)
    x = torch.randn(T, d, generator=gen)
    yp = torch.randn(T * k, d, generator=gen)
    w = torch.rand(T * k, generator=gen)
    dout = torch.randn(T, d, generator=gen)

    # forward
    for name, fn, inputs in (
        ("dispatch", lambda x_: moe.moe_dispatch(x_, perm, inv, k, backend=backend), [x]),
        ("combine", lambda y_: moe.moe_combine(y_, inv, perm, w, k, backend=backend), [yp]),
    ):
        out = fn(inputs[0].to(dtype))
        r = {
            "dispatch": lambda t: ref.dispatch(t, perm, k),
            "combine": lambda t: ref.combine(
                t, inv, k, w.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
            ),
        }[name]
        low, gold = _golden_pair(r, inputs, dtype)
        assert out.dtype == dtype
        assert_close_to_golden(out, low, gold, name=name)

    # backward of combine: d yp and d weights
    def grads(y_, w_, g_):
        y_, w_ = y_.clone().requires_grad_(True), w_.clone().requires_grad_(True)
        moe.moe_combine(y_, inv, perm, w_, k, backend=backend if y_.dtype != torch.float64 else "reference").backward(
            g_
        )
        return y_.grad, w_.grad

    dy, dw = grads(yp.to(dtype), w, dout.to(dtype))
    dy_lo, dw_lo = (
        grads(yp.to(dtype), w, dout.to(dtype))
        if backend == "reference"
        else _ref_combine_grads(yp.to(dtype), w, dout.to(dtype), inv, k)
    )
    dy_g, dw_g = _ref_combine_grads(yp.double(), w.double(), dout.double(), inv, k)
    assert_close_to_golden(dy, dy_lo, dy_g, name="combine dyp")
    assert_close_to_golden(dw, dw_lo, dw_g, name="combine dweights")

    # backward of dispatch: each token gathers its k rows
    xg = x.to(dtype).requires_grad_(True)
    gxp = torch.randn(T * k, d, generator=gen)
    moe.moe_dispatch(xg, perm, inv, k, backend=backend).backward(gxp.to(dtype))
    low = gxp.to(dtype).float()[inv].view(T, k, d).sum(1).to(dtype)
    gold = gxp.double()[inv].view(T, k, d).sum(1)
    assert_close_to_golden(xg.grad, low, gold, name="dispatch dx")


def _ref_combine_grads(yp, w, dout, inv, k):
    yp, w = yp.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref.combine(yp, inv, k, w).backward(dout)
    return yp.grad, w.grad


def expert_weights(E, f, d, dtype, gen, scale=1.0):
    wg = torch.randn(E, f, d, generator=gen) * scale / d**0.5
    wu = torch.randn(E, f, d, generator=gen) * scale / d**0.5
    wd = torch.randn(E, d, f, generator=gen) / max(f, 1) ** 0.5
    return wg.to(dtype), wu.to(dtype), wd.to(dtype)


MLP_CASES = [
    # counts per expert (0 = empty expert), d, f
    ([1], 1, 1),
    ([5, 0, 17, 3, 0], 40, 24),
    ([0, 0, 70], 33, 70),
    ([9, 31, 2, 0, 1, 20, 4], 72, 19),
]


def _run_mlp(xp, offsets, wg, wu, wd, dy, act, backend, train_mask=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in (xp, wg, wu, wd)]
    y = moe.grouped_mlp(leaves[0], offsets, *leaves[1:], act=act, train_mask=train_mask, backend=backend)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts,d,f", MLP_CASES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_grouped_mlp_forward_backward(backend, dtype, counts, d, f, act):
    gen = torch.Generator().manual_seed(sum(counts) + d + f)
    E, N = len(counts), sum(counts)
    offsets = torch.tensor([0] + counts).cumsum(0)
    xp = torch.randn(N, d, generator=gen)
    wg, wu, wd = expert_weights(E, f, d, torch.float32, gen)
    dy = torch.randn(N, d, generator=gen)
    out = _run_mlp(xp.to(dtype), offsets, wg.to(dtype), wu.to(dtype), wd.to(dtype), dy.to(dtype), act, backend)
    low = _run_mlp(xp.to(dtype), offsets, wg.to(dtype), wu.to(dtype), wd.to(dtype), dy.to(dtype), act, "reference")
    gold = _run_mlp(xp.double(), offsets, wg.double(), wu.double(), wd.double(), dy.double(), act, "reference")
    for name, o, lo, g in zip(("y", "dx", "dw_gate", "dw_up", "dw_down"), out, low, gold):
        assert o.dtype == dtype
        assert_close_to_golden(o, lo, g, name=name, ulps=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_mlp_frozen_experts_get_zero_weight_grads(backend):
    gen = torch.Generator().manual_seed(3)
    counts, d, f = [6, 0, 9, 4], 24, 20
    offsets = torch.tensor([0] + counts).cumsum(0)
    xp, dy = torch.randn(19, d, generator=gen), torch.randn(19, d, generator=gen)
    wg, wu, wd = expert_weights(4, f, d, torch.float32, gen)
    mask = torch.tensor([True, True, False, True])
    out = _run_mlp(xp, offsets, wg, wu, wd, dy, "silu", backend, train_mask=mask)
    full = _run_mlp(xp, offsets, wg, wu, wd, dy, "silu", "reference")
    torch.testing.assert_close(out[1], full[1], rtol=1e-4, atol=1e-5)  # dx still flows through frozen experts
    for o, r in zip(out[2:], full[2:]):
        assert torch.all(o[2] == 0) and torch.all(o[1] == 0)
        torch.testing.assert_close(o[mask], r[mask], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="mmt_kernels._C not built")
def test_grouped_mlp_backward_op_skips_unneeded_outputs():
    xp, offsets = torch.randn(5, 8), torch.tensor([0, 2, 5])
    wg, wu, wd = expert_weights(2, 6, 8, torch.float32, torch.Generator().manual_seed(0))
    y, g, u = torch.ops.mmt.moe_grouped_mlp(xp, offsets, wg, wu, wd, 0)
    dx, dwg, dwu, dwd = torch.ops.mmt.moe_grouped_mlp_backward(y, xp, g, u, offsets, wg, wu, wd, None, 0, True, False)
    assert dx.shape == (5, 8) and dwg.numel() == dwu.numel() == dwd.numel() == 0


FFT_CASES = [(1, 2, 1), (7, 33, 17), (40, 64, 33), (13, 130, 20), (3, 16, 9)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,d,n_freq", FFT_CASES)
def test_fft_features_match_torch_rfft(backend, dtype, T, d, n_freq):
    gen = torch.Generator().manual_seed(T + d)
    x = torch.randn(T, d, generator=gen)
    x[0] = 0.0  # |X| = 0 everywhere on this token: the backward must give 0, not NaN
    # (A constant token is not tested: its non-DC bins are zero only up to rounding, and there the
    # direction z/|z| of the gradient is rounding noise in any implementation.)
    g = torch.randn(T, n_freq, generator=gen)

    def run(fn, xx, gg):
        xx = xx.clone().requires_grad_(True)
        out = fn(xx, n_freq)
        out.backward(gg)
        return out.detach(), xx.grad

    out = run(lambda a, n: moe.fft_features(a, n, backend=backend), x.to(dtype), g.to(dtype))
    low = run(ref.fft_features, x.to(dtype), g.to(dtype))
    gold = run(ref.fft_features, x.double(), g.double())
    for name, o, lo, gd in zip(("feats", "dx"), out, low, gold):
        assert o.dtype == dtype
        assert_close_to_golden(o, lo, gd, name=name, ulps=8)
    assert torch.all(out[1][0] == 0)


def test_fft_features_auto_takes_rfft_on_cpu_and_agrees_with_the_gemm():
    """On CPU ``auto`` runs torch.fft.rfft (faster there than the DFT GEMM); both give the same features and
    input gradients within a few ulps of fp32."""
    from mmt_kernels.moe.routing import MOE_FFT_FEATURES, MOE_FFT_FEATURES_BACKWARD

    assert MOE_FFT_FEATURES.choose("cpu") == "reference"
    assert MOE_FFT_FEATURES_BACKWARD.choose("cpu") == "reference"
    x = torch.randn(37, 96, generator=torch.Generator().manual_seed(3))
    g = torch.randn(37, 20, generator=torch.Generator().manual_seed(4))
    results = []
    for backend in [None] + (["cpu"] if "cpu" in BACKENDS else []):
        xx = x.clone().requires_grad_(True)
        out = moe.fft_features(xx, 20, backend=backend)
        out.backward(g)
        results.append((out.detach(), xx.grad))
    for a, b in zip(results[0], results[-1]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_fft_features_keeps_leading_dims_and_checks_n_freq():
    x = torch.randn(2, 3, 16)
    assert moe.fft_features(x, 5).shape == (2, 3, 5)
    with pytest.raises(ValueError, match="n_freq"):
        moe.fft_features(x, 10)


# ---- the whole layer --------------------------------------------------------------------------

LAYER_CASES = [(1, 8, 6, 1, 1), (29, 24, 10, 5, 2), (48, 40, 16, 8, 3), (17, 16, 12, 4, 4)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,d,f,E,k", LAYER_CASES)
def test_moe_ffn_matches_mixtral_style_loop(backend, dtype, T, d, f, E, k):
    gen = torch.Generator().manual_seed(T + E)
    x = torch.randn(T, d, generator=gen)
    logits = torch.randn(T, E, generator=gen) * 2
    wg, wu, wd = expert_weights(E, f, d, torch.float32, gen)
    dout = torch.randn(T, d, generator=gen)

    def run(fn, dt):
        leaves = [t.to(dt).detach().clone().requires_grad_(True) for t in (x, logits, wg, wu, wd)]
        out, aux, z = fn(*leaves)
        (out * dout.to(dt)).sum().add(aux + z).backward()
        return [out.detach(), aux.detach(), z.detach()] + [t.grad for t in leaves]

    def ours(x_, l_, g_, u_, d_):
        r = moe.moe_ffn(x_, l_, g_, u_, d_, k=k, scale=1.5, backend=backend)
        return r.out, r.aux_loss, r.z_loss

    def loop(x_, l_, g_, u_, d_):
        return ref.moe_ffn(x_, l_, g_, u_, d_, k=k, scale=1.5)

    out = run(ours, dtype)
    low = run(loop, dtype)
    gold = run(loop, torch.float64)
    names = ("out", "aux", "z", "dx", "dlogits", "dw_gate", "dw_up", "dw_down")
    for name, o, lo, g in zip(names, out, low, gold):
        assert_close_to_golden(o, lo, g, name=name, ulps=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_layer_all_tokens_to_one_expert_and_empty_experts(backend):
    torch.manual_seed(0)
    layer = moe.MoEFFN(16, 8, 6, k=1, n_freq=5, backend=backend)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[3, 0] = 100.0  # every token with x[:, 0] > 0 goes to expert 3
    x = torch.randn(2, 9, 16)
    x[..., 0] = x[..., 0].abs() + 0.1
    layer.track_load = True
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert layer.load_counts.tolist() == [0, 0, 0, 18, 0, 0]
    y.sum().backward()
    assert torch.all(layer.w_gate.grad[[0, 1, 2, 4, 5]] == 0) and layer.w_gate.grad[3].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_layer_deterministic_across_runs(backend):
    def once():
        torch.manual_seed(1)
        layer = moe.MoEFFN(24, 12, 5, k=2, n_freq=8, backend=backend)
        x = torch.randn(3, 11, 24, requires_grad=True)
        y = layer(x)
        (y.square().sum() + layer.last_aux_loss + layer.last_z_loss).backward()
        return [y.detach(), x.grad] + [p.grad for p in layer.parameters()]

    for a, b in zip(once(), once()):
        assert torch.equal(a, b)


def test_moe_layer_expert_mask_routes_only_to_allowed_experts():
    layer = moe.MoEFFN(16, 8, 6, k=2, n_freq=4)
    mask = torch.ones(6, dtype=torch.bool)
    mask[4:] = False
    layer.set_masks(expert_mask=mask)
    res = layer.forward_with_aux(torch.randn(30, 16))
    assert int(res.expert_ids.max()) < 4 and res.counts[4:].sum() == 0


def test_forced_cuda_backend_on_cpu_raises():
    with pytest.raises(_backend.BackendUnavailableError, match="cuda"):
        moe.moe_permute(torch.zeros(3, 2, dtype=torch.long), 2, backend="cuda")


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: moe.moe_permute(torch.zeros(3, 2, dtype=torch.int32), 2), "int64"),
        (
            lambda: moe.grouped_mlp(
                torch.randn(4, 8),
                torch.tensor([0, 4]),
                torch.randn(1, 3, 7),
                torch.randn(1, 3, 7),
                torch.randn(1, 8, 3),
            ),
            "w_gate",
        ),
        (
            lambda: moe.grouped_mlp(
                torch.randn(4, 8),
                torch.tensor([0, 4]),
                torch.randn(1, 3, 8),
                torch.randn(1, 3, 8),
                torch.randn(1, 3, 8),
            ),
            "w_down",
        ),
        (
            lambda: moe.grouped_mlp(
                torch.randn(4, 8),
                torch.tensor([0, 2, 4]),
                torch.randn(1, 3, 8),
                torch.randn(1, 3, 8),
                torch.randn(1, 8, 3),
            ),
            "offsets",
        ),
        (
            lambda: moe.grouped_mlp(
                torch.randn(4, 8),
                torch.tensor([0, 4]),
                torch.randn(1, 3, 8).half(),
                torch.randn(1, 3, 8),
                torch.randn(1, 8, 3),
            ),
            "w_gate",
        ),
        (lambda: moe.moe_dispatch(torch.randn(4, 8), torch.arange(6), torch.arange(6), 2), "perm"),
        (lambda: moe.moe_combine(torch.randn(6, 8), torch.arange(6), torch.arange(6), torch.rand(5), 2), "weights"),
        (lambda: moe.fft_features(torch.randint(0, 3, (4, 8)), 2), "fp32"),
        (lambda: moe.MoEFFN(16, 8, 4, k=5), "k=5"),
        (lambda: moe.MoEFFN(16, 8, 4, act="relu"), "activation"),
        (lambda: moe.route(torch.randn(4, 3), 4), "k=4"),
    ],
)
def test_bad_input_names_the_problem(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="mmt_kernels._C not built")
def test_cpp_op_rejects_unsorted_offsets():
    wg, wu, wd = expert_weights(2, 3, 4, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="offsets"):
        torch.ops.mmt.moe_grouped_mlp(torch.randn(4, 4), torch.tensor([0, 3, 2]), wg, wu, wd, 0)


# ---- op registration: opcheck (schema, fake kernels, aot dispatch) and torch.compile -----------


def _op_cases():
    gen = torch.Generator().manual_seed(0)
    ids = make_ids(6, 2, 4, "gaps", gen)
    perm, inv, offsets = ref.permute(ids, 4)
    x, yp, w = torch.randn(6, 10, generator=gen), torch.randn(12, 10, generator=gen), torch.rand(12, generator=gen)
    wg, wu, wd = expert_weights(4, 7, 10, torch.float32, gen)
    y, g, u = _ref_mlp(yp, offsets, wg, wu, wd, 0)
    basis = ref.dft_basis(10, 4)
    reim = x @ basis
    return {
        "moe_permute": (ids, 4),
        "moe_dispatch": (x, perm, w, 2),
        "moe_combine": (yp, inv, w, 2),
        "moe_combine_weight_grad": (x, yp, inv, 2),
        "moe_grouped_mlp": (yp, offsets, wg, wu, wd, 1),
        "moe_grouped_mlp_backward": (
            y,
            yp,
            g,
            u,
            offsets,
            wg,
            wu,
            wd,
            torch.tensor([True, False, True, True]),
            0,
            True,
            True,
        ),
        "moe_fft_features": (x, basis),
        "moe_fft_features_backward": (torch.randn(6, 4, generator=gen), reim, basis),
    }


@pytest.mark.skipif("cpu" not in BACKENDS, reason="mmt_kernels._C not built")
@pytest.mark.parametrize("name", list(_op_cases()))
def test_opcheck_cpu(name):
    torch.library.opcheck(getattr(torch.ops.mmt, name).default, _op_cases()[name])


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not usable")
@pytest.mark.parametrize("name", ["moe_permute", "moe_combine", "moe_grouped_mlp", "moe_fft_features"])
def test_opcheck_triton_custom_ops(name):
    op = getattr(torch.ops.mmt, name + "_triton").default
    torch.library.opcheck(op, _op_cases()[name], test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="mmt_kernels._C not built")
def test_torch_compile_fullgraph_cpu():
    gen = torch.Generator().manual_seed(0)
    x, logits = torch.randn(12, 16, generator=gen), torch.randn(12, 4, generator=gen)
    wg, wu, wd = expert_weights(4, 8, 16, torch.float32, gen)

    def f(x_, l_):
        r = moe.moe_ffn(x_, l_, wg, wu, wd, k=2, backend="cpu")
        return r.out, r.aux_loss

    got = torch.compile(f, fullgraph=True)(x, logits)
    want = f(x, logits)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.skipif("cpu" not in BACKENDS, reason="mmt_kernels._C not built")
@pytest.mark.parametrize("T,d,f,E,k", [(29, 24, 10, 5, 2), (33, 8, 40, 4, 2)])
def test_cpu_low_memory_and_three_node_paths_agree(T, d, f, E, k):
    """The chunked single-node CPU backward and the dispatch/MLP/combine path give the same gradients,
    and "auto" picks the chunked one exactly when k*d > f."""
    gen = torch.Generator().manual_seed(7)
    x, logits = torch.randn(T, d, generator=gen), torch.randn(T, E, generator=gen)
    weights = expert_weights(E, f, d, torch.float32, gen)
    dout = torch.randn(T, d, generator=gen)

    def run(low_memory):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, logits, *weights)]
        r = moe.moe_ffn(*leaves, k=k, backend="cpu", low_memory=low_memory)
        (r.out * dout).sum().add(r.aux_loss).backward()
        return [r.out.detach()] + [t.grad for t in leaves]

    chunked, three_node, auto = run(True), run(False), run("auto")
    for a, b in zip(chunked, three_node):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    expected = chunked if k * d > f else three_node
    for a, b in zip(auto, expected):
        assert torch.equal(a, b)

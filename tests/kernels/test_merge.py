"""merge / magnitude_threshold: every available backend against the reference, the reference against
peft's merge_utils, DARE reproducibility, edge cases, errors, opcheck, torch.compile."""

from __future__ import annotations

import pytest
import torch

import mmt_kernels
from mmt_kernels import _backend
from mmt_kernels import merge as M
from mmt_kernels.reference import merge as R

from .tolerance import assert_close_to_golden

BACKENDS = [b for b in ("reference", "cpu", "triton") if _backend.available(b, "cpu", "merge")[0]]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1,), (7, 33), (1000,), (3, 1111)]  # one element, odd 2-D, not multiples of any block


def make_case(shape, K, dtype, seed=0, with_base=True):
    """Base and K models whose task vectors are exact in fp32 (bf16-representable parts, close exponents),
    so the golden fp64 run trims exactly the same elements as the low-precision runs."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).bfloat16().float()
    models = []
    for _ in range(K):
        delta = (torch.randn(shape, generator=g) * 0.05).bfloat16().float()
        models.append((base + delta) if with_base else delta)
    return [m.to(dtype) for m in models], (base.to(dtype) if with_base else None)


def golden_and_low(tensors, base, method, **kw):
    thr = None
    if method == "ties":
        thr = M.magnitude_threshold(tensors, base, density=kw.pop("density"), backend="reference")
        kw["thresholds"] = thr
    else:
        kw.setdefault("density", 0.5)
    gold = M.merge(
        [t.double() for t in tensors],
        None if base is None else base.double(),
        method=method,
        **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()},
        backend="reference",
    )
    low = M.merge(tensors, base, method=method, backend="reference", **kw)
    return gold, low, kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", R.METHODS)
def test_merge_matches_reference(backend, dtype, shape, method):
    K = 3
    tensors, base = make_case(shape, K, dtype, seed=hash((shape, method)) % 1000)
    kw = dict(weights=[0.7, 1.3, -0.4], lam=0.9, seed=11, density=[0.3, 0.5, 0.9])
    gold, low, kw = golden_and_low(tensors, base, method, **kw)
    out = M.merge(tensors, base, method=method, backend=backend, **kw)
    assert out.dtype == dtype and out.shape == tensors[0].shape
    assert_close_to_golden(out, low, gold.to(dtype) if dtype != torch.float32 else gold, name=f"{method}/{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_sign_by_count_and_task_vectors(backend, method):
    tensors, _ = make_case((517,), 4, torch.float32, with_base=False)
    kw = dict(weights=[1.0, 0.5, 2.0, 1.0], sign="count", density=0.4, seed=3)
    gold, low, kw = golden_and_low(tensors, None, method, **kw)
    out = M.merge(tensors, None, method=method, backend=backend, **kw)
    assert_close_to_golden(out, low, gold)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,density", [(1, 1.0), (1, 0.5), (1000, 0.2), (4097, 0.013), (3000, 1.0), (5, 0.0)])
def test_threshold_is_exact(backend, dtype, n, density):
    tensors, base = make_case((n,), 2, dtype, seed=n)
    got = M.magnitude_threshold(tensors, base, density=density, backend=backend)
    want = R.magnitude_threshold(tensors, base, [int(density * n)] * 2)
    assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_with_ties_and_zeros(backend):
    # bf16 magnitudes repeat a lot and some deltas are exactly 0: the k-th value is still exact.
    x = torch.randint(-4, 5, (2000,)).bfloat16() / 4
    got = M.magnitude_threshold([x, -x, x * 0], None, density=[0.1, 0.7, 0.5], backend=backend)
    want = R.magnitude_threshold([x, -x, x * 0], None, [200, 1400, 1000])
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_single_model_is_bit_identical(backend, dtype):
    x = torch.randn(3, 1025).to(dtype)
    # -0.0, a subnormal and the largest value survive (the Triton interpreter flushes bf16 subnormals
    # when converting through numpy, so it gets a normal value there).
    tiny = torch.finfo(dtype).tiny * (4 if backend == "triton" and _backend.triton_interpret() else 0.25)
    x[0, :4] = torch.tensor([-0.0, 0.0, tiny, -torch.finfo(dtype).max])
    out = M.merge([x], torch.randn_like(x), method="linear", weights=[1.0], backend=backend)
    assert torch.equal(
        out.view(torch.int16 if dtype != torch.float32 else torch.int32),
        x.view(torch.int16 if dtype != torch.float32 else torch.int32),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend):
    tensors, base = make_case((0,), 2, torch.float32)
    assert M.merge(tensors, base, method="ties", density=0.5, backend=backend).shape == (0,)
    tensors, base = make_case((64,), 2, torch.float32)
    # density 0 keeps nothing: TIES returns the base exactly.
    assert torch.equal(M.merge(tensors, base, method="ties", density=0.0, backend=backend), base)
    # DARE with p = 1 is task arithmetic.
    torch.testing.assert_close(
        M.merge(tensors, base, method="dare_linear", density=1.0, backend=backend),
        M.merge(tensors, base, method="task_arithmetic", backend=backend),
        rtol=0,
        atol=0,
    )
    # A stacked [K, ...] input is the same as a list.
    stacked = torch.stack(tensors)
    assert torch.equal(
        M.merge(stacked, base, method="ties", density=0.3, backend=backend),
        M.merge(tensors, base, method="ties", density=0.3, backend=backend),
    )


# ---- the CPU kernel's paths: baseline vs AVX2 build, sampled bracket vs radix fallback -----------------

CPU_ISAS = ["default", "baseline"]  # MMT_CPU_ISA=baseline forces the non-AVX2 build of merge_loops.h


def _set_isa(monkeypatch, isa):
    if isa == "baseline":
        monkeypatch.setenv("MMT_CPU_ISA", "baseline")
    else:
        monkeypatch.delenv("MMT_CPU_ISA", raising=False)


def _bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no C++ kernels")
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 7, 255, 257, 513, 70001])  # around the 256/512 blocks and vector widths
@pytest.mark.parametrize("method", R.METHODS)
def test_cpu_isa_paths_match_reference_bitwise(monkeypatch, isa, dtype, n, method):
    _set_isa(monkeypatch, isa)
    tensors, base = make_case((n,), 3, dtype, seed=n + 1)
    kw = {"density": 0.3, "weights": [0.5, 1.0, 1.5], "seed": 7}
    if method == "linear":
        kw.pop("density")
    got = M.merge(tensors, base, method=method, backend="cpu", **kw)
    want = M.merge(tensors, base, method=method, backend="reference", **kw)
    assert torch.equal(_bits(got), _bits(want))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no C++ kernels")
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("data", ["smooth", "tied", "zeros"])
@pytest.mark.parametrize("with_base", [True, False])
def test_cpu_threshold_large_paths_exact(monkeypatch, isa, dtype, data, with_base):
    # n > 4 * 2^14: the kernel samples a bracket; tied bf16 deltas make it histogram the bracket, and all-zero
    # tasks put every element in one bin. Several densities, including the extremes.
    _set_isa(monkeypatch, isa)
    n = 300_001
    g = torch.Generator().manual_seed(3)
    base = torch.randn(n, generator=g).to(dtype)
    if data == "smooth":
        xs = [(base.float() + torch.randn(n, generator=g) * 0.01).to(dtype) for _ in range(3)]
    elif data == "tied":
        xs = [(base.float() + torch.randint(-3, 4, (n,), generator=g) / 64).to(dtype) for _ in range(3)]
    else:
        xs = [base.clone() for _ in range(3)]
    b = base if with_base else None
    for dens in ([0.2, 0.013, 0.9], [1.0 / n, 1.0, 0.5]):
        ks = [int(d * n) for d in dens]
        got = M.magnitude_threshold(xs, b, density=dens, backend="cpu")
        assert torch.equal(got, R.magnitude_threshold(xs, b, ks)), (data, dens)
    got = M.merge(xs, b, method="ties", density=0.2, backend="cpu")
    assert torch.equal(_bits(got), _bits(M.merge(xs, b, method="ties", density=0.2, backend="reference")))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no C++ kernels")
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpu_threshold_when_the_sample_misses(monkeypatch, isa):
    # Large values exactly where the kernel samples (stride n / 2^14), zeros elsewhere: the sampled bracket
    # misses the k-th value, and radix select must still find it.
    _set_isa(monkeypatch, isa)
    n, S = 300_001, 1 << 14
    x = torch.zeros(n)
    x[torch.arange(S) * n // S] = torch.arange(1, S + 1, dtype=torch.float32)
    for dens in (0.2, 0.01, 0.05):
        got = M.magnitude_threshold([x, -x], None, density=dens, backend="cpu")
        assert torch.equal(got, R.magnitude_threshold([x, -x], None, [int(dens * n)] * 2)), dens


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no C++ kernels")
def test_cpu_isa_paths_agree_with_each_other(monkeypatch):
    tensors, base = make_case((5, 4099), 4, torch.bfloat16, seed=11)
    outs = []
    for isa in CPU_ISAS:
        _set_isa(monkeypatch, isa)
        outs.append(M.merge(tensors, base, method="dare_ties", density=0.4, seed=3, backend="cpu"))
    assert torch.equal(_bits(outs[0]), _bits(outs[1]))


# ---- the reference is the published definition (as implemented in peft) -----------------------------

peft_mu = pytest.importorskip("peft.utils.merge_utils")


@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.1, 0.35, 1.0])
def test_reference_ties_equals_peft(sign, density):
    tv = [torch.randn(40, 31, dtype=torch.float64) for _ in range(4)]
    w = torch.tensor([0.5, 1.0, 1.5, -0.3], dtype=torch.float64)
    want = peft_mu.ties(tv, w, density, majority_sign_method=sign)
    got = mmt_kernels.merge_tensors(
        tv, None, method="ties", weights=w, density=density, sign="total" if sign == "total" else "count"
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reference_task_arithmetic_and_linear_equal_peft():
    tv = [torch.randn(100, dtype=torch.float64) for _ in range(3)]
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    want = peft_mu.task_arithmetic(tv, w)
    torch.testing.assert_close(mmt_kernels.merge_tensors(tv, None, method="task_arithmetic", weights=w), want)
    torch.testing.assert_close(mmt_kernels.merge_tensors(tv, None, method="linear", weights=w), want)


@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_reference_dare_equals_peft_given_the_same_mask(sign):
    # peft draws with torch.bernoulli; feed it our hash mask through random_pruning's math.
    p, seed = 0.3, 7
    tv = [torch.randn(5000, dtype=torch.float64) for _ in range(3)]
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    pruned = [t * R.dare_keep_mask(t.numel(), k, seed, p) / p for k, t in enumerate(tv)]
    stacked = torch.stack(pruned)
    mask = peft_mu.calculate_majority_sign_mask(stacked, method=sign)
    want_ties = peft_mu.disjoint_merge(stacked * w[:, None], mask)
    got = mmt_kernels.merge_tensors(
        tv, None, method="dare_ties", weights=w, density=p, seed=seed, sign="total" if sign == "total" else "count"
    )
    torch.testing.assert_close(got, want_ties, rtol=1e-12, atol=1e-12)
    got_lin = mmt_kernels.merge_tensors(tv, None, method="dare_linear", weights=w, density=p, seed=seed)
    torch.testing.assert_close(got_lin, peft_mu.task_arithmetic(pruned, w), rtol=1e-12, atol=1e-12)


def test_dare_mask_statistics_and_reproducibility():
    n = 200_000
    a = R.dare_keep_mask(n, 0, 123, 0.25)
    assert abs(a.float().mean().item() - 0.25) < 0.005
    assert torch.equal(a, R.dare_keep_mask(n, 0, 123, 0.25))
    b, c = R.dare_keep_mask(n, 1, 123, 0.25), R.dare_keep_mask(n, 0, 124, 0.25)
    # Different task or seed: independent draws (overlap ~ p^2).
    for other in (b, c):
        assert abs((a & other).float().mean().item() - 0.0625) < 0.004
    assert R.dare_keep_mask(n, 0, 0, 1.0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dare_keep_mask_from_the_kernel_equals_the_reference(backend):
    for n in (0, 1, 7, 257, 5003):  # around the kernels' block sizes
        for task in (0, 1, 4):
            for p in (0.0, 0.1, 0.5, 1.0):
                got = M.dare_keep_mask(n, task, 99, p, backend=backend)
                assert got.dtype == torch.bool and got.shape == (n,)
                assert torch.equal(got, R.dare_keep_mask(n, task, 99, p)), (n, task, p)


# ---- errors, opcheck, compile ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(tensors=[torch.randn(4), torch.randn(5)]), ValueError, r"tensors\[1\] has shape"),
        (dict(tensors=[torch.randn(4), torch.randn(4).half()]), TypeError, r"tensors\[1\] is torch.float16"),
        (dict(base=torch.randn(3)), ValueError, "base has shape"),
        (dict(method="slerp"), ValueError, "unknown method"),
        (dict(method="dare_ties", density=0.0), ValueError, "DARE density"),
        (dict(weights=[1.0, 2.0, 3.0]), ValueError, "3 weights for 2 tensors"),
        (dict(sign="majority"), ValueError, "sign must be"),
        (dict(tensors=[torch.randn(4).int(), torch.randn(4).int()], base=None), TypeError, "fp32, bf16 or fp16"),
    ],
)
def test_bad_input_names_the_problem(backend, kwargs, exc, match):
    args = dict(tensors=[torch.randn(4), torch.randn(4)], base=torch.randn(4), method="ties", density=0.5)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        M.merge(args.pop("tensors"), args.pop("base"), backend=backend, **args)


def test_fp64_is_reference_only():
    with pytest.raises(mmt_kernels.BackendUnavailableError, match="fp64"):
        M.merge([torch.randn(3, dtype=torch.float64)], method="linear", backend="cpu")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="mmt_kernels._C not built")
def test_cpp_kernel_errors_are_clear():
    with pytest.raises(RuntimeError, match="needs thresholds"):
        torch.ops.mmt.merge([torch.randn(3)], None, [1.0], None, [], "ties", 1.0, 0, False)
    with pytest.raises(RuntimeError, match="unknown method"):
        torch.ops.mmt.merge([torch.randn(3)], None, [1.0], None, [], "nope", 1.0, 0, False)
    with pytest.raises(RuntimeError, match=r"ks\[0\]=9"):
        torch.ops.mmt.merge_threshold([torch.randn(3)], None, [9])


@pytest.mark.skipif("cpu" not in BACKENDS, reason="mmt_kernels._C not built")
def test_opcheck_cpu():
    xs = [torch.randn(5, 7) for _ in range(3)]
    base = torch.randn(5, 7)
    torch.library.opcheck(torch.ops.mmt.merge_threshold.default, (xs, base, [3, 0, 35]))
    thr = torch.ops.mmt.merge_threshold(xs, base, [10, 10, 10])
    for method in R.METHODS:
        torch.library.opcheck(
            torch.ops.mmt.merge.default,
            (xs, base, [1.0, 0.5, 0.25], thr if method == "ties" else None, [0.5, 0.5, 0.5], method, 0.8, 3, False),
        )


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_torch_compile_fullgraph(backend):
    def f(a, b, base):
        return M.merge([a, b], base, method="dare_ties", density=0.5, seed=1, backend=backend) * 2

    xs = [torch.randn(300) for _ in range(3)]
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(*xs), f(*xs))

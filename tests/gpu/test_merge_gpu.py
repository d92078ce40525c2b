"""merge / magnitude_threshold on CUDA tensors at realistic sizes: cuda and triton backends vs the reference."""

from __future__ import annotations

import pytest
import torch

from mmt_kernels import _backend
from mmt_kernels import merge as M
from mmt_kernels.reference import merge as R

from ..kernels.tolerance import assert_close_to_golden

pytestmark = pytest.mark.gpu

GPU_BACKENDS = [
    b for b in ("cuda", "triton") if torch.cuda.is_available() and _backend.available(b, "cuda", "merge")[0]
]


def make_case(n, K, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    base = torch.randn(n, generator=g, device="cuda").bfloat16().float()
    models = [
        (base + (torch.randn(n, generator=g, device="cuda") * 0.05).bfloat16().float()).to(dtype) for _ in range(K)
    ]
    return models, base.to(dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,K", [(4096 * 4096 + 17, 8), (13824 * 512, 3), (1, 1), (1000, 32)])
def test_threshold_exact(backend, dtype, n, K):
    xs, base = make_case(n, K, dtype, seed=n % 97)
    dens = [0.2, 0.05, 1.0, 0.0] * (K // 4) + [0.3] * (K % 4)
    got = M.magnitude_threshold(xs, base, density=dens, backend=backend)
    want = R.magnitude_threshold(xs, base, [int(d * n) for d in dens])
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", R.METHODS)
@pytest.mark.parametrize("n,K", [(4096 * 4096 + 17, 8), (5120 * 13 + 3, 4)])
def test_merge_matches_reference(backend, dtype, method, n, K):
    xs, base = make_case(n, K, dtype, seed=K)
    w = [0.5 + 0.25 * k for k in range(K)]
    kw = dict(weights=w, lam=0.9, seed=5, density=0.3)
    if method == "ties":
        kw["thresholds"] = M.magnitude_threshold(xs, base, density=0.3, backend="reference")
    low = M.merge(xs, base, method=method, backend="reference", **kw)
    gkw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    gold = M.merge([x.double() for x in xs], base.double(), method=method, backend="reference", **gkw)
    out = M.merge(xs, base, method=method, backend=backend, **kw)
    assert_close_to_golden(out, low, gold.to(dtype) if dtype != torch.float32 else gold, name=f"{method}/{backend}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_linear_single_model_bit_identical(backend):
    x = torch.randn(4097, 33, device="cuda").bfloat16()
    out = M.merge([x], None, method="linear", weights=[1.0], backend=backend)
    assert torch.equal(out.view(torch.int16), x.view(torch.int16))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_dare_same_mask_as_cpu(backend):
    xs, base = make_case(100_003, 3, torch.float32)
    out = M.merge(xs, base, method="dare_ties", density=0.2, seed=77, backend=backend).cpu()
    cpu = M.merge([x.cpu() for x in xs], base.cpu(), method="dare_ties", density=0.2, seed=77, backend="reference")
    torch.testing.assert_close(out, cpu, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif("cuda" not in GPU_BACKENDS, reason="no CUDA kernels built")
def test_opcheck_cuda():
    xs = [torch.randn(5, 7, device="cuda") for _ in range(3)]
    base = torch.randn(5, 7, device="cuda")
    torch.library.opcheck(torch.ops.mmt.merge_threshold.default, (xs, base, [3, 0, 35]))
    thr = torch.ops.mmt.merge_threshold(xs, base, [10, 10, 10])
    for method in R.METHODS:
        torch.library.opcheck(
            torch.ops.mmt.merge.default,
            (xs, base, [1.0, 0.5, 0.25], thr if method == "ties" else None, [0.5] * 3, method, 0.8, 3, False),
        )

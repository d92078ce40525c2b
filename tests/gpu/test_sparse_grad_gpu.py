"""Family 1b on CUDA: the cuda and triton backends of sparse_weight_grad_ against the fp64 reference at realistic
and awkward sizes (skipped without a GPU). Run on a GPU machine after building in place."""

from __future__ import annotations

import pytest
import torch

from mmt_kernels import _backend
from mmt_kernels import sparse_grad as S
from mmt_kernels.reference import sparse_grad as ref
from tests.kernels.tolerance import assert_close_to_golden, poison_

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "N,R,C,K", [(512, 11008, 4096, 1100), (512, 4096, 11008, 409), (37, 65, 129, 63), (1, 1, 1, 1)]
)
@pytest.mark.parametrize("transposed", [False, True])
def test_matches_reference(backend, dtype, N, R, C, K, transposed):
    ok, why = _backend.available(backend, "cuda", "sparse_weight_grad_")
    if not ok:
        pytest.skip(f"{backend} unavailable: {why}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(N, R, device="cuda", generator=gen).to(dtype)
    b = torch.randn(N, C, device="cuda", generator=gen).to(dtype)
    rows = torch.randperm(R, device="cuda", generator=gen)[:K].sort().values
    shape = (C, K) if transposed else (K, C)  # [C, K]: the column neurons' layout
    acc0 = torch.randn(shape, device="cuda", generator=gen)
    golden = acc0.double().clone()
    ref.sparse_weight_grad_(golden, a.double(), rows, b.double(), transposed)
    low = acc0.clone()
    ref.sparse_weight_grad_(low, a, rows, b, transposed)
    out = acc0.clone()
    S.sparse_weight_grad_(out, a, rows, b, transposed=transposed, backend=backend)
    assert_close_to_golden(out, low, golden, factor=2.0, ulps=4.0 * N**0.5 + 4, name="acc")
    nan = poison_(torch.empty(shape, device="cuda"))
    S.sparse_weight_grad_(nan, a, rows, b, transposed=transposed, backend=backend)
    assert torch.isnan(nan).all()

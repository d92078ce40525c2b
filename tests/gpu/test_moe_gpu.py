"""Family 2 on a GPU: the cuda and triton backends against the reference at realistic sizes.

Skipped without CUDA. Run on a GPU machine after building in place:
``pip install --no-build-isolation --no-deps -e . && pytest tests/gpu/test_moe_gpu.py -q``.
"""

from __future__ import annotations

import pytest
import torch

import mmt_kernels.moe as moe
from mmt_kernels import _backend
from mmt_kernels.reference import moe as ref

from ..kernels.tolerance import assert_close_to_golden

pytestmark = pytest.mark.gpu

DEV = "cuda"
GPU_BACKENDS = ["cuda", "triton"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _need(backend, op="moe_permute"):
    ok, why = _backend.available(backend, "cuda", op) if torch.cuda.is_available() else (False, "no CUDA")
    if not ok:
        pytest.skip(why)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("T,k,E", [(4096, 2, 8), (4096, 8, 64), (8191, 2, 16), (1, 1, 1), (3000, 4, 257)])
def test_permute_gpu(backend, T, k, E):
    _need(backend)
    ids = torch.rand(T, E, device=DEV).topk(k, dim=1).indices
    ids[: T // 3, 0] = 0  # a crowded expert
    perm, inv, offsets = moe.moe_permute(ids, E, backend=backend)
    rperm, rinv, roff = ref.permute(ids.cpu(), E)
    assert torch.equal(perm.cpu(), rperm) and torch.equal(inv.cpu(), rinv) and torch.equal(offsets.cpu(), roff)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dispatch_combine_gpu(backend, dtype):
    _need(backend)
    T, k, E, d = 4096, 2, 8, 1024
    ids = torch.rand(T, E, device=DEV).topk(k, dim=1).indices
    perm, inv, _ = ref.permute(ids, E)
    x = torch.randn(T, d, device=DEV)
    w = torch.rand(T * k, device=DEV)
    xp = moe.moe_dispatch(x.to(dtype), perm, inv, k, backend=backend)
    assert torch.equal(xp, x.to(dtype)[perm // k])
    yp = torch.randn(T * k, d, device=DEV).to(dtype).requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    out = moe.moe_combine(yp, inv, perm, wr, k, backend=backend)
    dout = torch.randn(T, d, device=DEV).to(dtype)
    out.backward(dout)
    low = ref.combine(yp.detach(), inv, k, w)
    gold = ref.combine(yp.detach().double(), inv, k, w.double())
    assert_close_to_golden(out.detach(), low, gold, name="combine")
    y64, w64 = yp.detach().double().requires_grad_(True), w.double().requires_grad_(True)
    ref.combine(y64, inv, k, w64).backward(dout.double())
    assert_close_to_golden(
        wr.grad,
        (dout.float().repeat_interleave(k, 0) * yp.detach().float()[inv]).sum(1),
        w64.grad,
        name="dweights",
        ulps=64,
    )
    # determinism: no atomics
    again = moe.moe_combine(yp.detach(), inv, perm, w, k, backend=backend)
    assert torch.equal(again, out.detach())


def _mlp_grads(xp, offsets, wg, wu, wd, dy, backend, act="silu", mask=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in (xp, wg, wu, wd)]
    y = moe.grouped_mlp(leaves[0], offsets, *leaves[1:], act=act, train_mask=mask, backend=backend)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4096, 2, 8, 1024, 2816), (4096, 8, 64, 1024, 256), (1000, 2, 7, 640, 333)])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_grouped_mlp_triton_gpu(dtype, shape, act):
    _need("triton", "moe_grouped_mlp")
    T, k, E, d, f = shape
    ids = torch.rand(T, E, device=DEV).topk(k, dim=1).indices
    ids[:, 0] = torch.where(torch.rand(T, device=DEV) < 0.3, 0, ids[:, 0])
    ids = torch.where(ids == E - 1, 0, ids)  # expert E-1 stays empty
    _, _, offsets = ref.permute(ids, E)
    N = T * k
    gen = torch.Generator(device=DEV).manual_seed(0)
    xp = torch.randn(N, d, device=DEV, generator=gen)
    wg = torch.randn(E, f, d, device=DEV, generator=gen) / d**0.5
    wu = torch.randn(E, f, d, device=DEV, generator=gen) / d**0.5
    wd = torch.randn(E, d, f, device=DEV, generator=gen) / f**0.5
    dy = torch.randn(N, d, device=DEV, generator=gen)
    cast = lambda ts, dt: [t.to(dt) for t in ts]  # noqa: E731
    out = _mlp_grads(*cast([xp], dtype), offsets, *cast([wg, wu, wd, dy], dtype), "triton", act)
    low = _mlp_grads(*cast([xp], dtype), offsets, *cast([wg, wu, wd, dy], dtype), "reference", act)
    gold = _mlp_grads(xp.double(), offsets, *cast([wg, wu, wd, dy], torch.float64), "reference", act)
    for name, o, lo, g in zip(("y", "dx", "dw_gate", "dw_up", "dw_down"), out, low, gold):
        assert_close_to_golden(o, lo, g, name=name, ulps=16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fft_features_triton_gpu(dtype):
    _need("triton", "moe_fft_features")
    x = torch.randn(4096, 1024, device=DEV).to(dtype).requires_grad_(True)
    g = torch.randn(4096, 256, device=DEV).to(dtype)
    out = moe.fft_features(x, 256, backend="triton")
    out.backward(g)
    x64 = x.detach().double().requires_grad_(True)
    gold = ref.fft_features(x64, 256)
    gold.backward(g.double())
    xl = x.detach().clone().requires_grad_(True)
    low = ref.fft_features(xl, 256)
    low.backward(g)
    assert_close_to_golden(out.detach(), low.detach(), gold.detach(), name="feats", ulps=8)
    assert_close_to_golden(x.grad, xl.grad, x64.grad, name="dx", ulps=8)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_moe_layer_gpu_matches_loop_and_is_deterministic(backend, dtype):
    _need(backend)
    T, d, f, E, k = 2048, 512, 384, 8, 2
    gen = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn(T, d, device=DEV, generator=gen)
    logits = torch.randn(T, E, device=DEV, generator=gen)
    wg = torch.randn(E, f, d, device=DEV, generator=gen) / d**0.5
    wu = torch.randn(E, f, d, device=DEV, generator=gen) / d**0.5
    wd = torch.randn(E, d, f, device=DEV, generator=gen) / f**0.5

    def run(fn, dt):
        leaves = [t.to(dt).detach().clone().requires_grad_(True) for t in (x, logits, wg, wu, wd)]
        out, aux, z = fn(*leaves)
        (out.float().square().sum() + aux + z).backward()
        return [out.detach()] + [t.grad for t in leaves]

    def ours(*a):
        r = moe.moe_ffn(*a, k=k, backend=backend)
        return r.out, r.aux_loss, r.z_loss

    loop = lambda *a: ref.moe_ffn(*a, k=k)  # noqa: E731
    a, b = run(ours, dtype), run(ours, dtype)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    low, gold = run(loop, dtype), run(loop, torch.float64)
    for name, o, lo, g in zip(("out", "dx", "dlogits", "dw_gate", "dw_up", "dw_down"), a, low, gold):
        assert_close_to_golden(o, lo, g, name=name, ulps=16)

"""Family 1 on CUDA at realistic sizes: cuda and triton backends against the reference (skipped without a GPU).

Run on a GPU machine after building in place: ``pytest tests/gpu/test_sparse_adamw_gpu.py -q``.
"""

from __future__ import annotations

import pytest
import torch

import mmt_kernels
from mmt_kernels import _backend
from mmt_kernels import reference as ref
from tests.kernels.test_gpu_readiness import sparse_adamw_multi_opcheck_args
from tests.kernels.tolerance import assert_close_to_golden

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ["cuda", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _need(backend, op):
    ok, why = _backend.available(backend, "cuda", op)
    if not ok:
        pytest.skip(f"{backend} unavailable for {op}: {why}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,neuron_dim", [((11008, 4096), 0), ((4096, 11008), 1), ((4097, 1023), 0)])
def test_sparse_adamw_matches_reference(backend, dtype, shape, neuron_dim):
    _need(backend, "sparse_adamw_")
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    R = shape[neuron_dim]
    C = shape[1 - neuron_dim]
    rows = torch.randperm(R, device=dev, generator=gen)[: R // 10].sort().values
    K = rows.numel()
    param = torch.randn(shape, device=dev, generator=gen).to(dtype)
    state = (K, C) if neuron_dim == 0 else (C, K)  # compact: [K, C] rows, [C, K] columns
    m = torch.randn(state, device=dev, generator=gen) * 0.1
    v = torch.rand(state, device=dev, generator=gen) * 0.01
    g = torch.randn(shape, device=dev, generator=gen).to(dtype)
    row_step = torch.randint(1, 50, (K,), device=dev, generator=gen)
    scale = torch.rand(K, device=dev, generator=gen)
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=1, neuron_dim=neuron_dim, compact=True)
    gold = [param.double(), m.double(), v.double()]
    ref.sparse_adamw_(*gold, g.double(), rows, scale.double(), row_step, **kw)
    low = [param.clone(), m.clone(), v.clone()]
    ref.sparse_adamw_(*low, g, rows, scale, row_step, **kw)
    out = [param.clone(), m.clone(), v.clone()]
    mmt_kernels.sparse_adamw_(*out, g, rows, row_scale=scale, row_step=row_step, backend=backend, **kw)
    for name, o, lo, gd in zip(("param", "exp_avg", "exp_avg_sq"), out, low, gold):
        assert_close_to_golden(o, lo, gd.to(o.dtype) if o.dtype != torch.float32 else gd, name=name)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_one_launch_matches_reference(backend, dtype):
    """A Llama-7B-shaped FFN (gate/up rows, down columns) + a bias, union state with state_rows."""
    _need(backend, "sparse_adamw_multi_")
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(1)
    specs = [((11008, 4096), 0), ((11008, 4096), 0), ((4096, 11008), 1), ((11008,), 0)]
    case = []
    for shape, nd in specs:
        R = shape[nd] if len(shape) == 2 else shape[0]
        C = shape[1 - nd] if len(shape) == 2 else 1
        rows = torch.randperm(R, device=dev, generator=gen)[: R // 10].sort().values
        U = rows.numel() + 100
        srows = torch.randperm(U, device=dev, generator=gen)[: rows.numel()]
        case.append(
            dict(
                p=torch.randn(shape, device=dev, generator=gen).to(dtype),
                nd=nd,
                rows=rows,
                srows=srows,
                m=torch.randn((U, C) if nd == 0 else (C, U), device=dev, generator=gen) * 0.1,  # [C, U]: columns
                v=torch.rand((U, C) if nd == 0 else (C, U), device=dev, generator=gen) * 0.01,
                g=torch.randn(shape, device=dev, generator=gen).to(dtype),
                st=torch.randint(1, 9, (rows.numel(),), device=dev, generator=gen),
            )
        )

    def run(fn, to, **kw):
        ps, ms, vs = ([to(c[key]).clone() for c in case] for key in ("p", "m", "v"))
        fn(
            ps,
            ms,
            vs,
            [to(c["g"]) for c in case],
            [c["rows"] for c in case],
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            step=1,
            neuron_dims=[c["nd"] for c in case],
            state_rows=[c["srows"] for c in case],
            row_scales=[None] * len(case),
            row_steps=[c["st"] for c in case],
            compact=True,
            **kw,
        )
        return ps, ms, vs

    def ref_fn(ps, ms, vs, gs, rows, *, state_rows, row_scales, row_steps, **kw):
        ref.sparse_adamw_multi_(ps, ms, vs, gs, rows, state_rows, row_scales, row_steps, **kw)

    gold = run(ref_fn, lambda t: t.double())
    low = run(ref_fn, lambda t: t)
    out = run(mmt_kernels.sparse_adamw_multi_, lambda t: t, backend=backend)
    for j, name in enumerate(("param", "exp_avg", "exp_avg_sq")):
        for i in range(len(case)):
            o = out[j][i]
            assert_close_to_golden(
                o, low[j][i], gold[j][i].to(o.dtype) if o.dtype != torch.float32 else gold[j][i], name=f"{name}[{i}]"
            )


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,M", [(2048, 11008), (2048, 4096), (777, 333), (1, 5)])
def test_taylor_matches_reference(backend, dtype, N, M):
    _need(backend, "taylor_accumulate_")
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(2)
    act = torch.randn(N, M, device=dev, generator=gen).to(dtype)
    grad = (torch.randn(N, M, device=dev, generator=gen) * 1e-3).to(dtype)
    w = torch.rand(N, device=dev, generator=gen) / 256
    acc0 = torch.rand(M, device=dev, generator=gen)
    gold = acc0.double().clone()
    ref.taylor_accumulate_(gold, act.double(), grad.double(), w.double())
    low = acc0.clone()
    ref.taylor_accumulate_(low, act, grad, w)
    out = acc0.clone()
    mmt_kernels.taylor_accumulate_(out, act, grad, token_weight=w, backend=backend)
    assert_close_to_golden(out, low, gold, name="acc")
    again = acc0.clone()
    mmt_kernels.taylor_accumulate_(again, act, grad, token_weight=w, backend=backend)
    assert torch.equal(out, again), "taylor_accumulate_ must be deterministic (no atomics)"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_optimizer_on_cuda_strict_and_equivalent(backend):
    dev = "cuda"
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(1024, 512, device=dev))
    w_ref = torch.nn.Parameter(w.detach().clone())
    opt = mmt_kernels.NeuronSparseAdamW([w], lr=1e-3, weight_decay=0.1, backend=backend)
    ref_opt = torch.optim.AdamW([w_ref], lr=1e-3, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn_like(w)
        w.grad, w_ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(w.detach(), w_ref.detach(), rtol=1e-5, atol=1e-6)
    sel = torch.arange(0, 1024, 7, device=dev)
    before = w.detach().clone()
    for _ in range(10):
        opt.set_selection({w: sel})
        w.grad = torch.randn_like(w)
        opt.step()
    keep = torch.ones(1024, dtype=torch.bool, device=dev)
    keep[sel] = False
    assert torch.equal(w.detach()[keep], before[keep])


def test_cuda_sparse_adamw_opcheck():
    _need("cuda", "sparse_adamw_multi_")
    dev = "cuda"
    # The same arguments are checked on CPU by tests/kernels/test_gpu_readiness.py.
    torch.library.opcheck(torch.ops.mmt.sparse_adamw_multi_.default, sparse_adamw_multi_opcheck_args(dev))
    targs = (
        torch.zeros(7, device=dev),
        torch.randn(300, 7, device=dev),
        torch.randn(300, 7, device=dev),
        torch.rand(300, device=dev),
    )
    torch.library.opcheck(torch.ops.mmt.taylor_accumulate_.default, targs)

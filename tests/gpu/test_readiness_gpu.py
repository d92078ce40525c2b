"""What only a GPU shows: strided inputs on every backend, sizes past 2^31 elements, side streams, a second
device, host-side step counts, device-side index checks, the default backend choice, K = 32/33 merges, a
12288-expert permute, torch.compile(fullgraph=True) and large bf16 grouped GEMMs with empty experts.

Skipped without CUDA. Run on a GPU machine with ``bash bench/gpu_run.sh`` (or pytest tests/gpu after building).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mmt_kernels
from mmt_kernels import _backend, _registry
from mmt_kernels import reference as ref
from mmt_kernels.reference import moe as ref_moe

from ..kernels.test_gpu_readiness import sparse_adamw_multi_opcheck_args
from ..kernels.tolerance import assert_close_to_golden

pytestmark = pytest.mark.gpu
DEV = "cuda"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def backends(op):
    if not torch.cuda.is_available():
        return []
    return [b for b in ("cuda", "triton") if _backend.available(b, "cuda", op)[0]]


def free_gib() -> float:
    return torch.cuda.mem_get_info()[0] / 2**30 if torch.cuda.is_available() else 0.0


# ---- strided inputs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends("sparse_adamw_") + ["reference"])
def test_sparse_adamw_transposed_param(backend):
    storage = torch.randn(1000, 4096, device=DEV)
    param, grad = storage.t(), torch.randn(4096, 1000, device=DEV)
    rows = torch.arange(1, 4096, 7, device=DEV)
    want, m_ref, v_ref = (
        param.clone(),
        torch.zeros(rows.numel(), 1000, device=DEV),
        torch.zeros(rows.numel(), 1000, device=DEV),
    )
    kw = dict(lr=1e-2, weight_decay=0.1, step=2, neuron_dim=0, compact=True)
    ref.sparse_adamw_(want, m_ref, v_ref, grad, rows, None, None, beta1=0.9, beta2=0.999, eps=1e-8, **kw)
    m, v = torch.zeros_like(m_ref), torch.zeros_like(v_ref)
    mmt_kernels.sparse_adamw_(param, m, v, grad, rows, backend=backend, **kw)
    torch.testing.assert_close(param, want, rtol=1e-5, atol=1e-6)
    keep = torch.ones(4096, dtype=torch.bool, device=DEV)
    keep[rows] = False
    assert torch.equal(param[keep], want[keep])


@pytest.mark.parametrize("backend", backends("taylor_accumulate_"))
def test_taylor_column_view_acc(backend):
    table = torch.zeros(4096, 3, device=DEV)
    act, grad = torch.randn(300, 4096, device=DEV), torch.randn(300, 4096, device=DEV)
    mmt_kernels.taylor_accumulate_(table[:, 1], act.t().contiguous().t(), grad, backend=backend)
    want = torch.zeros(4096, device=DEV)
    ref.taylor_accumulate_(want, act, grad, torch.full((300,), 1 / 300, device=DEV))
    torch.testing.assert_close(table[:, 1], want, rtol=1e-5, atol=1e-6)
    assert not table[:, 0].any() and not table[:, 2].any()


@pytest.mark.parametrize("backend", backends("moe_dispatch"))
def test_moe_strided_inputs(backend):
    x = torch.randn(2048, 512, device=DEV).t().contiguous().t()[:, :500]  # strided rows
    ids = torch.randint(0, 8, (2048, 2), device=DEV)
    perm, inv, _ = mmt_kernels.moe_permute(ids, 8, backend=backend)
    got = mmt_kernels.moe_dispatch(x, perm, inv, 2, backend=backend)
    assert torch.equal(got, ref_moe.dispatch(x, perm, 2))


@pytest.mark.parametrize("backend", backends("merge"))
def test_merge_strided_inputs(backend):
    stacked = torch.randn(3000, 4, device=DEV)
    xs = list(stacked.t())  # 4 strided views
    got = mmt_kernels.merge_tensors(xs, None, method="ties", density=0.3, backend=backend)
    want = mmt_kernels.merge_tensors(
        [x.contiguous() for x in xs], None, method="ties", density=0.3, backend="reference"
    )
    assert_close_to_golden(got, want, want.double(), name="merge")


# ---- past 2^31 elements ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends("moe_dispatch"))
def test_dispatch_and_combine_past_2_31_elements(backend):
    if free_gib() < 24:
        pytest.skip("needs 24 GiB of free GPU memory")
    T, k, d = 70_000, 2, 16_384  # T*k*d = 2.29e9 > 2^31
    x = torch.randn(T, d, device=DEV, dtype=torch.bfloat16)
    ids = torch.randint(0, 64, (T, k), device=DEV)
    perm, inv, _ = mmt_kernels.moe_permute(ids, 64, backend=backend)
    xp = mmt_kernels.moe_dispatch(x, perm, inv, k, backend=backend)
    tail = perm[-1000:]
    assert torch.equal(xp[-1000:], x[tail // k])
    out = mmt_kernels.moe_combine(xp, inv, perm, None, k, backend=backend)
    torch.testing.assert_close(out[-500:].float(), (x[-500:].float() * k), rtol=1e-2, atol=1e-2)
    del xp, out
    dw = torch.ops.mmt.moe_combine_weight_grad(x, x.repeat_interleave(k, 0), inv, k) if backend == "cuda" else None
    if dw is not None:
        assert torch.isfinite(dw[-100:]).all()


@pytest.mark.parametrize("backend", backends("sparse_adamw_"))
def test_sparse_adamw_columns_past_2_31_elements(backend):
    if free_gib() < 24:
        pytest.skip("needs 24 GiB of free GPU memory")
    R, C = 46_400, 46_400  # column neurons of a [C, R] weight: cs * stride_c reaches 2.15e9
    param = torch.zeros(C, R, device=DEV, dtype=torch.bfloat16)
    grad = torch.ones_like(param)
    rows = torch.tensor([0, R - 1], device=DEV)
    m, v = torch.zeros(C, 2, device=DEV), torch.zeros(C, 2, device=DEV)  # [C, K]
    mmt_kernels.sparse_adamw_(param, m, v, grad, rows, lr=1e-2, neuron_dim=1, compact=True, backend=backend)
    assert (param[:, R - 1] != 0).all() and (param[:, 0] != 0).all()
    assert not param[:, 1 : R - 1].any()


@pytest.mark.parametrize("backend", backends("merge"))
def test_merge_past_2_31_elements(backend):
    if free_gib() < 40:
        pytest.skip("needs 40 GiB of free GPU memory")
    n = 2**31 + 4097
    xs = [torch.full((n,), float(i + 1), device=DEV, dtype=torch.bfloat16) for i in range(2)]
    out = mmt_kernels.merge_tensors(xs, None, method="linear", backend=backend)
    assert out[-4097:].eq(1.5).all() and out[:10].eq(1.5).all()


# ---- streams, devices, host tensors ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends("moe_grouped_mlp") + backends("sparse_adamw_"))
def test_ops_on_a_side_stream(backend):
    x = torch.randn(4096, 1024, device=DEV)
    xs = [x + i for i in range(3)]
    want = mmt_kernels.merge_tensors(xs, x, method="ties", density=0.2, backend="reference")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        big = torch.randn(8192, 8192, device=DEV)
        big = big @ big  # keep the side stream busy so that a launch on the wrong stream would race
        got = mmt_kernels.merge_tensors(
            xs,
            x,
            method="ties",
            density=0.2,
            backend=backend if _backend.available(backend, "cuda", "merge")[0] else None,
        )
    torch.cuda.synchronize()
    assert_close_to_golden(got, want, want.double(), name="merge on a side stream")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_tensors_on_the_second_gpu(backend):
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    x = torch.randn(512, 256, device=dev)
    feats = mmt_kernels.fft_features(x, 16, backend=backend)  # Triton-only on GPU
    torch.testing.assert_close(feats, ref_moe.fft_features(x, 16), rtol=1e-4, atol=1e-4)
    wg, wu, wd = (
        torch.randn(4, 64, 256, device=dev) * 0.05,
        torch.randn(4, 64, 256, device=dev) * 0.05,
        torch.randn(4, 256, 64, device=dev) * 0.05,
    )
    offsets = torch.tensor([0, 100, 100, 400, 512], device=dev)
    y = mmt_kernels.grouped_mlp(x, offsets, wg, wu, wd, backend=backend)
    torch.testing.assert_close(y, ref_moe.grouped_mlp(x, offsets, wg, wu, wd), rtol=1e-4, atol=1e-4)


def test_cpu_row_step_with_a_cuda_param_is_refused():
    p = torch.randn(8, 4, device=DEV)
    with pytest.raises(ValueError, match="row_step is on cpu"):
        mmt_kernels.sparse_adamw_(
            p,
            torch.zeros(2, 4, device=DEV),
            torch.zeros(2, 4, device=DEV),
            torch.randn(8, 4, device=DEV),
            torch.tensor([1, 2], device=DEV),
            lr=1e-3,
            compact=True,
            row_step=torch.tensor([1, 2]),
        )
    if _backend.available("cuda", "cuda", "sparse_adamw_")[0]:
        with pytest.raises(RuntimeError, match="row_step"):
            torch.ops.mmt.sparse_adamw_(
                p,
                torch.zeros(2, 4, device=DEV),
                torch.zeros(2, 4, device=DEV),
                torch.randn(8, 4, device=DEV),
                torch.tensor([1, 2], device=DEV),
                None,
                torch.tensor([1, 2]),
                1e-3,
                0.9,
                0.999,
                1e-8,
                0.0,
                1,
                0,
                True,
            )


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", ["permute", "rows", "row_step"])
def test_out_of_range_indices_fail_on_the_device(backend, case):
    # A device-side assertion leaves the CUDA context unusable: run it in its own process.
    code = textwrap.dedent(f"""
        import torch, mmt_kernels
        p = torch.randn(8, 4, device="cuda")
        if "{case}" == "permute":
            mmt_kernels.moe_permute(torch.tensor([[0, 9]], device="cuda"), 4, backend="{backend}")
        elif "{case}" == "rows":
            mmt_kernels.sparse_adamw_(p, torch.zeros_like(p), torch.zeros_like(p), torch.randn_like(p),
                                      torch.tensor([3, 3], device="cuda"), lr=1e-3, backend="{backend}")
        else:
            mmt_kernels.sparse_adamw_(p, torch.zeros(2, 4, device="cuda"), torch.zeros(2, 4, device="cuda"),
                                      torch.randn_like(p), torch.tensor([1, 2], device="cuda"), lr=1e-3,
                                      compact=True, row_step=torch.tensor([0, 1], device="cuda"), backend="{backend}")
        torch.cuda.synchronize()
        print("NOT RAISED")
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "NOT RAISED" not in res.stdout and res.returncode != 0, res.stdout + res.stderr[-1500:]


# ---- backend choice, merges at the CUDA limit, wide permutes -----------------------------------------------------


def test_default_backend_choice_on_cuda():
    want_cuda = _backend.has_compiled("sparse_adamw_", "CUDA")
    assert _registry.choose("sparse_adamw_", DEV) == ("cuda" if want_cuda else "triton")
    assert _registry.choose("moe_dispatch", DEV) == ("cuda" if want_cuda else "triton")
    assert _registry.choose("moe_grouped_mlp", DEV) == "triton"
    assert _registry.choose("moe_fft_features", DEV, backend="cuda") == "triton"
    assert _registry.choose("moe_dispatch", DEV, dtype=torch.float64) == "reference"


@pytest.mark.parametrize("K", [32, 33])
def test_merge_at_the_cuda_task_limit(K):
    xs = [torch.randn(100_003, device=DEV) for _ in range(K)]
    base = torch.randn(100_003, device=DEV)
    want = mmt_kernels.merge_tensors(xs, base, method="ties", density=0.3, backend="reference")
    got = mmt_kernels.merge_tensors(xs, base, method="ties", density=0.3)  # auto: cuda up to 32, then triton
    assert_close_to_golden(got, want, want.double(), name=f"merge K={K}")
    for seed in (0, 1):
        want = mmt_kernels.merge_tensors(xs, base, method="dare_ties", density=0.5, seed=seed, backend="reference")
        got = mmt_kernels.merge_tensors(xs, base, method="dare_ties", density=0.5, seed=seed)
        assert_close_to_golden(got, want, want.double(), name=f"dare K={K} seed={seed}")


@pytest.mark.parametrize("backend", backends("moe_permute"))
def test_permute_with_12288_experts(backend):
    ids = torch.randint(0, 12288, (20_000, 4), device=DEV)
    perm, inv, offsets = mmt_kernels.moe_permute(ids, 12288, backend=backend)
    rperm, rinv, roff = ref_moe.permute(ids.cpu(), 12288)
    assert torch.equal(perm.cpu(), rperm) and torch.equal(inv.cpu(), rinv) and torch.equal(offsets.cpu(), roff)


def test_fp64_moe_on_cuda_runs():
    x = torch.randn(64, 32, device=DEV, dtype=torch.float64)
    ids = torch.randint(0, 4, (64, 2), device=DEV)
    perm, inv, _ = mmt_kernels.moe_permute(ids, 4)
    assert torch.equal(mmt_kernels.moe_dispatch(x, perm, inv, 2), ref_moe.dispatch(x, perm, 2))


# ---- torch.compile(fullgraph=True) on CUDA ----------------------------------------------------------------------


def test_compile_fullgraph_moe_ffn():
    torch._dynamo.reset()
    layer = mmt_kernels.MoEFFN(256, 128, 8, k=2, n_freq=16, dtype=torch.bfloat16, device=DEV)
    x = torch.randn(4, 64, 256, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
    compiled.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_compile_fullgraph_optimizer_step_and_merge():
    torch._dynamo.reset()
    w = torch.nn.Parameter(torch.randn(1024, 512, device=DEV))
    opt = mmt_kernels.NeuronSparseAdamW([w], lr=1e-3)
    w.grad = torch.randn_like(w)
    step = torch.compile(opt.step, fullgraph=False)  # the optimizer's host bookkeeping runs eagerly
    step()
    m = w.detach().clone()
    m.add_(0)
    xs = [torch.randn(4096, device=DEV) for _ in range(3)]

    def merge(a, b, c):
        return mmt_kernels.merge_tensors([a, b, c], None, method="dare_linear", density=0.5, seed=1)

    torch.testing.assert_close(torch.compile(merge, fullgraph=True)(*xs), merge(*xs))

    def sparse_step(p, mm, vv, g, rows):
        mmt_kernels.sparse_adamw_(p, mm, vv, g, rows, lr=1e-3, compact=True)
        return p

    p = torch.randn(256, 64, device=DEV)
    args = (
        torch.zeros(3, 64, device=DEV),
        torch.zeros(3, 64, device=DEV),
        torch.randn(256, 64, device=DEV),
        torch.tensor([3, 7, 200], device=DEV),
    )
    want = sparse_step(p.clone(), *[a.clone() for a in args])
    got = torch.compile(sparse_step, fullgraph=True)(p.clone(), *[a.clone() for a in args])
    torch.testing.assert_close(got, want)


# ---- bf16 grouped GEMM: large shapes, many empty experts ---------------------------------------------------------


@pytest.mark.parametrize("backend", backends("moe_grouped_mlp"))
def test_bf16_grouped_gemm_large_sparse_experts(backend):
    E, d, f = 64, 2048, 768
    counts = torch.zeros(E, dtype=torch.int64)
    counts[::5] = torch.randint(1, 700, (len(counts[::5]),))  # 4 of 5 experts empty, odd segment lengths
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(DEV)
    N = int(counts.sum())
    xp = torch.randn(N, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    ws = [(torch.randn(*s, device=DEV) * 0.02).bfloat16().requires_grad_() for s in ((E, f, d), (E, f, d), (E, d, f))]
    y = mmt_kernels.grouped_mlp(xp, offsets, *ws, backend=backend)
    leaves = [t.detach().double().requires_grad_() for t in (xp, *ws)]
    gold = ref_moe.grouped_mlp(leaves[0], offsets, *leaves[1:])
    low = ref_moe.grouped_mlp(xp, offsets, *ws)
    assert_close_to_golden(y, low, gold.to(y.dtype), name="y")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (xp, *ws), dy)
    gold_grads = torch.autograd.grad(gold, leaves, dy.double())
    for g, gg, name in zip(grads, gold_grads, ("dx", "dw_gate", "dw_up", "dw_down")):
        torch.testing.assert_close(g.float(), gg.float(), rtol=5e-2, atol=5e-2 * gg.abs().max().item(), msg=name)
    empty = (counts == 0).nonzero().flatten().tolist()
    assert not grads[1][empty].any()


def test_gpu_opcheck_with_valid_compact_state():
    if not _backend.available("cuda", "cuda", "sparse_adamw_multi_")[0]:
        pytest.skip("no CUDA kernels")
    torch.library.opcheck(torch.ops.mmt.sparse_adamw_multi_.default, sparse_adamw_multi_opcheck_args(DEV))

"""Neuron-sparse weight gradients: the op against the fp64 reference on every backend, and sparse_linear's
compact gradients against the selected rows/columns of the dense dW (input gradient exact)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmt_kernels import _backend
from mmt_kernels import sparse_grad as S
from mmt_kernels.reference import sparse_grad as ref

from .tolerance import assert_close_to_golden, poison_

BACKENDS = [b for b in ("reference", "cpu", "triton") if _backend.available(b, "cpu", "sparse_weight_grad_")[0]]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (N tokens, R neurons, C width, K selected)
SHAPES = [(1, 1, 1, 1), (37, 50, 19, 7), (70, 33, 65, 33), (5, 40, 9, 0), (0, 12, 8, 3)]


def _case(N, R, C, K, dtype, seed=0, transposed=False):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(N, R, generator=gen).to(dtype)
    b = torch.randn(N, C, generator=gen).to(dtype)
    rows = torch.randperm(R, generator=gen)[:K].sort().values
    acc0 = torch.randn((C, K) if transposed else (K, C), generator=gen)  # [C, K]: the column neurons' layout
    return acc0, a, rows, b


def _expected(acc0, a, rows, b, transposed):
    picked = a.double()[:, rows]
    return acc0.double() + (b.double().t() @ picked if transposed else picked.t() @ b.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,R,C,K", SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_matches_reference(backend, dtype, N, R, C, K, transposed):
    acc0, a, rows, b = _case(N, R, C, K, dtype, transposed=transposed)
    golden = acc0.double().clone()
    ref.sparse_weight_grad_(golden, a.double(), rows, b.double(), transposed)
    torch.testing.assert_close(golden, _expected(acc0, a, rows, b, transposed))  # the reference's own layout
    low = acc0.clone()
    ref.sparse_weight_grad_(low, a, rows, b, transposed)
    out = acc0.clone()
    S.sparse_weight_grad_(out, a, rows, b, transposed=transposed, backend=backend)
    # a different summation order (blocked GEMM) than the reference: a few ulps of the sum's magnitude
    assert_close_to_golden(out, low, golden, factor=2.0, ulps=4.0 * max(N, 1) ** 0.5 + 4, name="acc")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transposed", [False, True])
def test_non_contiguous_unsorted_and_poisoned(backend, transposed):
    acc0, a, rows, b = _case(20, 30, 11, 6, torch.float32, transposed=transposed)
    wide = torch.randn(20, 60)
    wide[:, ::2] = a
    rows = rows.flip(0)  # any order: neuron k of acc belongs to rows[k]
    out = acc0.clone()
    S.sparse_weight_grad_(out, wide[:, ::2], rows, b.t().contiguous().t(), transposed=transposed, backend=backend)
    torch.testing.assert_close(out.double(), _expected(acc0, a, rows, b, transposed), rtol=1e-5, atol=1e-5)
    nan = poison_(torch.empty(acc0.shape))  # accumulates: NaN stays NaN in every element it touches
    S.sparse_weight_grad_(nan, a, rows, b, transposed=transposed, backend=backend)
    assert torch.isnan(nan).all()


@pytest.mark.skipif(not _backend.available("cpu", "cpu", "sparse_weight_grad_")[0], reason="no C++ kernels")
@pytest.mark.parametrize("transposed", [False, True])
def test_opcheck(transposed):
    acc0, a, rows, b = _case(9, 10, 7, 4, torch.float32, transposed=transposed)
    torch.library.opcheck(torch.ops.mmt.sparse_weight_grad_.default, (acc0, a, rows, b, transposed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("neuron_dim", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_linear_compact_grads_equal_dense_rows(backend, neuron_dim, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(24, 40, bias=True).to(dtype)
    dense = nn.Linear(24, 40, bias=True).to(dtype)
    dense.load_state_dict(lin.state_dict())
    rows = torch.tensor([0, 3, 4, 17, 23] if neuron_dim else [1, 2, 9, 30, 39])
    sel = S.SparseWeightGrad(backend=backend)
    sel.set_rows(lin.weight, rows, neuron_dim)
    for micro in range(2):  # gradient accumulation on the compact buffer
        x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        y = S.sparse_linear(x, lin.weight, lin.bias, sel.rows[lin.weight], neuron_dim, backend=backend)
        y2 = dense(x2)
        w = torch.randn_like(y)
        (y * w).sum().backward()
        (y2 * w).sum().backward()
        torch.testing.assert_close(y, y2, rtol=0, atol=0)
        torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)  # the input gradient is exact
    assert lin.weight.grad is None, "the dense dW must never be built"
    torch.testing.assert_close(lin.bias.grad, dense.bias.grad)
    dw = dense.weight.grad.float()
    expected = dw[rows] if neuron_dim == 0 else dw[:, rows]  # [K, C] rows, [C, K] columns
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(lin.weight.compact_grad, expected, **tol)
    # a new selection drops the old buffer
    sel.set_rows(lin.weight, rows[:2], neuron_dim)
    assert lin.weight.compact_grad is None


def test_bad_input_names_the_problem():
    acc0, a, rows, b = _case(4, 6, 3, 2, torch.float32)
    with pytest.raises(ValueError, match="acc has shape"):
        S.sparse_weight_grad_(torch.zeros(3, 3), a, rows, b)
    with pytest.raises(ValueError, match=r"acc has shape \(2, 3\); expected \[3, 2\] \(\[C, K\], transposed\)"):
        S.sparse_weight_grad_(acc0, a, rows, b, transposed=True)  # a [K, C] buffer for columns
    with pytest.raises(TypeError, match="rows must be a 1-D int64"):
        S.sparse_weight_grad_(acc0, a, rows.int(), b)
    with pytest.raises(TypeError, match="share a floating dtype"):
        S.sparse_weight_grad_(acc0, a, rows, b.bfloat16())
    with pytest.raises(ValueError, match=r"a \[N, R\] and b \[N, C\]"):
        S.sparse_weight_grad_(acc0, a[:3], rows, b)
    with pytest.raises(IndexError, match="neuron indices"):
        S.SparseWeightGrad().set_rows(nn.Linear(3, 4).weight, torch.tensor([4]), 0)


def test_landermt_plan_routes_selected_weights_to_compact_grads(tmp_path):
    """Once the plan has built its NeuronSparseAdamW, LANDeRMT's selected gate/up/down weights get only their
    selected neurons' gradient (equal to those rows/columns of the dense dW) and no dense ``.grad``; before it
    (and with ``sparse_weight_grad=False``) the dense dW."""
    from mmt.methods import landermt as lm
    from mmt.methods.base import StepInfo
    from mmt.testing import tiny_model

    class TC:
        lr, weight_decay, adam_betas, adam_eps = 1e-3, 0.0, [0.9, 0.999], 1e-8

    def build():
        model = tiny_model("llama", vocab=64, hidden=32, layers=2, heads=4, intermediate=40)
        units = lm.neuron_units(model, [1], "ffn")
        langs = ["de", "en"]
        gen = torch.Generator().manual_seed(0)
        imp = {u.name: torch.rand(len(langs), u.size, generator=gen) for u in units}
        nmap = lm.NeuronMap(langs, [1], units, imp, lm.categorise(imp, 0.25), {"method": {"neuron_kind": "ffn"}})
        path = tmp_path / "n.safetensors"
        nmap.save(path)
        return lm.prepare(model, lm.Config(neurons_file=str(path), sparse_weight_grad=True))

    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    dense_model, _ = build()
    dense_model(input_ids=ids, labels=ids).loss.backward()
    model, plan = build()
    sel, _ = plan.selection_for(("de", "en"))
    opt = plan.build_optimizer(model, TC)
    plan.on_step_start(StepInfo(step=0, pair=("de", "en")), model, opt)
    model(input_ids=ids, labels=ids).loss.backward()
    dense = dict(dense_model.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        if p in sel and p.dim() == 2:
            rows = torch.unique(sel[p])
            assert p.grad is None, f"{name}: dense dW built"
            nd = 1 if "down" in name else 0
            full = dense[name].grad
            expected = full[rows] if nd == 0 else full[:, rows]
            torch.testing.assert_close(p.compact_grad, expected, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked == 3  # gate, up, down of the selected layer

"""NeuronSparseAdamW: strictness, equivalence to torch.optim.AdamW, compact state, selection switching, state_dict."""

from __future__ import annotations

import pytest
import torch

from mmt_kernels import NeuronSparseAdamW, _backend

BACKENDS = [b for b in ("reference", "cpu", "triton") if _backend.available(b, "cpu", "sparse_adamw_multi_")[0]]


def _params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    gate = torch.nn.Parameter(torch.randn(24, 10, generator=g).to(dtype))  # neurons = rows
    down = torch.nn.Parameter(torch.randn(10, 24, generator=g).to(dtype))  # neurons = columns
    bias = torch.nn.Parameter(torch.randn(24, generator=g).to(dtype))
    return gate, down, bias


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unselected_rows_bit_identical_after_10_steps_with_weight_decay(backend):
    gate, down, bias = _params()
    before = [p.detach().clone() for p in (gate, down, bias)]
    opt = NeuronSparseAdamW([gate, down, bias], lr=1e-2, weight_decay=0.5, neuron_dims={down: 1}, backend=backend)
    sel = torch.tensor([1, 4, 5, 20])
    for step in range(10):
        opt.set_selection({gate: sel, down: sel, bias: sel})
        _grads((gate, down, bias), step)
        opt.step()
    keep = torch.ones(24, dtype=torch.bool)
    keep[sel] = False
    assert torch.equal(gate.detach()[keep], before[0][keep])
    assert torch.equal(down.detach()[:, keep], before[1][:, keep])
    assert torch.equal(bias.detach()[keep], before[2][keep])
    assert not torch.equal(gate.detach()[sel], before[0][sel])
    assert not torch.equal(down.detach()[:, sel], before[1][:, sel])
    # compact state: 4 of 24 neurons, [U, C] for rows, [C, U] for columns
    assert opt.state[gate]["exp_avg"].shape == (4, 10)
    assert opt.state[down]["exp_avg"].shape == (10, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_everything_selected_equals_torch_adamw(backend):
    ours = _params()
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]

    def groups(ps):
        return [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0, "lr": 3e-3}]

    opt = NeuronSparseAdamW(
        groups(list(ours)), lr=1e-2, betas=(0.9, 0.98), eps=1e-7, neuron_dims={ours[1]: 1}, backend=backend
    )
    ref = torch.optim.AdamW(groups(list(theirs)), lr=1e-2, betas=(0.9, 0.98), eps=1e-7)
    for step in range(6):
        _grads(ours, step)
        _grads(theirs, step)
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_switching_selections_per_pair_uses_per_neuron_steps(backend):
    """Neurons that train on some steps only get the bias correction of their own step count: the same as a
    torch AdamW that only ever saw the steps where the neuron was selected."""
    w = torch.nn.Parameter(torch.randn(6, 5))
    opt = NeuronSparseAdamW([w], lr=1e-2, weight_decay=0.1, backend=backend)
    pairs = {"de-en": torch.tensor([0, 1, 2]), "fr-en": torch.tensor([0, 3])}
    ref_rows = {r: torch.nn.Parameter(w.detach()[r].clone()) for r in range(6)}
    ref_opts = {r: torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1) for r, p in ref_rows.items()}
    for step, pair in enumerate(["de-en", "fr-en", "de-en", "de-en", "fr-en"]):
        opt.set_selection({w: pairs[pair]})
        g = torch.randn(6, 5)
        w.grad = g
        opt.step()
        for r in pairs[pair].tolist():
            ref_rows[r].grad = g[r].clone()
            ref_opts[r].step()
    for r in range(6):
        torch.testing.assert_close(w.detach()[r], ref_rows[r].detach(), rtol=1e-5, atol=1e-6)
    st = opt.state[w]
    assert st["neurons"].tolist() == [0, 1, 2, 3]  # union of both selections
    assert st["neuron_step"].tolist() == [5, 3, 3, 2]  # neuron 0 in both pairs


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_strict_is_torch_adamw_on_masked_gradients(backend):
    w = torch.nn.Parameter(torch.randn(8, 4))
    w_ref = torch.nn.Parameter(w.detach().clone())
    opt = NeuronSparseAdamW([w], lr=1e-2, weight_decay=0.1, strict=False, backend=backend)
    ref = torch.optim.AdamW([w_ref], lr=1e-2, weight_decay=0.1)
    sel = torch.tensor([2, 5])
    scale = torch.tensor([0.5, 2.0])
    before = w.detach().clone()
    for step in range(4):
        opt.set_selection({w: sel}, {w: scale})
        g = torch.randn(8, 4)
        w.grad = g.clone()
        mask = torch.zeros(8, 1)
        mask[sel, 0] = scale
        w_ref.grad = g * mask
        opt.step()
        ref.step()
    torch.testing.assert_close(w.detach(), w_ref.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(w.detach()[0], before[0])  # masked rows still decay: the original behaviour


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_scale_matches_scaled_gradient(backend):
    w = torch.nn.Parameter(torch.randn(7, 3))
    w2 = torch.nn.Parameter(w.detach().clone())
    scale_full = torch.rand(7) + 0.5
    sel = torch.tensor([0, 3, 6])
    a = NeuronSparseAdamW([w], lr=1e-2, backend=backend)
    b = NeuronSparseAdamW([w2], lr=1e-2, backend=backend)
    a.set_selection({w: sel}, {w: scale_full})  # per-neuron scale [R]
    b.set_selection({w2: sel})
    for step in range(3):
        g = torch.randn(7, 3)
        w.grad, w2.grad = g.clone(), g * scale_full[:, None]
        a.step()
        b.step()
    torch.testing.assert_close(w.detach(), w2.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strict", [True, False])
def test_state_dict_round_trip(strict, tmp_path):
    params = _params(dtype=torch.bfloat16)
    opt = NeuronSparseAdamW(params, lr=1e-2, neuron_dims={params[1]: 1}, strict=strict)
    for step in range(3):
        opt.set_selection(
            {params[0]: torch.tensor([step, 7]), params[1]: torch.tensor([1, 2])}, {params[1]: torch.tensor([0.5, 1.5])}
        )
        _grads(params, step)
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = NeuronSparseAdamW(clone, lr=1e-2, neuron_dims={clone[1]: 1}, strict=strict)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    for p, q in zip(params, clone):
        for k, v in opt.state[p].items():
            w = opt2.state[q][k]
            if isinstance(v, torch.Tensor):
                assert v.dtype == w.dtype and torch.equal(v, w), k  # fp32 moments stay fp32 for bf16 params
            else:
                assert v == w
    _grads(params, 10)
    _grads(clone, 10)
    opt.step()
    opt2.step()
    for p, q in zip(params, clone):
        assert torch.equal(p, q)


def _old_layout(sd, column_ids):
    """``sd`` as the previous version saved it: no state_layout marker, column moments [U, C]."""
    old = {**sd, "state": {i: dict(st) for i, st in sd["state"].items()}, "neuron_sparse": dict(sd["neuron_sparse"])}
    del old["neuron_sparse"]["state_layout"]
    for i in column_ids:
        for k in ("exp_avg", "exp_avg_sq"):
            old["state"][i][k] = old["state"][i][k].t().contiguous()
    return old


@pytest.mark.parametrize("square", [False, True])
def test_old_layout_state_dict_is_converted_on_load(square):
    """A checkpoint of the [U, C] column layout loads transposed into [C, U] and resumes exactly (square: U == C,
    where only the marker tells the layouts apart)."""
    gate, down, bias = _params()
    opt = NeuronSparseAdamW([gate, down, bias], lr=1e-2, weight_decay=0.1, neuron_dims={down: 1})
    sel = torch.arange(10) if square else torch.tensor([1, 4, 20])
    for step in range(3):
        opt.set_selection({gate: sel, down: sel, bias: sel})
        _grads((gate, down, bias), step)
        opt.step()
    sd = opt.state_dict()
    assert sd["neuron_sparse"]["state_layout"] == 2
    clone = [torch.nn.Parameter(p.detach().clone()) for p in (gate, down, bias)]
    opt2 = NeuronSparseAdamW(clone, lr=1e-2, weight_decay=0.1, neuron_dims={clone[1]: 1})
    opt2.load_state_dict(_old_layout(sd, [1]))
    for p, q in zip((gate, down, bias), clone):
        for k in ("exp_avg", "exp_avg_sq", "neurons", "neuron_step"):
            assert torch.equal(opt.state[p][k], opt2.state[q][k]), k
    _grads((gate, down, bias), 10)
    _grads(clone, 10)
    opt.step()
    opt2.step()
    for p, q in zip((gate, down, bias), clone):
        assert torch.equal(p, q)


def test_state_dict_of_a_wrong_layout_is_refused():
    gate, down, bias = _params()
    opt = NeuronSparseAdamW([gate, down, bias], neuron_dims={down: 1})
    opt.set_selection({down: torch.tensor([1, 4, 20])})
    _grads((gate, down, bias), 0)
    opt.step()
    sd = opt.state_dict()
    bad = _old_layout(sd, [1])
    bad["neuron_sparse"]["state_layout"] = 2  # claims the new layout, holds the old one
    ps = _params()
    with pytest.raises(ValueError, match=r"parameter 1 .*exp_avg of shape \(3, 10\); expected \[10, 3\]"):
        NeuronSparseAdamW(ps, neuron_dims={ps[1]: 1}).load_state_dict(bad)
    sd["neuron_sparse"]["state_layout"] = 3
    with pytest.raises(ValueError, match="unknown state_layout 3"):
        NeuronSparseAdamW(ps, neuron_dims={ps[1]: 1}).load_state_dict(sd)


def test_compact_state_memory_scales_with_the_selection():
    w = torch.nn.Parameter(torch.randn(1000, 64))
    opt = NeuronSparseAdamW([w], lr=1e-3)
    opt.set_selection({w: torch.arange(0, 1000, 10)})  # 10%
    w.grad = torch.randn(1000, 64)
    opt.step()
    full = 2 * w.numel() * 4
    assert opt.state_bytes() <= 0.12 * full


def test_bad_selection_is_rejected():
    w = torch.nn.Parameter(torch.randn(5, 3))
    opt = NeuronSparseAdamW([w])
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        opt.set_selection({w: torch.tensor([1, 5])})
    with pytest.raises(ValueError, match="scale"):
        opt.set_selection({w: torch.tensor([1, 2])}, {w: torch.ones(3)})
    with pytest.raises(ValueError, match="not an optimized parameter"):
        opt.set_selection({torch.nn.Parameter(torch.randn(2)): None})
    with pytest.raises(TypeError, match="dtype"):
        NeuronSparseAdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))])
    with pytest.raises(ValueError, match="neuron_dim"):
        NeuronSparseAdamW([torch.nn.Parameter(torch.randn(3))], neuron_dims={})  # fine
        NeuronSparseAdamW([w], neuron_dim=2)


def test_empty_selection_freezes_the_parameter():
    w = torch.nn.Parameter(torch.randn(5, 3))
    before = w.detach().clone()
    opt = NeuronSparseAdamW([w], weight_decay=0.5)
    opt.set_selection({w: torch.tensor([], dtype=torch.long)})
    w.grad = torch.randn(5, 3)
    opt.step()
    assert torch.equal(w.detach(), before)


# ---- compact gradients (sparse_linear) and clipping --------------------------------------------------------------
def _mlp(seed):
    torch.manual_seed(seed)
    up = torch.nn.Linear(12, 30, bias=False)  # neurons = rows
    down = torch.nn.Linear(30, 12, bias=True)  # neurons = columns; its bias trains densely
    return up, down


def _train(compact, backend, steps=4, micro=2, clip=0.05):
    from mmt_kernels import SparseWeightGrad, sparse_linear

    up, down = _mlp(0)
    opt = NeuronSparseAdamW(
        [up.weight, down.weight, down.bias], lr=1e-2, weight_decay=0.1, neuron_dims={down.weight: 1}, backend=backend
    )
    sparse = SparseWeightGrad(backend=backend)
    sels = [torch.tensor([0, 3, 7, 8, 29]), torch.tensor([1, 3, 12, 20])]
    norms = []
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        sel = sels[step % 2]
        opt.set_selection({up.weight: sel, down.weight: sel})
        sparse.set_rows(up.weight, sel, 0)
        sparse.set_rows(down.weight, sel, 1)
        for _ in range(micro):  # gradient accumulation
            x = torch.randn(5, 12, generator=gen)
            if compact:
                h = sparse_linear(x, up.weight, None, sparse.rows[up.weight], 0, backend=backend)
                y = sparse_linear(torch.relu(h), down.weight, down.bias, sparse.rows[down.weight], 1, backend=backend)
            else:
                y = down(torch.relu(up(x)))
            (y**2).sum().backward()
        norms.append(float(opt.clip_grad_norm_(clip)))
        assert (up.weight.grad is None) == compact
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert getattr(up.weight, "compact_grad", None) is None
    return up, down, norms


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_gradients_train_as_dense_ones(backend):
    up0, down0 = _mlp(0)
    up_d, down_d, norms_d = _train(False, backend)
    up_c, down_c, norms_c = _train(True, backend)
    assert norms_c == pytest.approx(norms_d, rel=1e-5)
    assert max(norms_d) > 0.05  # clipping was active
    torch.testing.assert_close(up_c.weight, up_d.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(down_c.weight, down_d.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(down_c.bias, down_d.bias, rtol=1e-5, atol=1e-6)
    never = torch.ones(30, dtype=torch.bool)
    never[[0, 1, 3, 7, 8, 12, 20, 29]] = False
    for w, w0 in ((up_c.weight, up0.weight), (up_d.weight, up0.weight)):
        assert torch.equal(w.detach()[never], w0.detach()[never])
    for w, w0 in ((down_c.weight, down0.weight), (down_d.weight, down0.weight)):
        assert torch.equal(w.detach()[:, never], w0.detach()[:, never])


def test_clip_grad_norm_counts_what_is_applied():
    gate, down, bias = _params()
    opt = NeuronSparseAdamW([gate, down, bias], neuron_dims={down: 1})
    _grads((gate, down, bias), 0)
    dense = [p.grad.clone() for p in (gate, down, bias)]
    # no selection: torch's clip_grad_norm_ exactly
    copies = [torch.nn.Parameter(torch.zeros_like(g)) for g in dense]
    for c, g in zip(copies, dense):
        c.grad = g.clone()
    want = torch.nn.utils.clip_grad_norm_(copies, 1.0)
    torch.testing.assert_close(opt.clip_grad_norm_(1.0), want)
    for c, p in zip(copies, (gate, down, bias)):
        torch.testing.assert_close(p.grad, c.grad)
    sel = torch.tensor([2, 5])
    opt.set_selection({gate: sel, down: sel, bias: torch.tensor([], dtype=torch.long)})  # bias frozen
    for p, g in zip((gate, down, bias), dense):
        p.grad = g.clone()
    total = opt.clip_grad_norm_(0.5)
    expected = torch.cat([dense[0][sel].flatten(), dense[1][:, sel].flatten()]).norm()
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(gate.grad, dense[0] * (0.5 / (expected + 1e-6)))
    assert torch.equal(bias.grad, dense[2])  # frozen: not counted, not scaled


def test_compact_grad_of_another_selection_is_refused():
    gate, _, _ = _params()
    opt = NeuronSparseAdamW([gate])
    opt.set_selection({gate: torch.tensor([1, 2, 3])})
    gate.compact_grad = torch.zeros(2, 10)
    with pytest.raises(RuntimeError, match=r"needs fp32 \[3, 10\]"):
        opt.step()
    gate.grad = torch.zeros_like(gate)
    with pytest.raises(RuntimeError, match="both"):
        opt.step()
    _, down, _ = _params()
    opt = NeuronSparseAdamW([down], neuron_dim=1)
    opt.set_selection({down: torch.tensor([1, 2, 3])})
    down.compact_grad = torch.zeros(3, 10)  # [K, C]: columns take [C, K]
    with pytest.raises(RuntimeError, match=r"needs fp32 \[10, 3\]"):
        opt.step()
    strict_off = NeuronSparseAdamW([gate], strict=False)
    gate.grad = None
    with pytest.raises(RuntimeError, match="dense gradients"):
        strict_off.step()

"""sparse_adamw_: every available backend against the reference, strictness, opcheck, torch.compile."""

from __future__ import annotations

import pytest
import torch

import mmt_kernels
from mmt_kernels import _backend
from mmt_kernels import reference as ref
from mmt_kernels.reference.sparse_adamw import neuron_view

from .tolerance import assert_close_to_golden, poison_

BACKENDS = [b for b in ("reference", "cpu", "triton") if _backend.available(b, "cpu", "sparse_adamw_")[0]]
MULTI_BACKENDS = [b for b in ("reference", "cpu", "triton") if _backend.available(b, "cpu", "sparse_adamw_multi_")[0]]
HP = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)


def make_case(shape, neuron_dim, k, dtype, compact, with_scale, with_row_step, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_neurons = shape[neuron_dim] if len(shape) == 2 else shape[0]
    rows = torch.randperm(n_neurons, generator=gen)[:k].sort().values
    param = torch.randn(shape, generator=gen).to(dtype)
    per_neuron = param.numel() // max(n_neurons, 1)
    # compact: [K, C] for rows, [C, K] for columns
    state_shape = ((k, per_neuron) if neuron_dim == 0 else (per_neuron, k)) if compact else shape
    m = torch.randn(state_shape, generator=gen) * 0.1
    v = torch.rand(state_shape, generator=gen) * 0.01
    scale = torch.rand(k, generator=gen) * 2 if with_scale else None
    row_step = torch.randint(1, 20, (k,), generator=gen) if with_row_step else None
    return param, m, v, rows, scale, row_step


def run(fn, param, m, v, grads, rows, scale, row_step, neuron_dim, compact, **kw):
    param, m, v = param.clone(), m.clone(), v.clone()
    for i, g in enumerate(grads):
        steps = None if row_step is None else row_step + i
        fn(
            param,
            m,
            v,
            g.to(param.dtype),
            rows,
            row_scale=scale,
            row_step=steps,
            step=i + 1,
            neuron_dim=neuron_dim,
            compact=compact,
            **HP,
            **kw,
        )
    return param, m, v


def ref_fn(param, m, v, g, rows, **kw):
    ref.sparse_adamw_(param, m, v, g, rows, kw.pop("row_scale"), kw.pop("row_step"), **kw)


CASES = [
    # shape, neuron_dim, k
    ((1, 1), 0, 1),
    ((7, 33), 0, 3),
    ((7, 33), 1, 33),
    ((130, 257), 0, 41),
    ((130, 257), 1, 100),
    ((37,), 0, 5),
    ((64, 1), 0, 64),
    ((5, 9), 0, 0),
    ((5, 9), 1, 0),
    ((3, 40), 1, 1),
    ((1, 1), 1, 1),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,neuron_dim,k", CASES)
@pytest.mark.parametrize("compact", [False, True])
def test_matches_reference(backend, dtype, shape, neuron_dim, k, compact):
    with_scale = k % 2 == 1
    with_row_step = shape[0] % 2 == 1
    param, m, v, rows, scale, row_step = make_case(shape, neuron_dim, k, dtype, compact, with_scale, with_row_step)
    grads = [torch.randn(shape) for _ in range(3)]
    golden = run(
        ref_fn,
        param.double(),
        m.double(),
        v.double(),
        [g.double() for g in grads],
        rows,
        None if scale is None else scale.double(),
        row_step,
        neuron_dim,
        compact,
    )
    low = run(ref_fn, param, m, v, grads, rows, scale, row_step, neuron_dim, compact)
    out = run(
        mmt_kernels.sparse_adamw_, param, m, v, grads, rows, scale, row_step, neuron_dim, compact, backend=backend
    )
    for name, o, lo, gold in zip(("param", "exp_avg", "exp_avg_sq"), out, low, golden):
        assert_close_to_golden(o, lo, gold.to(o.dtype) if o.dtype != torch.float32 else gold, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("neuron_dim", [0, 1])
def test_unselected_neurons_bit_identical_after_10_steps(backend, neuron_dim):
    shape = (48, 70)
    param = torch.randn(shape)
    m, v = torch.zeros(shape), torch.zeros(shape)
    rows = torch.tensor([0, 5, 6, 31, 47 if neuron_dim == 0 else 69])
    before = param.clone()
    for step in range(1, 11):
        mmt_kernels.sparse_adamw_(
            param,
            m,
            v,
            torch.randn(shape),
            rows,
            lr=1e-2,
            weight_decay=0.5,
            step=step,
            neuron_dim=neuron_dim,
            backend=backend,
        )
    keep = torch.ones(shape[neuron_dim], dtype=torch.bool)
    keep[rows] = False
    view = lambda t: t if neuron_dim == 0 else t.t()  # noqa: E731
    assert torch.equal(view(param)[keep], view(before)[keep])
    assert torch.all(view(m)[keep] == 0) and torch.all(view(v)[keep] == 0)
    assert not torch.equal(view(param)[~keep], view(before)[~keep])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_compact_state_is_the_full_state_columns(backend, dtype):
    """Column neurons' compact state is [C, K]: exactly the selected columns of a param-shaped state, in place
    (the layout itself, independent of the reference)."""
    gen = torch.Generator().manual_seed(3)
    shape, rows = (37, 70), torch.tensor([0, 2, 3, 33, 69])
    param = torch.randn(shape, generator=gen).to(dtype)
    m_full, v_full = torch.randn(shape, generator=gen) * 0.1, torch.rand(shape, generator=gen) * 0.01
    grad = torch.randn(shape, generator=gen).to(dtype)
    kw = dict(lr=1e-2, weight_decay=0.1, step=2, neuron_dim=1, backend=backend)
    p_full, p_compact = param.clone(), param.clone()
    m_c, v_c = m_full[:, rows].contiguous(), v_full[:, rows].contiguous()
    mmt_kernels.sparse_adamw_(p_full, m_full, v_full, grad, rows, **kw)
    mmt_kernels.sparse_adamw_(p_compact, m_c, v_c, grad, rows, compact=True, **kw)
    assert torch.equal(p_compact, p_full)
    assert torch.equal(m_c, m_full[:, rows]) and torch.equal(v_c, v_full[:, rows])


@pytest.mark.parametrize("backend", MULTI_BACKENDS)
@pytest.mark.parametrize("compact_grad", [False, True])
def test_column_union_state_leaves_unused_columns_alone(backend, compact_grad):
    """A [C, U] column state addressed through state_rows: unused state columns (poisoned) stay untouched and
    never leak into the update; the used ones are the reference's."""
    gen = torch.Generator().manual_seed(4)
    shape, rows, srows, U = (19, 45), torch.tensor([3, 7, 40, 44]), torch.tensor([5, 0, 2, 6]), 8
    param = torch.randn(shape, generator=gen)
    m, v = torch.randn(shape[0], U, generator=gen) * 0.1, torch.rand(shape[0], U, generator=gen) * 0.01
    unused = torch.ones(U, dtype=torch.bool)
    unused[srows] = False
    m[:, unused] = v[:, unused] = poison_(torch.empty(shape[0], U - rows.numel()))
    dense = torch.randn(shape, generator=gen)
    grad = _compact(dense, rows, 1) if compact_grad else dense
    outs = []
    for fn, kw in ((_ref_multi, {}), (mmt_kernels.sparse_adamw_multi_, dict(backend=backend))):
        p2, m2, v2 = param.clone(), m.clone(), v.clone()
        kws = dict(state_rows=[srows], row_scales=[None], row_steps=[torch.tensor([1, 2, 3, 4])])
        fn([p2], [m2], [v2], [grad], [rows], lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=1,
           neuron_dims=[1], compact=True, compact_grad=compact_grad, **kws, **kw)  # fmt: skip
        outs.append((p2, m2, v2))
    (p_ref, m_ref, v_ref), (p_out, m_out, v_out) = outs
    assert torch.isfinite(p_out).all() and torch.isnan(m_out[:, unused]).all() and torch.isnan(v_out[:, unused]).all()
    torch.testing.assert_close(p_out, p_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m_out, m_ref, rtol=1e-6, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(v_out, v_ref, rtol=1e-6, atol=1e-7, equal_nan=True)
    keep = torch.ones(shape[1], dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(p_out[:, keep], param[:, keep])


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_equals_torch_adamw(backend):
    w = torch.nn.Parameter(torch.randn(33, 17))
    opt = torch.optim.AdamW([w], lr=3e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)
    p = w.detach().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    rows = torch.arange(33)
    for step in range(1, 6):
        g = torch.randn(33, 17)
        w.grad = g.clone()
        opt.step()
        mmt_kernels.sparse_adamw_(
            p, m, v, g, rows, lr=3e-3, beta1=0.9, beta2=0.98, eps=1e-6, weight_decay=0.05, step=step, backend=backend
        )
    torch.testing.assert_close(p, w.detach(), rtol=1e-5, atol=1e-6)


def test_forced_unavailable_backend_raises():
    p = torch.randn(4, 4)
    with pytest.raises(mmt_kernels.BackendUnavailableError, match="cuda"):
        mmt_kernels.sparse_adamw_(
            p, torch.zeros_like(p), torch.zeros_like(p), torch.randn(4, 4), torch.tensor([1]), lr=1e-3, backend="cuda"
        )


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(grad=torch.randn(3, 4)), "grad"),
        (dict(rows=torch.tensor([1], dtype=torch.int32)), "int64"),
        (dict(exp_avg=torch.zeros(4, 3)), "exp_avg"),
        (dict(neuron_dim=2), "neuron_dim"),
    ],
)
def test_bad_input_names_the_problem(bad, match):
    args = dict(
        param=torch.randn(4, 4),
        exp_avg=torch.zeros(4, 4),
        exp_avg_sq=torch.zeros(4, 4),
        grad=torch.randn(4, 4),
        rows=torch.tensor([1]),
        neuron_dim=0,
    )
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        mmt_kernels.sparse_adamw_(
            args.pop("param"),
            args.pop("exp_avg"),
            args.pop("exp_avg_sq"),
            args.pop("grad"),
            args.pop("rows"),
            lr=1e-3,
            **args,
        )


@pytest.mark.skipif("cpu" not in BACKENDS, reason="mmt_kernels._C not built")
def test_opcheck_cpu():
    p = torch.randn(9, 5)
    args = (
        p,
        torch.zeros_like(p),
        torch.zeros_like(p),
        torch.randn(9, 5),
        torch.tensor([0, 4, 8]),
        None,
        None,
        1e-3,
        0.9,
        0.999,
        1e-8,
        0.01,
        1,
        0,
        False,
    )
    torch.library.opcheck(torch.ops.mmt.sparse_adamw_.default, args)
    compact = (
        p,
        torch.zeros(3, 5),
        torch.zeros(3, 5),
        torch.randn(9, 5),
        torch.tensor([0, 4, 8]),
        torch.rand(3),
        torch.tensor([1, 2, 3]),
        1e-3,
        0.9,
        0.999,
        1e-8,
        0.01,
        1,
        0,
        True,
    )
    torch.library.opcheck(torch.ops.mmt.sparse_adamw_.default, compact)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_torch_compile_fullgraph(backend):
    def step(p, m, v, g, rows):
        mmt_kernels.sparse_adamw_(p, m, v, g, rows, lr=1e-2, weight_decay=0.1, step=1, backend=backend)
        return p.sum()

    compiled = torch.compile(step, fullgraph=True)
    p = torch.randn(16, 8)
    g, rows = torch.randn(16, 8), torch.tensor([2, 3, 11])
    p2, m, v, m2, v2 = p.clone(), torch.zeros(16, 8), torch.zeros(16, 8), torch.zeros(16, 8), torch.zeros(16, 8)
    compiled(p, m, v, g, rows)
    step(p2, m2, v2, g, rows)
    torch.testing.assert_close(p, p2)
    torch.testing.assert_close(m, m2)


# ---- sparse_adamw_multi_ ----------------------------------------------------------------------------------------


def _multi_case(dtype, with_state_rows, seed=0):
    """Tensors of mixed shapes/neuron axes in one call, including an empty selection and a 1-D bias."""
    gen = torch.Generator().manual_seed(seed)
    specs = [((13, 17), 0, 5), ((9, 70), 1, 33), ((29,), 0, 29), ((6, 3), 0, 0), ((1, 1), 0, 1)]
    out = []
    for shape, nd, k in specs:
        n_neurons = shape[nd] if len(shape) == 2 else shape[0]
        per = shape[1 - nd] if len(shape) == 2 else 1
        rows = torch.randperm(n_neurons, generator=gen)[:k].sort().values
        if with_state_rows:
            U = k + 3  # state holds more neurons than are selected now
            srows = torch.randperm(U, generator=gen)[:k]
        else:
            U, srows = k, None
        state = (U, per) if nd == 0 else (per, U)  # [U, C] for rows, [C, U] for columns
        out.append(
            dict(
                param=torch.randn(shape, generator=gen).to(dtype),
                m=torch.randn(state, generator=gen) * 0.1,
                v=torch.rand(state, generator=gen) * 0.01,
                rows=rows,
                srows=srows,
                nd=nd,
                scale=torch.rand(k, generator=gen) if k % 2 else None,
                step=torch.randint(1, 9, (k,), generator=gen),
                grad=torch.randn(shape, generator=gen),
            )
        )
    return out


def _run_multi(fn, case, to, **kw):
    ps = [to(c["param"]).clone() for c in case]
    ms = [to(c["m"]).clone() for c in case]
    vs = [to(c["v"]).clone() for c in case]
    for i in range(2):
        fn(
            ps,
            ms,
            vs,
            [to(c["grad"]).to(p.dtype) for c, p in zip(case, ps)],
            [c["rows"] for c in case],
            lr=1e-2,
            beta1=0.9,
            beta2=0.99,
            eps=1e-8,
            weight_decay=0.1,
            step=i + 1,
            neuron_dims=[c["nd"] for c in case],
            state_rows=[c["srows"] for c in case],
            row_scales=[None if c["scale"] is None else to(c["scale"]) for c in case],
            row_steps=[c["step"] + i for c in case],
            compact=True,
            **kw,
        )
    return ps, ms, vs


def _ref_multi(ps, ms, vs, gs, rows, *, state_rows, row_scales, row_steps, **kw):
    ref.sparse_adamw_multi_(ps, ms, vs, gs, rows, state_rows, row_scales, row_steps, **kw)


@pytest.mark.parametrize("backend", MULTI_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_state_rows", [False, True])
def test_multi_matches_reference(backend, dtype, with_state_rows):
    case = _multi_case(dtype, with_state_rows)
    golden = _run_multi(_ref_multi, case, lambda t: t.double())
    low = _run_multi(_ref_multi, case, lambda t: t)
    out = _run_multi(mmt_kernels.sparse_adamw_multi_, case, lambda t: t, backend=backend)
    for j, name in enumerate(("param", "exp_avg", "exp_avg_sq")):
        for i in range(len(case)):
            o, lo, gold = out[j][i], low[j][i], golden[j][i]
            assert_close_to_golden(o, lo, gold.to(o.dtype) if o.dtype != torch.float32 else gold, name=f"{name}[{i}]")


@pytest.mark.parametrize("backend", MULTI_BACKENDS)
def test_multi_equals_single_tensor_calls(backend):
    shapes = [(11, 7), (5, 40)]
    ps = [torch.randn(s) for s in shapes]
    gs = [torch.randn(s) for s in shapes]
    rows = [torch.tensor([0, 3, 10]), torch.tensor([1, 39])]
    dims = [0, 1]
    singles = [p.clone() for p in ps]
    ms1 = [torch.zeros(3, 7), torch.zeros(5, 2)]  # [K, C] rows, [C, K] columns
    vs1 = [torch.zeros(3, 7), torch.zeros(5, 2)]
    ms2, vs2 = [m.clone() for m in ms1], [v.clone() for v in vs1]
    mmt_kernels.sparse_adamw_multi_(
        ps, ms1, vs1, gs, rows, lr=1e-2, weight_decay=0.1, step=3, neuron_dims=dims, compact=True, backend=backend
    )
    for i in range(2):
        mmt_kernels.sparse_adamw_(
            singles[i],
            ms2[i],
            vs2[i],
            gs[i],
            rows[i],
            lr=1e-2,
            weight_decay=0.1,
            step=3,
            neuron_dim=dims[i],
            compact=True,
            backend=backend,
        )
    for a, b in zip(ps + ms1 + vs1, singles + ms2 + vs2):
        assert torch.equal(a, b)


@pytest.mark.skipif("cpu" not in MULTI_BACKENDS, reason="mmt_kernels._C not built")
@pytest.mark.parametrize("compact_grad", [False, True])
def test_multi_opcheck_cpu(compact_grad):
    ps = [torch.randn(9, 5), torch.randn(4, 6)]
    # dense gradients have the params' shapes; compact ones the state's layout ([K, C] rows, [C, K] columns)
    grads = [torch.randn(3, 5), torch.randn(4, 2)] if compact_grad else [torch.randn(9, 5), torch.randn(4, 6)]
    args = (
        ps,
        [torch.zeros(5, 5), torch.zeros(4, 6)],
        [torch.zeros(5, 5), torch.zeros(4, 6)],
        grads,
        [torch.tensor([0, 4, 8]), torch.tensor([1, 5])],
        [torch.tensor([4, 0, 2]), torch.tensor([0, 1])],
        [torch.rand(3), None],
        [torch.tensor([1, 2, 3]), None],
        1e-3,
        0.9,
        0.999,
        1e-8,
        0.01,
        1,
        [0, 1],
        True,
        compact_grad,
    )
    torch.library.opcheck(torch.ops.mmt.sparse_adamw_multi_.default, args)


def test_multi_bad_input_names_the_tensor():
    p = torch.randn(4, 4)
    with pytest.raises(ValueError, match=r"\[1\].*grad"):
        mmt_kernels.sparse_adamw_multi_(
            [p, p.clone()],
            [torch.zeros(4, 4)] * 2,
            [torch.zeros(4, 4)] * 2,
            [torch.randn(4, 4), torch.randn(3, 4)],
            [torch.tensor([1])] * 2,
            lr=1e-3,
        )
    with pytest.raises(ValueError, match="state_rows"):
        mmt_kernels.sparse_adamw_multi_(
            [p],
            [torch.zeros(4, 4)],
            [torch.zeros(4, 4)],
            [torch.randn(4, 4)],
            [torch.tensor([1])],
            state_rows=[torch.tensor([0])],
            lr=1e-3,
        )
    with pytest.raises(ValueError, match="entries"):
        mmt_kernels.sparse_adamw_multi_([p], [], [torch.zeros(4, 4)], [torch.randn(4, 4)], [torch.tensor([1])], lr=1e-3)


# ---- compact gradients (fp32 [K, C] rows / [C, K] columns, from sparse_linear) -------------------------------------
def _compact(grad, rows, nd):
    return (neuron_view(grad, 0)[rows] if nd == 0 else grad[:, rows]).float().contiguous()


@pytest.mark.parametrize("backend", MULTI_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_state_rows", [False, True])
def test_multi_compact_grad_matches_reference(backend, dtype, with_state_rows):
    case = _multi_case(dtype, with_state_rows, seed=1)
    for c in case:  # a compact grad keeps fp32 whatever the param dtype
        c["grad"] = _compact(c["grad"], c["rows"], c["nd"])

    def run(fn, to, **kw):
        ps = [to(c["param"]).clone() for c in case]
        ms = [to(c["m"]).clone() for c in case]
        vs = [to(c["v"]).clone() for c in case]
        for i in range(2):
            fn(
                ps,
                ms,
                vs,
                [to(c["grad"]) for c in case],
                [c["rows"] for c in case],
                lr=1e-2,
                beta1=0.9,
                beta2=0.99,
                eps=1e-8,
                weight_decay=0.1,
                step=i + 1,
                neuron_dims=[c["nd"] for c in case],
                state_rows=[c["srows"] for c in case],
                row_scales=[None if c["scale"] is None else to(c["scale"]) for c in case],
                row_steps=[c["step"] + i for c in case],
                compact=True,
                compact_grad=True,
                **kw,
            )
        return ps, ms, vs

    golden = run(_ref_multi, lambda t: t.double())
    low = run(_ref_multi, lambda t: t)
    out = run(mmt_kernels.sparse_adamw_multi_, lambda t: t, backend=backend)
    for j, name in enumerate(("param", "exp_avg", "exp_avg_sq")):
        for i in range(len(case)):
            o, lo, gold = out[j][i], low[j][i], golden[j][i]
            assert_close_to_golden(o, lo, gold.to(o.dtype) if o.dtype != torch.float32 else gold, name=f"{name}[{i}]")


@pytest.mark.parametrize("backend", MULTI_BACKENDS)
def test_multi_compact_grad_equals_dense_grad(backend):
    """fp32: the same gradient values, read from a compact buffer or from the dense one, give bit-identical steps
    (unselected neurons untouched either way)."""
    case = _multi_case(torch.float32, True, seed=2)
    results = []
    for compact_grad in (False, True):
        ps = [c["param"].clone() for c in case]
        ms, vs = [c["m"].clone() for c in case], [c["v"].clone() for c in case]
        grads = [_compact(c["grad"], c["rows"], c["nd"]) if compact_grad else c["grad"] for c in case]
        mmt_kernels.sparse_adamw_multi_(
            ps,
            ms,
            vs,
            grads,
            [c["rows"] for c in case],
            lr=1e-2,
            weight_decay=0.1,
            neuron_dims=[c["nd"] for c in case],
            state_rows=[c["srows"] for c in case],
            row_scales=[c["scale"] for c in case],
            row_steps=[c["step"] for c in case],
            compact=True,
            compact_grad=compact_grad,
            backend=backend,
        )
        results.append(ps + ms + vs)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_multi_compact_grad_bad_input():
    p = torch.randn(6, 4)
    args = ([p], [torch.zeros(2, 4)], [torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="compact grad must be fp32"):
        mmt_kernels.sparse_adamw_multi_(
            *args, [torch.randn(3, 4)], [torch.tensor([1, 2])], lr=1e-3, compact=True, compact_grad=True
        )
    with pytest.raises(ValueError, match="compact grad must be fp32"):
        mmt_kernels.sparse_adamw_multi_(
            *args, [torch.randn(2, 4).double()], [torch.tensor([1, 2])], lr=1e-3, compact=True, compact_grad=True
        )
    with pytest.raises(ValueError, match="needs compact=True"):
        mmt_kernels.sparse_adamw_multi_(
            [p],
            [torch.zeros(6, 4)],
            [torch.zeros(6, 4)],
            [torch.randn(2, 4)],
            [torch.tensor([1, 2])],
            lr=1e-3,
            compact_grad=True,
        )

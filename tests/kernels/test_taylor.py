"""taylor_accumulate_: every available backend against the fp64 reference, segmentation helpers, hooks, opcheck."""

from __future__ import annotations

import pytest
import torch

import mmt_kernels
from mmt_kernels import _backend
from mmt_kernels import reference as ref

from .tolerance import assert_close_to_golden, poison_

BACKENDS = [b for b in ("reference", "cpu", "triton") if _backend.available(b, "cpu", "taylor_accumulate_")[0]]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

SHAPES = [(1, 1), (3, 7), (37, 129), (300, 65), (0, 5), (4, 0)]


def _case(N, M, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    act = torch.randn(N, M, generator=gen).to(dtype)
    grad = (torch.randn(N, M, generator=gen) * 1e-2).to(dtype)
    w = torch.rand(N, generator=gen)
    w[::5] = 0.0  # padding tokens
    acc0 = torch.rand(M, generator=gen)
    return acc0, act, grad, w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,M", SHAPES)
def test_matches_reference(backend, dtype, N, M):
    acc0, act, grad, w = _case(N, M, dtype)
    golden = acc0.double().clone()
    ref.taylor_accumulate_(golden, act.double(), grad.double(), w.double())
    low = acc0.clone()
    ref.taylor_accumulate_(low, act, grad, w)
    out = acc0.clone()
    mmt_kernels.taylor_accumulate_(out, act, grad, token_weight=w, backend=backend)
    assert_close_to_golden(out, low, golden, name="acc")


@pytest.mark.parametrize("backend", BACKENDS)
def test_writes_every_neuron_into_a_poisoned_accumulator(backend):
    # a NaN start value must stay NaN exactly where the kernel adds to it: every column is touched, none twice
    act, grad = torch.randn(10, 33), torch.randn(10, 33)
    acc = poison_(torch.empty(33))
    mmt_kernels.taylor_accumulate_(acc, act, grad, backend=backend)
    assert torch.isnan(acc).all()
    acc = torch.zeros(33)
    mmt_kernels.taylor_accumulate_(acc, act, grad, backend=backend)
    torch.testing.assert_close(acc, (act * grad).abs().mean(0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segmentations_agree(backend):
    """attention_mask, lengths and offsets describe the same 3 sequences: same result as a per-sequence loop."""
    B, T, M = 3, 9, 20
    lengths = torch.tensor([9, 4, 1])
    act, grad = torch.randn(B, T, M), torch.randn(B, T, M)
    expected = torch.zeros(M, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        expected += (act[b, :n].double() * grad[b, :n].double()).abs().mean(0)
    mask = torch.arange(T)[None] < lengths[:, None]
    by_mask = mmt_kernels.taylor_accumulate_(torch.zeros(M), act, grad, attention_mask=mask, backend=backend)
    by_len = mmt_kernels.taylor_accumulate_(torch.zeros(M), act, grad, lengths=lengths, backend=backend)
    packed = torch.cat([act[b, : int(lengths[b])] for b in range(B)])
    packed_g = torch.cat([grad[b, : int(lengths[b])] for b in range(B)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    by_off = mmt_kernels.taylor_accumulate_(torch.zeros(M), packed, packed_g, offsets=offsets, backend=backend)
    for got in (by_mask, by_len, by_off):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # left padding through the mask gives the same numbers as right padding
    left = torch.zeros(B, T, M)
    left_g = torch.zeros(B, T, M)
    for b in range(B):
        n = int(lengths[b])
        left[b, T - n :], left_g[b, T - n :] = act[b, :n], grad[b, :n]
    lmask = torch.arange(T)[None] >= (T - lengths)[:, None]
    by_left = mmt_kernels.taylor_accumulate_(torch.zeros(M), left, left_g, attention_mask=lmask, backend=backend)
    torch.testing.assert_close(by_left.double(), expected, rtol=1e-5, atol=1e-6)


def test_empty_sequence_contributes_nothing():
    w = ref.token_weights(offsets=torch.tensor([0, 2, 2, 5]))
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5, 1 / 3, 1 / 3, 1 / 3]))
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    torch.testing.assert_close(ref.token_weights(attention_mask=mask), torch.tensor([0.5, 0.5, 0, 0, 0, 0]))


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(grad=torch.randn(4, 6)), "grad"),
        (dict(acc=torch.zeros(6, dtype=torch.float64)), "acc"),
        (dict(acc=torch.zeros(6)), "acc"),
        (dict(act=torch.randn(2, 2, 2, 5), grad=torch.randn(2, 2, 2, 5)), "act"),
        (dict(attention_mask=torch.ones(3, 3)), "attention_mask"),
        (dict(act=torch.randn(4, 5, dtype=torch.float64).int(), grad=torch.randn(4, 5).int()), "dtype"),
    ],
)
def test_bad_input_names_the_problem(bad, match):
    args = dict(acc=torch.zeros(5), act=torch.randn(4, 5), grad=torch.randn(4, 5))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        mmt_kernels.taylor_accumulate_(args.pop("acc"), args.pop("act"), args.pop("grad"), **args)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="mmt_kernels._C not built")
def test_opcheck_cpu():
    args = (torch.zeros(7), torch.randn(11, 7), torch.randn(11, 7), torch.rand(11))
    torch.library.opcheck(torch.ops.mmt.taylor_accumulate_.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hook_matches_stored_activations(backend):
    """TaylorHook on a Linear output equals the original script's stored-activation computation."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(6, 10)
    x = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    hook = mmt_kernels.TaylorHook(lin, backend=backend)
    hook.bucket, hook.token_weight = "de", mmt_kernels.token_weights(attention_mask=mask)
    out = lin(x)
    (out**2).sum().backward()
    hook.remove()
    o = lin(x).detach()
    g = 2 * o
    expected = sum((o[b, :n] * g[b, :n]).abs().mean(0) for b, n in enumerate((5, 2)))
    torch.testing.assert_close(hook.acc["de"], expected, rtol=1e-5, atol=1e-6)

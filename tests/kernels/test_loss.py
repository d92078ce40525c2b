"""Fused linear + cross-entropy: row ops against the fp64 reference on every backend, the chunked loss and its
gradients against autograd through full logits, and the trainer's loss against Hugging Face's on a tiny model."""

from __future__ import annotations

import pytest
import torch

import mmt_kernels
from mmt_kernels import _backend
from mmt_kernels import loss as L
from mmt_kernels.reference import loss as ref

from .tolerance import assert_close_to_golden, poison_

BACKENDS = [b for b in ("reference", "cpu", "triton") if _backend.available(b, "cpu", "cross_entropy_lse")[0]]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (3, 17), (5, 4099), (0, 7), (9, 130)]
IGN = -100


def _case(N, V, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=gen) * scale).to(dtype)
    target = torch.randint(0, V, (N,), generator=gen)
    target[1::3] = IGN
    return logits, target


def _golden_lse(logits, target, cap):
    return ref.cross_entropy_lse(logits.double(), target, IGN, cap)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V", SHAPES)
@pytest.mark.parametrize("cap", [0.0, 4.0])
def test_lse_matches_reference(backend, dtype, N, V, cap):
    logits, target = _case(N, V, dtype)
    g_loss, g_lse = _golden_lse(logits, target, cap)
    r_loss, r_lse = ref.cross_entropy_lse(logits, target, IGN, cap)
    loss, lse = mmt_kernels.cross_entropy_lse(logits, target, ignore_index=IGN, softcap=cap, backend=backend)
    assert loss.dtype == lse.dtype == torch.float32
    assert_close_to_golden(loss, r_loss, g_loss, name="loss")
    assert_close_to_golden(lse, r_lse, g_lse, name="lse")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V", SHAPES)
@pytest.mark.parametrize("cap", [0.0, 4.0])
def test_grad_matches_reference(backend, dtype, N, V, cap):
    logits, target = _case(N, V, dtype)
    _, lse = _golden_lse(logits, target, cap)
    lse = lse.float()
    gl = torch.rand(N) + 0.5
    golden = logits.double().clone()
    ref.cross_entropy_grad_(golden, target, lse.double(), gl.double(), IGN, cap)
    low = logits.clone()
    ref.cross_entropy_grad_(low, target, lse, gl, IGN, cap)
    out = logits.clone()
    mmt_kernels.cross_entropy_grad_(out, target, lse, gl, ignore_index=IGN, softcap=cap, backend=backend)
    assert_close_to_golden(out, low, golden, name="grad")
    if N:
        assert (out[1::3] == 0).all(), "ignored rows must get a zero gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_logits_and_every_row_written(backend):
    logits, target = _case(6, 50, torch.float32)
    wide = torch.randn(6, 100)
    wide[:, ::2] = logits
    view = wide[:, ::2]
    assert not view.is_contiguous()
    loss, lse = mmt_kernels.cross_entropy_lse(view, target, backend=backend)
    g_loss, _ = _golden_lse(logits, target, 0.0)
    torch.testing.assert_close(loss.double(), g_loss, rtol=1e-5, atol=1e-5)
    # a poisoned (NaN) row whose target is ignored is overwritten with zeros; a live one stays NaN-free elsewhere
    z = logits.clone()
    z[1] = poison_(torch.empty(50))
    mmt_kernels.cross_entropy_grad_(z, target, lse, torch.ones(6), backend=backend)
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_stay_finite(backend):
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [float("-inf"), 0.0, 1.0]])
    target = torch.tensor([1, 0, 2])
    loss, _ = mmt_kernels.cross_entropy_lse(logits, target, backend=backend)
    g_loss, _ = _golden_lse(logits, target, 0.0)
    torch.testing.assert_close(loss.double(), g_loss, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_exp_over_the_whole_range(backend):
    """The gradient of a row with lse = 0 is exp(z): the vectorised exp of the C++ kernel (rounding by the
    1.5 * 2^23 trick, clamping by min/max) against fp64 exp from -87 to 80, at most the smallest normal float
    below -87.3 (the C++ kernel flushes to 0), at a length that is no multiple of any vector width."""
    z = torch.linspace(-87.0, 80.0, 16 * 2048 + 13, dtype=torch.float64).float()
    low = torch.tensor([-1e4, -100.0, -87.5, float("-inf")])
    row = torch.cat([z, low])[None].contiguous()
    target = torch.tensor([IGN + 1])  # a live row; its target column gets exp(z) - 1
    target[0] = 5
    out = row.clone()
    mmt_kernels.cross_entropy_grad_(out, target, torch.zeros(1), torch.ones(1), backend=backend)
    want = row.double().exp()
    want[0, 5] -= 1.0
    live = torch.arange(row.shape[1]) < z.numel()
    torch.testing.assert_close(out[0, live].double(), want[0, live], rtol=4e-7, atol=0.0)
    assert (out[0, ~live] >= 0).all() and (out[0, ~live] <= torch.finfo(torch.float32).tiny).all()


def _lce_case(N, H, V, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(dtype)
    target = torch.randint(0, V, (N,), generator=gen)
    target[::4] = IGN
    return hidden, weight, target


def _golden_lce(hidden, weight, target, cap):
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    loss = ref.linear_cross_entropy(h, w, target, IGN, cap)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _low_lce(hidden, weight, target, cap):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = ref.linear_cross_entropy(h, w, target, IGN, cap)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "N,H,V,chunk", [(1, 1, 1, 1), (13, 7, 33, 4), (10, 16, 301, 3), (20, 9, 50, 64), (0, 8, 10, 4)]
)
@pytest.mark.parametrize("cap", [0.0, 5.0])
@pytest.mark.parametrize("recompute", [False, True])
def test_linear_cross_entropy_matches_full_logits(backend, dtype, N, H, V, chunk, cap, recompute):
    hidden, weight, target = _lce_case(N, H, V, dtype)
    g = _golden_lce(hidden, weight, target, cap)
    r = _low_lce(hidden, weight, target, cap)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = mmt_kernels.linear_cross_entropy(
        h, w, target, ignore_index=IGN, softcap=cap or None, chunk_rows=chunk, recompute=recompute, backend=backend
    )
    (loss * 0.5).backward()  # a non-unit upstream gradient
    loss = loss.detach()
    h.grad *= 2
    w.grad *= 2
    assert loss.dtype == torch.float32 and h.grad.dtype == dtype and w.grad.dtype == dtype
    # chunked sums differ in order from one full-logits sum: a few ulps of the total on top of the reference error
    assert_close_to_golden(loss, r[0], g[0], factor=2.0, ulps=4.0 * max(N, 1), name="loss")
    assert_close_to_golden(h.grad, r[1], g[1], factor=3.0, ulps=8.0, name="grad hidden")
    assert_close_to_golden(w.grad, r[2], g[2], factor=3.0, ulps=8.0, name="grad weight")


@pytest.mark.parametrize("recompute", [False, True])
def test_only_hidden_or_only_weight_and_mean_reduction(recompute):
    hidden, weight, target = _lce_case(11, 6, 40, torch.float32)
    _, gh, gw = _golden_lce(hidden, weight, target, 0.0)
    h = hidden.clone().requires_grad_()
    mmt_kernels.linear_cross_entropy(h, weight, target, chunk_rows=5, recompute=recompute).backward()
    torch.testing.assert_close(h.grad.double(), gh, rtol=1e-5, atol=1e-6)
    w = weight.clone().requires_grad_()
    mmt_kernels.linear_cross_entropy(hidden, w, target, chunk_rows=5, recompute=recompute).backward()
    torch.testing.assert_close(w.grad.double(), gw, rtol=1e-5, atol=1e-6)
    mean = mmt_kernels.linear_cross_entropy(hidden, weight, target, reduction="mean")
    full = torch.nn.functional.cross_entropy(hidden @ weight.t(), target, ignore_index=IGN)
    torch.testing.assert_close(mean, full, rtol=1e-5, atol=1e-6)


def test_all_ignored_gives_zero_loss_and_grads():
    hidden, weight, _ = _lce_case(5, 4, 9, torch.float32)
    target = torch.full((5,), IGN)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = mmt_kernels.linear_cross_entropy(h, w, target)
    loss.backward()
    assert loss.item() == 0.0 and (h.grad == 0).all() and (w.grad == 0).all()


def test_autocast_runs_in_bf16_with_fp32_loss():
    hidden, weight, target = _lce_case(12, 16, 70, torch.float32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mmt_kernels.linear_cross_entropy(h, w, target, chunk_rows=5)
        naive = torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), target, reduction="sum")
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(loss, naive, rtol=2e-2, atol=0.0)


def test_gather_loss_positions():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    labels = torch.tensor([[IGN, IGN, 5, 6], [IGN, 7, IGN, IGN]])
    rows, tgt = L.gather_loss_positions(hidden, labels)
    assert tgt.tolist() == [5, 6, 7]
    assert rows.flatten().tolist() == [1.0, 2.0, 4.0]


@pytest.mark.skipif(not _backend.available("cpu", "cpu", "cross_entropy_lse")[0], reason="no C++ kernels")
def test_opcheck():
    logits, target = _case(4, 33, torch.float32)
    torch.library.opcheck(torch.ops.mmt.cross_entropy_lse.default, (logits, target, IGN, 0.0))
    lse = ref.cross_entropy_lse(logits, target, IGN, 0.0)[1]
    torch.library.opcheck(
        torch.ops.mmt.cross_entropy_grad_.default, (logits.clone(), target, lse, torch.ones(4), IGN, 0.0)
    )


def test_bad_input_names_the_problem():
    logits, target = _case(4, 8, torch.float32)
    with pytest.raises(ValueError, match="target must be int64"):
        mmt_kernels.cross_entropy_lse(logits, target.int())
    with pytest.raises(ValueError, match="logits must be"):
        mmt_kernels.cross_entropy_lse(logits[:, :0], target)
    with pytest.raises(ValueError, match="lse must be fp32"):
        mmt_kernels.cross_entropy_grad_(logits, target, torch.zeros(3), torch.ones(4))
    with pytest.raises(ValueError, match="contiguous"):
        mmt_kernels.cross_entropy_grad_(logits.t().contiguous().t(), target, torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match=r"hidden \[N, H\] and weight \[V, H\]"):
        mmt_kernels.linear_cross_entropy(torch.randn(4, 3), torch.randn(8, 5), target)
    with pytest.raises(TypeError, match="must match"):
        mmt_kernels.linear_cross_entropy(torch.randn(4, 3), torch.randn(8, 3).double(), target)
    with pytest.raises(ValueError, match="reduction"):
        mmt_kernels.linear_cross_entropy(torch.randn(4, 3), torch.randn(8, 3), target, reduction="none")


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("target_only", [True, False])
def test_trainer_loss_equals_hf_loss_and_gradients(arch, target_only):
    """The trainer's fused loss (decoder + chunked linear CE on the labelled positions) against HF's own loss
    (full logits, mean over labels): same value and same gradient for every parameter of a tiny model."""
    from mmt.testing import tiny_model
    from mmt.train import fused_loss_parts, lm_loss_sum

    model = tiny_model(arch, vocab=97, hidden=32, layers=2, heads=4, intermediate=48)
    model.train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    labels = ids.clone()
    labels[mask == 0] = IGN
    if target_only:
        labels[:, :6] = IGN
    parts = fused_loss_parts(model)
    assert parts is not None, f"{arch}: the fused split must apply"
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    fused_sum, _ = lm_loss_sum(model, batch, False, parts)
    n = int((labels[:, 1:] != IGN).sum())
    (fused_sum / n).backward()
    mine = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    hf = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    hf.backward()
    torch.testing.assert_close(fused_sum / n, hf, rtol=1e-5, atol=1e-6)
    for k, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(mine[k], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert set(mine) == {k for k, p in model.named_parameters() if p.grad is not None}


def test_fused_split_is_refused_for_capped_logits():
    from mmt.testing import tiny_model
    from mmt.train import fused_loss_parts

    model = tiny_model("gemma3", vocab=50, hidden=16, layers=1, heads=2, intermediate=16)
    model.config.final_logit_softcapping = 0.5  # logits no longer equal hidden @ W.T
    assert fused_loss_parts(model) is None

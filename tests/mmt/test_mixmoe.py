"""Mix-MoE on tiny Llama / Qwen2 / Gemma3 models: sliced LM experts reproduce the dense FFN, silent MT
experts, stage-wise routing and freezing, stage 1 -> stage 2 hand-off, the aux-loss hook, the load plot."""
from __future__ import annotations

import types

import pytest
import torch

from mmt.methods import mixmoe
from mmt.models import find_ffn
from mmt.testing import tiny_model
from mmt_kernels import grouped_mlp

ARCHS = ["llama", "qwen2", "gemma3"]
TEXTS = {"de": ["Das Wetter ist heute schön.", "Ich lese ein Buch."],
         "en": ["The weather is nice today.", "I am reading a book."],
         "fr": ["Il fait beau aujourd'hui.", "Je lis un livre."]}
TRAIN = types.SimpleNamespace(lr=1e-2, weight_decay=0.1, adam_betas=(0.9, 0.99), adam_eps=1e-8)


def _model(arch, tok):
    return tiny_model(arch, vocab=len(tok), layers=2, hidden=32, intermediate=48, heads=4, seed=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_lm_experts_reproduce_the_dense_ffn(arch, tok):
    model = _model(arch, tok)
    dense = [info.module for info in find_ffn(model)]
    x = torch.randn(2, 7, 32)
    want = [m(x) for m in dense]
    cfg = mixmoe.Config(num_lm_experts=4, num_mt_experts=2, top_k=4, router_init_std=0.0, n_freq=8)
    model, plan = mixmoe.prepare(model, cfg, tok)
    moes = mixmoe.moe_layers(model)
    assert len(moes) == 2 and plan.sampler == "mono"
    for moe, w in zip(moes, want):
        # The sum of all LM experts is the dense FFN ...
        E = moe.lm_experts
        xs = x.reshape(-1, 32).repeat(E, 1)
        offsets = torch.arange(E + 1) * x.shape[0] * x.shape[1]
        per_expert = grouped_mlp(xs, offsets, moe.w_gate[:E], moe.w_up[:E], moe.w_down[:E], act=moe.act)
        torch.testing.assert_close(per_expert.view(E, -1, 32).sum(0), w.reshape(-1, 32), rtol=1e-5, atol=1e-6)
        # ... and the stage-1 layer with a uniform router over all LM experts reproduces it exactly.
        torch.testing.assert_close(moe(x), w, rtol=1e-5, atol=1e-6)
        # MT experts start silent (zero down projection).
        assert torch.all(moe.w_down[E:] == 0)


def _step(model, plan, opt, tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)
    extra = plan.extra_loss(model)
    assert extra.ndim == 0 and torch.isfinite(extra) and extra > 0
    (out.loss + extra).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_stage1_then_stage2(arch, tok, tmp_path):
    torch.manual_seed(0)
    cfg1 = mixmoe.Config(stage=1, num_lm_experts=3, num_mt_experts=2, top_k=2, n_freq=6)
    model, plan = mixmoe.prepare(_model(arch, tok), cfg1, tok)
    opt = plan.build_optimizer(model, TRAIN)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        _step(model, plan, opt, tok, TEXTS["de"] + TEXTS["en"])
    E_lm = 3
    for moe_name, moe in [(n, m) for n, m in model.named_modules() if isinstance(m, type(mixmoe.moe_layers(model)[0]))]:
        for w in ("w_gate", "w_up", "w_down"):
            p, b = getattr(moe, w).detach(), before[f"{moe_name}.{w}"]
            assert torch.equal(p[E_lm:], b[E_lm:]), "stage 1 must not touch the MT experts"
            assert not torch.equal(p[:E_lm], b[:E_lm])
        assert not torch.equal(moe.router.weight.detach(), before[f"{moe_name}.router.weight"])
    for n, p in model.named_parameters():
        if "self_attn" in n or "embed" in n:
            assert torch.equal(p.detach(), before[n]), f"{n} should stay frozen"
    plan.save_artifacts(tmp_path / "stage1")

    # Stage 2 from a fresh dense model: loads stage 1, trains MT experts + router, LM experts frozen.
    cfg2 = mixmoe.Config(stage=2, stage1_path=str(tmp_path / "stage1"), num_lm_experts=3, num_mt_experts=2,
                         top_k=2, n_freq=6)
    model2, plan2 = mixmoe.prepare(_model(arch, tok), cfg2, tok)
    assert plan2.sampler == "mixed" and plan2.loss_on == "target"
    loaded = {n: p.detach().clone() for n, p in model2.named_parameters()}
    for n, p in model.named_parameters():
        assert torch.equal(loaded[n], p.detach()), f"{n} not restored from stage 1"
    opt2 = plan2.build_optimizer(model2, TRAIN)
    moe2 = mixmoe.moe_layers(model2)
    assert all(bool(m.expert_mask.all()) for m in moe2)
    for _ in range(3):
        _step(model2, plan2, opt2, tok, TEXTS["fr"] + TEXTS["en"])
    for moe_name, moe in [(n, m) for n, m in model2.named_modules() if m in moe2]:
        for w in ("w_gate", "w_up", "w_down"):
            p, b = getattr(moe, w).detach(), loaded[f"{moe_name}.{w}"]
            assert torch.equal(p[:E_lm], b[:E_lm]), "stage 2 must leave the LM experts bit-identical"
        assert not torch.equal(moe.w_down.detach()[E_lm:], loaded[f"{moe_name}.w_down"][E_lm:])


def test_expert_load_plot(tok, tmp_path):
    model, _ = mixmoe.prepare(_model("llama", tok), mixmoe.Config(num_lm_experts=2, num_mt_experts=2, n_freq=4),
                              tok)
    stage1 = mixmoe.expert_load(model, tok, TEXTS)
    assert set(stage1) == set(TEXTS)
    for load in stage1.values():
        assert load.shape == (2, 4)
        torch.testing.assert_close(load.sum(1), torch.ones(2, dtype=load.dtype))
        assert torch.all(load[:, 2:] == 0)  # MT experts are masked in stage 1
    mixmoe.set_stage(model, 2)
    stage2 = mixmoe.expert_load(model, tok, TEXTS)
    path = mixmoe.plot_expert_load({"stage 1": stage1, "stage 2": stage2}, tmp_path / "load.png", lm_experts=2)
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("kw,match", [
    (dict(stage=3), "stage"),
    (dict(stage=2), "stage1_path"),
    (dict(fft_variant="sequence"), "fft_variant"),
    (dict(top_k=3), "top_k"),
    (dict(num_lm_experts=5), "divisible"),
    (dict(partition="clustered"), "partition"),
])
def test_config_errors(kw, match, tok):
    with pytest.raises(ValueError, match=match):
        mixmoe.prepare(_model("llama", tok), mixmoe.Config(**kw), tok)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown"):
        mixmoe.Config.from_dict({"num_lm_expert": 2})


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_grouped_routing_stage2_starts_from_stage1(arch, tok, tmp_path):
    """routing='grouped' with top_k == num_lm_experts: stage 1 is the dense FFN (uniform router) and
    enabling the (silent) MT experts in stage 2 leaves the function unchanged; LM experts stay frozen."""
    torch.manual_seed(0)
    dense = _model(arch, tok)
    enc = tok(TEXTS["de"] + TEXTS["en"], return_tensors="pt", padding=True)
    want = dense(**enc).logits
    cfg1 = mixmoe.Config(stage=1, routing="grouped", top_k=2, router_init_std=0.0, n_freq=6)
    model, plan = mixmoe.prepare(dense, cfg1, tok)
    torch.testing.assert_close(model(**enc).logits, want, rtol=1e-4, atol=1e-5)
    opt = plan.build_optimizer(model, TRAIN)
    _step(model, plan, opt, tok, TEXTS["de"] + TEXTS["en"])
    after1 = model(**enc).logits
    plan.save_artifacts(tmp_path / "s1")
    cfg2 = mixmoe.Config(stage=2, stage1_path=str(tmp_path / "s1"), routing="grouped", top_k=2, top_k_mt=1, n_freq=6)
    model2, plan2 = mixmoe.prepare(_model(arch, tok), cfg2, tok)
    torch.testing.assert_close(model2(**enc).logits, after1, rtol=0, atol=0)
    lm = [m.w_gate.detach()[:2].clone() for m in mixmoe.moe_layers(model2)]
    opt2 = plan2.build_optimizer(model2, TRAIN)
    for m in mixmoe.moe_layers(model2):
        m.track_load = True
    _step(model2, plan2, opt2, tok, TEXTS["fr"] + TEXTS["en"])
    for m, w in zip(mixmoe.moe_layers(model2), lm):
        assert torch.equal(m.w_gate.detach()[:2], w)
        assert m.w_down.detach()[2:].abs().sum() > 0
        # every token: both LM experts + one MT expert
        assert m.load_counts[:2].sum() == 2 * m.load_counts[2:].sum() > 0


def test_grouped_routing_config_errors(tok):
    with pytest.raises(ValueError, match="top_k"):
        mixmoe.prepare(_model("llama", tok), mixmoe.Config(routing="grouped", top_k=3, num_lm_experts=2), tok)
    with pytest.raises(ValueError, match="routing"):
        mixmoe.prepare(_model("llama", tok), mixmoe.Config(routing="mixed"), tok)

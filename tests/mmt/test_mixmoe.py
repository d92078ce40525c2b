"""Mix-MoE on tiny models of every FFN family (gated: Llama, Qwen2, Gemma 3; GELU: GPT-2, BLOOM, XGLM): exact
upcycling, exact stage 1 -> stage 2 hand-off with silent MT experts, what each stage trains, the aux-loss hook,
routing, configs and the expert-load plot."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
import yaml

from mmt.arch import spec_of
from mmt.errors import ConfigError, MethodError
from mmt.methods import mixmoe
from mmt.testing import tiny_model

GATED = ["llama", "qwen2", "gemma3"]
GELU = ["gpt2", "bloom", "xglm"]
FAMILIES = GATED + GELU
TEXTS = {
    "de": ["Das Wetter ist heute schön.", "Ich lese ein Buch."],
    "en": ["The weather is nice today.", "I am reading a book."],
    "fr": ["Il fait beau aujourd'hui.", "Je lis un livre."],
}
TRAIN = types.SimpleNamespace(lr=1e-2, weight_decay=0.1, adam_betas=(0.9, 0.99), adam_eps=1e-8)
CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"


def family_model(arch: str, vocab: int, seed: int = 0) -> torch.nn.Module:
    """A 2-layer random model of ``arch`` with d=32, d_ff=48 (BLOOM: 4 * 32), fp32, eager attention."""
    import transformers as tf

    if arch in ("llama", "qwen2", "gemma3", "gpt2"):
        return tiny_model(arch, vocab=vocab, layers=2, hidden=32, intermediate=48, heads=4, seed=seed)
    if arch == "bloom":
        cfg = tf.BloomConfig(
            vocab_size=vocab,
            hidden_size=32,
            n_layer=2,
            n_head=4,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        cls = tf.BloomForCausalLM
    elif arch == "xglm":
        cfg = tf.XGLMConfig(
            vocab_size=vocab,
            d_model=32,
            num_layers=2,
            attention_heads=4,
            ffn_dim=48,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        cls = tf.XGLMForCausalLM
    else:
        raise ValueError(arch)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    model.config.use_cache = False
    return model


def needs_ffn(model):
    """Skip where mmt.models.find_ffn cannot locate this family's FFN yet (a models.py matter, not Mix-MoE's)."""
    from mmt.models import find_ffn

    try:
        find_ffn(model)
    except MethodError as exc:
        pytest.skip(f"find_ffn does not support {type(model).__name__}: {exc}")
    return model


def _model(arch, tok, seed=0):
    return needs_ffn(family_model(arch, len(tok), seed))


def _logits(model, tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def _step(model, plan, opt, tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)
    extra = plan.extra_loss(model)
    assert extra.ndim == 0 and torch.isfinite(extra) and extra > 0
    (out.loss + extra).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _expert_state(model):
    return {
        f"{i}.{j}": t.detach().clone()
        for i, m in enumerate(mixmoe.moe_layers(model))
        for j, t in enumerate(mixmoe.layer.expert_tensors(m) + mixmoe.layer.shared_lm_tensors(m))
    }


@pytest.mark.parametrize("arch", FAMILIES)
def test_upcycling_is_exact(arch, tok):
    """Zero router + top_k == num_lm_experts: the upcycled model is the dense model (to float rounding)."""
    model = _model(arch, tok)
    texts = TEXTS["de"] + TEXTS["en"]
    want = _logits(model, tok, texts)
    cfg = mixmoe.Config(n_freq=8)
    assert cfg.exact_upcycling() and cfg.routing == "grouped" and cfg.router_init_std == 0.0
    model, plan = mixmoe.prepare(model, cfg, tok)
    kinds = {s["kind"] for s in spec_of(model)["settings"]["layers"]}
    assert kinds == {"gelu" if arch in GELU else "glu"} and plan.info["exact upcycling"] is True
    assert len(mixmoe.moe_layers(model)) == 2 and plan.sampler == "mono"
    torch.testing.assert_close(_logits(model, tok, texts), want, rtol=1e-5, atol=1e-5)
    for moe in mixmoe.moe_layers(model):  # MT experts start silent
        out_proj = moe.w_out if isinstance(moe, mixmoe.GeluMoEFFN) else moe.w_down
        assert torch.all(out_proj[moe.lm_experts :] == 0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_random_router_is_not_exact(arch, tok):
    """The old default (router_init_std=0.02) changes the function at step 0: the identity needs the zero router."""
    model = _model(arch, tok)
    want = _logits(model, tok, TEXTS["en"])
    model, plan = mixmoe.prepare(model, mixmoe.Config(n_freq=8, router_init_std=0.5), tok)
    assert plan.info["exact upcycling"] is False
    assert (_logits(model, tok, TEXTS["en"]) - want).abs().max() > 1e-3


@pytest.mark.parametrize("arch", FAMILIES)
def test_stage2_with_silent_mt_experts_is_exact(arch, tok, tmp_path):
    """Stage 1 -> stage 2 (grouped routing, MT experts enabled but untrained): still the dense model, and
    exactly the stage-1 function."""
    dense = _model(arch, tok)
    texts = TEXTS["fr"] + TEXTS["en"]
    want = _logits(dense, tok, texts)
    model, plan = mixmoe.prepare(dense, mixmoe.Config(stage=1, n_freq=8), tok)
    stage1 = _logits(model, tok, texts)
    plan.save_artifacts(tmp_path / "s1")
    cfg2 = mixmoe.Config(stage=2, stage1_path=str(tmp_path / "s1"), n_freq=8)
    model2, _ = mixmoe.prepare(_model(arch, tok), cfg2, tok)
    assert all(bool(m.expert_mask.all()) for m in mixmoe.moe_layers(model2))
    got = _logits(model2, tok, texts)
    torch.testing.assert_close(got, stage1, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_joint_routing_breaks_the_handoff(arch, tok, tmp_path):
    """Why grouped routing is the default: with joint top-2 routing the MT experts take slots from the LM
    experts as soon as stage 2 enables them, so stage 2 does not start from the stage-1 model."""
    # a non-zero router stands in for the stage-1 router after training (its MT rows stay zero: masked)
    cfg1 = mixmoe.Config(routing="joint", n_freq=8, router_init_std=0.5)
    model, plan = mixmoe.prepare(_model(arch, tok), cfg1, tok)
    with torch.no_grad():
        for moe in mixmoe.moe_layers(model):
            moe.router.weight[moe.lm_experts :] = 0.0
    stage1 = _logits(model, tok, TEXTS["en"])
    plan.save_artifacts(tmp_path / "s1")
    cfg2 = mixmoe.Config(stage=2, routing="joint", stage1_path=str(tmp_path / "s1"), n_freq=8, router_init_std=0.5)
    model2, _ = mixmoe.prepare(_model(arch, tok), cfg2, tok)
    assert (_logits(model2, tok, TEXTS["en"]) - stage1).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("stage1_train", ["router", "experts+router"])
def test_stage1_trains_router_and_optionally_lm_experts(arch, stage1_train, tok):
    torch.manual_seed(0)
    cfg = mixmoe.Config(
        stage=1, num_lm_experts=3 if arch == "llama" else 2, top_k=2, n_freq=6, stage1_train=stage1_train
    )
    model, plan = mixmoe.prepare(_model(arch, tok), cfg, tok)
    opt = plan.build_optimizer(model, TRAIN)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    experts_before = _expert_state(model)
    for _ in range(2):
        _step(model, plan, opt, tok, TEXTS["de"] + TEXTS["en"])
    E_lm = cfg.num_lm_experts
    for i, moe in enumerate(mixmoe.moe_layers(model)):
        tensors = mixmoe.layer.expert_tensors(moe)
        for j, t in enumerate(tensors):
            b = experts_before[f"{i}.{j}"]
            assert torch.equal(t.detach()[E_lm:], b[E_lm:]), "stage 1 must not touch the MT experts"
            lm_changed = not torch.equal(t.detach()[:E_lm], b[:E_lm])
            if j == 0 or t.dim() == 3:  # input/output projections (a zero bias may stay zero)
                assert lm_changed == (stage1_train == "experts+router")
        assert moe.router.weight.detach().abs().sum() > 0, "the zero router must start moving"
    for n, p in model.named_parameters():
        if not any(k in n for k in ("mlp", "router", "fft", "fc1", "dense_h_to_4h", "c_fc")):
            assert torch.equal(p.detach(), before[n]), f"{n} should stay frozen"


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_stage2_trains_mt_experts_only(arch, tok, tmp_path):
    model, plan = mixmoe.prepare(_model(arch, tok), mixmoe.Config(n_freq=6, stage1_train="experts+router"), tok)
    opt = plan.build_optimizer(model, TRAIN)
    _step(model, plan, opt, tok, TEXTS["de"] + TEXTS["en"])
    plan.save_artifacts(tmp_path / "s1")
    cfg2 = mixmoe.Config(stage=2, stage1_path=str(tmp_path / "s1"), n_freq=6, stage1_train="experts+router", top_k_mt=1)
    model2, plan2 = mixmoe.prepare(_model(arch, tok), cfg2, tok)
    assert plan2.sampler == "mixed" and plan2.loss_on == "target"
    loaded = _expert_state(model2)
    for n, t in _expert_state(model).items():
        assert torch.equal(loaded[n], t), f"expert tensor {n} not restored from stage 1"
    opt2 = plan2.build_optimizer(model2, TRAIN)
    for m in mixmoe.moe_layers(model2):
        m.track_load = True
    for _ in range(2):
        _step(model2, plan2, opt2, tok, TEXTS["fr"] + TEXTS["en"])
    after = _expert_state(model2)
    for i, moe in enumerate(mixmoe.moe_layers(model2)):
        tensors = mixmoe.layer.expert_tensors(moe)
        for j, t in enumerate(tensors):
            assert torch.equal(after[f"{i}.{j}"][:2], loaded[f"{i}.{j}"][:2]), "LM experts must stay bit-identical"
        for extra in mixmoe.layer.shared_lm_tensors(moe):
            assert not extra.requires_grad
        assert tensors[-1].detach()[2:].abs().sum() > 0, "MT output projections must train"
        # every token: both LM experts + one MT expert
        assert moe.load_counts[:2].sum() == 2 * moe.load_counts[2:].sum() > 0


def test_expert_load_plot(tok, tmp_path):
    model, _ = mixmoe.prepare(_model("llama", tok), mixmoe.Config(num_lm_experts=2, num_mt_experts=2, n_freq=4), tok)
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


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"stage": 3}, "stage"),
        ({"stage": 2}, "stage1_path"),
        ({"fft_variant": "sequence"}, "fft_variant"),
        ({"top_k": 3}, "top_k"),
        ({"num_lm_experts": 5, "top_k": 5}, "divisible"),
        ({"partition": "clustered"}, "partition"),
        ({"routing": "mixed"}, "routing"),
        ({"stage1_train": "all"}, "stage1_train"),
        ({"router_init_std": -1.0}, "router_init_std"),
        ({"top_k_mt": 3}, "top_k_mt"),
    ],
)
def test_config_errors(kw, match, tok):
    with pytest.raises((ConfigError, MethodError), match=match):
        mixmoe.prepare(_model("llama", tok), mixmoe.Config(**kw), tok)


def test_stage2_refuses_a_stage1_made_with_other_settings(tok, tmp_path):
    _, plan = mixmoe.prepare(_model("llama", tok), mixmoe.Config(n_freq=6), tok)
    plan.save_artifacts(tmp_path / "s1")
    with pytest.raises(ConfigError, match="n_freq"):
        mixmoe.prepare(_model("llama", tok), mixmoe.Config(stage=2, stage1_path=str(tmp_path / "s1"), n_freq=8), tok)


def test_unsupported_activation_is_refused(tok):
    model = _model("gpt2", tok)
    for block in model.transformer.h:
        block.mlp.act = torch.nn.ReLU()
    with pytest.raises(MethodError, match="activation"):
        mixmoe.prepare(model, mixmoe.Config(n_freq=4), tok)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown"):
        mixmoe.Config.from_dict({"num_lm_expert": 2})


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("mixmoe_*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_route_grouped_and_start_exact(path):
    method = yaml.safe_load(path.read_text())["method"]
    cfg = mixmoe.Config.from_dict({k: v for k, v in method.items() if k != "name"})
    assert cfg.routing == "grouped", f"{path.name}: joint routing breaks the stage-1 -> stage-2 hand-off"
    assert cfg.exact_upcycling(), f"{path.name}: the upcycled model must be the dense model"


def test_router_learning_rate_scale(tok):
    model, plan = mixmoe.prepare(
        _model("llama", tok), mixmoe.Config(n_freq=4, router_lr_scale=0.1, stage1_train="experts+router"), tok
    )
    opt = plan.build_optimizer(model, TRAIN)
    router = {id(p) for m in mixmoe.moe_layers(model) for p in (m.router.weight, m.fft_proj.weight)}
    by_lr = {}
    for g in opt.param_groups:
        for p in g["params"]:
            by_lr[id(p)] = g["lr"]
    assert all(by_lr[i] == pytest.approx(TRAIN.lr * 0.1) for i in router)
    assert {lr for i, lr in by_lr.items() if i not in router} == {TRAIN.lr}

"""Saved Mix-MoE models reload as themselves: ``import mmt`` then ``AutoModelForCausalLM.from_pretrained`` in a
fresh process gives bit-identical logits (experts, router, FFT projection, stage masks), for gated and GELU
families, after stage 1 and stage 2; anything that does not match is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_mixmoe import TEXTS, TRAIN, _model, _step, family_model

from mmt.errors import CheckpointError
from mmt.methods import mixmoe
from mmt.models import save_model

ROOT = Path(__file__).resolve().parents[2]
CASES = [("llama", 1), ("gemma3", 2), ("qwen2", 1), ("gpt2", 1), ("bloom", 2), ("xglm", 2)]


def _trained(arch, stage, tok, work: Path):
    """A Mix-MoE model after one training step of ``stage`` (stage 2 from a trained stage 1)."""
    torch.manual_seed(0)
    cfg1 = mixmoe.Config(n_freq=6, stage1_train="experts+router", layers=[1])
    model, plan = mixmoe.prepare(_model(arch, tok), cfg1, tok)
    _step(model, plan, plan.build_optimizer(model, TRAIN), tok, TEXTS["de"] + TEXTS["en"])
    if stage == 2:
        plan.save_artifacts(work / "s1")
        cfg2 = mixmoe.Config(stage=2, stage1_path=str(work / "s1"), n_freq=6, stage1_train="experts+router", layers=[1])
        model, plan = mixmoe.prepare(_model(arch, tok), cfg2, tok)
        _step(model, plan, plan.build_optimizer(model, TRAIN), tok, TEXTS["fr"] + TEXTS["en"])
    return model.eval()


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    """{case: directory} with the model, tokenizer and the inputs/logits to reproduce (ref.pt)."""
    root = tmp_path_factory.mktemp("mixmoe_saved")
    out = {}
    for arch, stage in CASES:
        try:
            model = _trained(arch, stage, tok, root / f"{arch}{stage}_work")
        except pytest.skip.Exception:
            continue
        d = save_model(model, tok, root / f"{arch}{stage}")
        enc = tok(TEXTS["de"] + TEXTS["fr"], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**enc).logits
        torch.save(
            {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "logits": logits}, d / "ref.pt"
        )
        out[(arch, stage)] = d
    return out


RELOAD = """
import json, sys, torch
import mmt
from transformers import AutoModelForCausalLM
result = {}
for d in sys.argv[1:]:
    m = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    r = torch.load(d + "/ref.pt")
    with torch.no_grad():
        got = m(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits
    result[d] = {"equal": bool(torch.equal(got, r["logits"])), "class": type(m).__name__}
print(json.dumps(result))
"""


def test_reload_in_a_fresh_process_is_bit_identical(saved):
    assert len(saved) >= 5
    dirs = [str(d) for d in saved.values()]
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, *dirs], capture_output=True, text=True, cwd=ROOT, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for (arch, stage), d in saved.items():
        r = result[str(d)]
        assert r["equal"], f"{arch} stage {stage}: logits differ after reload"
        assert r["class"].startswith("Mmt") and r["class"].endswith(("ForCausalLM", "LMHeadModel"))


def test_config_records_base_architecture_and_settings(saved):
    d = saved[("bloom", 2)]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "mmt" and cfg["arch"] == "mixmoe"
    assert cfg["base"]["model_type"] == "bloom"
    settings = cfg["settings"]
    assert settings["method"]["stage"] == 2 and settings["method"]["routing"] == "grouped"
    assert [s["layer"] for s in settings["layers"]] == [1]
    assert settings["layers"][0]["kind"] == "gelu" and settings["layers"][0]["act"] == "gelu_tanh"


def test_stage2_can_start_from_a_saved_stage1_model(saved, tok):
    from transformers import AutoModelForCausalLM

    d = saved[("llama", 1)]
    model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager")
    ref = torch.load(d / "ref.pt")
    cfg2 = mixmoe.Config(stage=2, n_freq=6, stage1_train="experts+router", layers=[1])
    model, plan = mixmoe.prepare(model, cfg2, tok)
    assert plan.sampler == "mixed" and all(bool(m.expert_mask.all()) for m in mixmoe.moe_layers(model))
    with torch.no_grad():
        got = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits
    torch.testing.assert_close(got, ref["logits"], rtol=0, atol=0)  # silent MT experts, grouped routing


def test_a_missing_expert_tensor_is_refused(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    src = saved[("gpt2", 1)]
    dst = tmp_path / "damaged"
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    weights = load_file(dst / "model.safetensors")
    router = next(k for k in weights if k.endswith("router.weight"))
    del weights[router]
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="router"):
        AutoModelForCausalLM.from_pretrained(dst)


def test_settings_that_do_not_fit_the_base_model_are_refused(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    src = saved[("llama", 1)]
    dst = tmp_path / "edited"
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dst / "config.json").read_text())
    cfg["settings"]["layers"][0]["kind"] = "gelu"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gelu"):
        AutoModelForCausalLM.from_pretrained(dst)
    cfg["settings"]["layers"][0]["kind"] = "glu"
    cfg["settings"]["format"] = 99
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="format"):
        AutoModelForCausalLM.from_pretrained(dst)


def test_dense_families_stay_plain(tok):
    """Only converted models are tagged: a dense model saves as its own architecture."""
    from mmt.arch import spec_of

    assert spec_of(family_model("llama", len(tok))) is None

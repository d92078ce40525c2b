import pytest
import torch

from mmt import methods
from mmt.methods.base import MethodConfig, StepInfo, TrainingPlan, count_parameters
from mmt.testing import tiny_model


def test_get_known_and_unknown():
    assert methods.get("mfti").__name__ == "mmt.methods.mfti"
    with pytest.raises(ValueError, match="known methods: mfti, landermt, mixmoe, directional"):
        methods.get("sft")


def test_plan_validation_and_describe(tok):
    with pytest.raises(ValueError, match="sampler"):
        TrainingPlan(method="x", sampler="random")
    m = tiny_model("llama", vocab=len(tok))
    plan = TrainingPlan(method="x", directions=[["de", "en"]], info={"note": "hi"}, model=m)
    assert plan.directions == [("de", "en")]
    text = plan.describe()
    trainable, total = count_parameters(m)
    assert f"{trainable:,} / {total:,}" in text and "de->en" in text and "note: hi" in text
    assert StepInfo(step=3).pair is None


def test_method_config_rejects_unknown():
    cfg = methods.get("mfti").Config
    assert isinstance(cfg(), MethodConfig)
    with pytest.raises(ValueError, match="unknown key"):
        cfg.from_dict({"lora_rank": 3})


def test_mfti_freeze_embeddings(tok):
    mfti = methods.get("mfti")
    m = tiny_model("gemma3", vocab=len(tok))  # tied embeddings
    model, plan = mfti.prepare(m, mfti.Config(freeze_embeddings=True))
    emb = model.get_input_embeddings().weight
    assert not emb.requires_grad
    trainable, total = count_parameters(model)
    assert trainable == total - emb.numel()
    assert plan.method == "mfti" and plan.sampler == "mixed"


def test_mfti_lora(tok, tmp_path):
    pytest.importorskip("peft")
    mfti = methods.get("mfti")
    m = tiny_model("llama", vocab=len(tok))
    model, plan = mfti.prepare(m, mfti.Config(lora=True, lora_r=4, directions=["de-en"]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert plan.directions == [("de", "en")]
    plan.save_artifacts(tmp_path)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

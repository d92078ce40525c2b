import pytest

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


def test_a_method_is_one_registration(monkeypatch, tok):
    """A new method needs its Config, its prepare and one register_method call: config files, the trainer's
    lookup and `mmt.methods.get` then find it."""
    from dataclasses import dataclass

    from mmt import registry
    from mmt.config import load_config

    @dataclass
    class Config(MethodConfig):
        scale: float = 1.0

    def prepare(model, config, tokenizer=None):
        return model, TrainingPlan(method="toy", info={"scale": config.scale})

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    registry.register_method("toy", module=__name__, config=Config, prepare=prepare)
    assert "toy" in methods.method_names() and methods.get("toy").__name__ == __name__
    cfg = load_config(None, ["method.scale=2"], method="toy")
    assert cfg.method == Config(scale=2.0)
    _, plan = methods.get_method("toy").prepare(tiny_model("llama", vocab=len(tok)), cfg.method)
    assert plan.info == {"scale": 2.0} and methods.get_method("toy").run is None
    assert methods.get_method("directional").run is not None  # several runs: its own entry point


def test_config_and_registry_are_leaves():
    """Reading a config imports no method, no torch: the import graph has no cycle through mmt.config."""
    import subprocess
    import sys

    code = (
        "import sys, mmt.config, mmt.registry; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('mmt.methods')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_optional_dependency_is_a_clean_error(monkeypatch, tok):
    import sys

    from mmt.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    mfti = methods.get("mfti")
    with pytest.raises(MissingDependencyError, match="'peft' is not installed.*method.lora=true.*pip install peft"):
        mfti.prepare(tiny_model("llama", vocab=len(tok)), mfti.Config(lora=True))

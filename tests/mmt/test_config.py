from pathlib import Path

import pytest

from mmt.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.lr=1e-5", "method.lora=true", "data.template=alma", "eval.directions=[de-en]"])
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.method_name == "mfti" and cfg.method.lora is True
    assert cfg.data.template == "alma" and cfg.eval.directions == ["de-en"]


def test_unknown_keys_name_file_and_key(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  lr: 1.0e-5\n  learning_rate: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"run\.yaml: train: unknown key 'learning_rate'"):
        load_config(f)
    f.write_text("method:\n  name: mfti\n  lora_rank: 8\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"run\.yaml: method: unknown key.*lora_rank"):
        load_config(f)
    f.write_text("trian:\n  lr: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown top-level key 'trian'"):
        load_config(f)
    f.write_text("data:\n  train:\n    - kind: parallel\n      dirs: [de-en]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"data\.train\[0\]: unknown key 'dirs'"):
        load_config(f)


def test_invalid_values(tmp_path):
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(None, ["train.mixed_precision=fp8"])
    with pytest.raises(ConfigError, match="not a multiple"):
        load_config(None, ["train.batch_size=10", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        load_config(None, ["method.name=nope"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_method_flag_overrides_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("method:\n  name: mfti\n  lora: true\n", encoding="utf-8")
    cfg = load_config(f, method="mfti")
    assert cfg.method.lora is True


@pytest.mark.parametrize("name", ["mfti_7b.yaml", "mfti_demo.yaml"])
def test_example_configs_load(name):
    cfg = load_config(REPO / "examples" / "configs" / name)
    assert cfg.method_name == "mfti"
    if name == "mfti_7b.yaml":  # the paper's defaults
        assert (cfg.train.lr, cfg.train.batch_size, cfg.train.max_steps, cfg.data.max_length, cfg.data.template) == (
            5e-6,
            80,
            2000,
            256,
            "T1",
        )
        assert cfg.train.lr_schedule == "constant" and cfg.train.warmup_steps == 0


def test_demo_defaults_match_example_config():
    from mmt.config import from_dict
    from mmt.demo import DEMO_CONFIG

    a = from_dict(DEMO_CONFIG).to_dict()
    b = load_config(REPO / "examples" / "configs" / "mfti_demo.yaml").to_dict()
    a["train"].pop("output_dir"), b["train"].pop("output_dir")
    assert a == b


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.method is not None and cfg.train.batch_size % cfg.train.micro_batch_size == 0


def test_yaml_values_are_coerced_to_field_types(tmp_path):
    """YAML 1.1 reads 1e-3 as a string and overrides arrive as text: both become the field's type."""
    f = tmp_path / "run.yaml"
    f.write_text(
        "train:\n  lr: 1e-3\n  max_steps: '10'\n  adam_betas: ['0.8', 0.9]\n  progress: 'false'\n"
        "eval:\n  max_sentences: null\n  template: T2\n"
        "data:\n  train:\n    - {kind: jsonl, path: x.jsonl, max_examples: '5'}\n"
        "method:\n  name: landermt\n  layers: ['1', 2]\n  specific_ratio: '0.2'\n",
        encoding="utf-8",
    )
    cfg = load_config(f, ["eval.num_beams=4", "method.scaled=yes"])
    assert cfg.train.lr == 1e-3 and type(cfg.train.lr) is float
    assert cfg.train.max_steps == 10 and type(cfg.train.max_steps) is int
    assert cfg.train.adam_betas == [0.8, 0.9] and cfg.train.progress is False
    assert cfg.eval.max_sentences is None and cfg.eval.num_beams == 4 and cfg.eval.template == "T2"
    assert cfg.data.train[0].max_examples == 5 and type(cfg.data.train[0].max_examples) is int
    assert cfg.method.layers == [1, 2] and cfg.method.specific_ratio == 0.2 and cfg.method.scaled is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=ten", "train.max_steps: expected an integer, got 'ten'"),
        ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
        ("train.progress=maybe", r"train.progress: expected a boolean \(true/false\), got 'maybe'"),
        ("train.max_steps=true", "train.max_steps: expected an integer, got True"),
        ("train.adam_betas=0.9", "train.adam_betas: expected a list of numbers, got 0.9"),
        ("train.adam_betas=[0.9,x]", r"train.adam_betas\[1\]: expected a number, got 'x'"),
        ("eval.max_sentences=lots", "eval.max_sentences: expected an integer or null, got 'lots'"),
        (
            "data.train=[{kind: jsonl, max_examples: many}]",
            r"data.train\[0\].max_examples: expected an integer or null",
        ),
        ("method.lora=2", "method.lora: expected a boolean"),
    ],
)
def test_impossible_values_name_key_value_and_type(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_check_keys_and_build_dataclass_are_shared():
    from dataclasses import dataclass

    from mmt.config import apply_overrides, build_dataclass, check_keys

    @dataclass
    class Merge:
        density: float = 0.5
        models: list[str] | None = None

    raw = apply_overrides({}, ["density=0.3", "models=[a,b]"], roots=None)
    assert build_dataclass(Merge, raw, "m.yaml") == Merge(0.3, ["a", "b"])
    with pytest.raises(ConfigError, match=r"m.yaml: unknown key 'densty'; known keys: \['density', 'models'\]"):
        build_dataclass(Merge, {"densty": 1}, "m.yaml")
    with pytest.raises(ConfigError, match="here: unknown key 'z'"):
        check_keys({"a", "b"}, {"a": 1, "z": 2}, "here")
    with pytest.raises(ConfigError, match="m.yaml.density: expected a number, got 'x'"):
        build_dataclass(Merge, {"density": "x"}, "m.yaml")


def test_overrides_from_args_round_trip():
    import argparse

    from mmt.config import overrides_from_args

    args = argparse.Namespace(
        overrides=["train.lr=1e-5"],
        model="runs/a b",
        directions=["de-en", "en-de"],
        shots=None,
        beams=4,
        flag=True,
        off=False,
    )
    ov = overrides_from_args(
        args,
        {
            "model": "model.name_or_path",
            "directions": "eval.directions",
            "shots": "eval.shots",
            "beams": "eval.num_beams",
            "off": "train.progress",
        },
    )
    assert ov[0] == "train.lr=1e-5" and len(ov) == 4
    cfg = load_config(None, ov)
    assert cfg.model.name_or_path == "runs/a b" and cfg.eval.directions == ["de-en", "en-de"]
    assert cfg.eval.num_beams == 4 and cfg.eval.shots == 0

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
        assert (cfg.train.lr, cfg.train.batch_size, cfg.train.max_steps, cfg.data.max_length, cfg.data.template) == \
            (5e-6, 80, 2000, 256, "T1")
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

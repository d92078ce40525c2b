"""Model cards: HF front matter, settings, data counts, steps, scores; written atomically, reread as YAML."""

from __future__ import annotations

import pytest

from mmt.cards import read_card_metadata, render_model_card, write_model_card, write_run_card
from mmt.config import load_config
from mmt.errors import ConfigError


def test_card_front_matter_and_body(tmp_path):
    path = write_model_card(
        tmp_path,
        base_model="google/gemma-3-270m",
        method="landermt",
        method_settings={"top_k_ratio": 0.05, "car": True, "layers": [1, 2]},
        data_counts={"de-en": 1200, "en-zh": 300},
        steps=500,
        scores={"de-en": {"bleu": 30.25, "chrf": 55.5}, "en-zh": {"bleu": 12.0}},
    )
    assert path == tmp_path / "README.md"
    meta = read_card_metadata(tmp_path)
    assert meta["base_model"] == "google/gemma-3-270m"
    assert meta["library_name"] == "transformers"
    assert meta["language"] == ["de", "en", "zh"]
    assert {"mmt", "translation", "landermt"} <= set(meta["tags"])
    text = path.read_text(encoding="utf-8")
    assert "- `top_k_ratio`: 0.05" in text and "- `layers`: 1, 2" in text
    assert "| de-en | 1200 |" in text and "| **total** | 1500 |" in text
    assert "optimizer steps: 500" in text
    assert "| de-en | 30.25 | 55.5 |" in text and "| en-zh | 12 | - |" in text
    assert not list(tmp_path.glob("*.tmp"))


def test_card_without_data_or_scores_says_so():
    text = render_model_card(base_model=None, method="ties")
    assert "base_model" not in text
    assert "Not recorded." in text and "Not evaluated." in text and "not recorded" in text


def test_card_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a folder"):
        write_model_card(tmp_path / "missing", base_model="x", method="mfti")
    with pytest.raises(ConfigError, match="method"):
        render_model_card(base_model="x", method="")


def test_run_card_counts_directions(tmp_path, tok, jsonl_data):
    from mmt.data import build_train_set

    cfg = load_config(None, ["method.name=mfti", "data.template=T3"])
    cfg.data.train = [_src(jsonl_data)]
    ts = build_train_set(cfg.data, tok)
    write_run_card(tmp_path, cfg, train_set=ts, steps=7)
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    for d in ("de-en", "en-de", "fr-en", "en-fr"):
        assert f"| {d} | 12 |" in text
    assert "`T3`" in text and "optimizer steps: 7" in text
    assert read_card_metadata(tmp_path)["base_model"] == cfg.model.name_or_path


def _src(path):
    from mmt.config import DataSource

    return DataSource(kind="jsonl", path=str(path))

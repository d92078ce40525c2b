"""Shared fixtures: a tiny tokenizer trained once per session, small data files, the data root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PAIRS = [
    ("de", "en", "Das Wetter ist heute schön.", "The weather is nice today."),
    ("en", "de", "Where is the train station?", "Wo ist der Bahnhof?"),
    ("fr", "en", "Les enfants jouent dans le jardin.", "The children are playing in the garden."),
    ("en", "fr", "I would like a cup of coffee.", "Je voudrais une tasse de café."),
    ("de", "en", "Ich lese ein Buch.", "I am reading a book."),
    ("en", "de", "The cat sleeps.", "Die Katze schläft."),
    ("fr", "en", "Il pleut encore.", "It is raining again."),
    ("en", "fr", "We are going home.", "Nous rentrons à la maison."),
]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    from mmt.testing import tiny_tokenizer

    d = tmp_path_factory.mktemp("tok")
    tiny_tokenizer(vocab_size=384).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="session")
def jsonl_data(tmp_path_factory) -> Path:
    """48 examples over 4 directions (the PAIRS repeated with numbered variations)."""
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(p, "w", encoding="utf-8") as fh:
        for i in range(6):
            for s, t, a, b in PAIRS:
                fh.write(json.dumps({"src_lang": s, "tgt_lang": t, "src": f"{a} {i}", "tgt": f"{b} {i}"}) + "\n")
    return p


@pytest.fixture(scope="session")
def shared_data() -> Path:
    from mmt.data import resolve_data_dir

    root = resolve_data_dir(None, required=False)
    if root is None or not (root / "flores200" / "devtest").is_dir():
        pytest.skip("shared data folder not available")
    return root

"""`auto` precision: bf16 where the device has native bf16, fp32 elsewhere; generation follows it."""

from __future__ import annotations

import pytest
import torch

from mmt import precision
from mmt.config import ConfigError, load_config


@pytest.fixture
def unpinned(monkeypatch):
    monkeypatch.delenv(precision.AUTO_ENV, raising=False)


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "no")])
def test_auto_follows_the_cpu(unpinned, monkeypatch, native, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert precision.resolve("auto", "cpu") == expected
    assert precision.resolve("no", "cpu") == "no" and precision.resolve("bf16", "cpu") == "bf16"


def test_environment_fixes_auto(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setenv(precision.AUTO_ENV, "no")
    assert precision.resolve("auto") == "no"
    monkeypatch.setenv(precision.AUTO_ENV, "fp8")
    with pytest.raises(ValueError, match=precision.AUTO_ENV):
        precision.resolve("auto")


def test_cpu_flag_is_read_from_cpuinfo():
    assert isinstance(precision.cpu_has_native_bf16(), bool)


def test_autocast_runs_fp32_linear_in_bf16(unpinned, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(3, 8)
    with precision.autocast("auto", lin):
        assert lin(x).dtype == torch.bfloat16
    with precision.autocast("no", lin):
        assert lin(x).dtype == torch.float32
    half = torch.nn.Linear(8, 8).to(torch.bfloat16)  # already half: left alone
    with precision.autocast("auto", half):
        assert not torch.is_autocast_enabled("cpu")


def test_config_defaults_and_validation():
    cfg = load_config(None, [])
    assert cfg.train.mixed_precision == "auto" and cfg.eval.precision == "auto"
    with pytest.raises(ConfigError, match="precision"):
        load_config(None, ["eval.precision=fp8"])


def test_generation_follows_the_precision(unpinned, monkeypatch, tok_dir):
    """`auto` on a bf16 CPU runs the fp32 model's maths in bf16 during generate; `no` keeps fp32."""
    from transformers import AutoTokenizer

    from mmt.evaluate import generate
    from mmt.testing import tiny_model

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = tiny_model("llama", vocab=len(tok))
    seen: list[torch.dtype] = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    prompts = ["Translate German to English: Hallo Welt\nEnglish:", "Translate: Guten Morgen\nEnglish:"]
    for p, dtype in (("auto", torch.bfloat16), ("no", torch.float32)):
        seen.clear()
        hyps = generate(model, tok, prompts, max_new_tokens=3, precision=p)
        assert len(hyps) == 2 and seen and set(seen) == {dtype}

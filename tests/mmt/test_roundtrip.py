"""Saving and reloading: changed architectures (mmt.arch), the reload guard, LoRA export and exact adapter merges,
hypothesis cutting, seen/unseen averages and best-checkpoint selection."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mmt import arch
from mmt.errors import CheckpointError
from mmt.models import find_ffn, load_model, save_model
from mmt.testing import tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _scale_build(model, settings):
    """A toy change: one extra Linear(d, 1) per chosen FFN that rescales its output."""
    for f in find_ffn(model):
        if f.layer in settings["layers"]:
            f.module.toy_scale = nn.Linear(f.d_model, 1)
            f.module.register_forward_hook(lambda m, args, out: out * (1 + m.toy_scale(args[0])))


arch.register_arch("test_toy_scale", _scale_build)


def _toy(arch_name="llama"):
    m = tiny_model(arch_name, vocab=128, hidden=32, intermediate=48, seed=0)
    _scale_build(m, {"layers": [1]})
    with torch.no_grad():
        find_ffn(m)[1].module.toy_scale.weight.normal_()
    return m


IDS = torch.tensor([[1, 5, 9, 30, 7, 11]])


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_changed_architecture_reloads_through_auto_classes(family, tmp_path, tok):
    from transformers import AutoModelForCausalLM

    m = _toy(family).eval()
    arch.mark(m, "test_toy_scale", {"layers": [1]})
    ref = m(input_ids=IDS).logits
    m.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "mmt" and saved["arch"] == "test_toy_scale"
    assert saved["base"]["model_type"] == m.config.model_type and saved["settings"] == {"layers": [1]}
    back = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert isinstance(back, type(m).__mro__[1]) and arch.spec_of(back)["arch"] == "test_toy_scale"
    assert torch.allclose(back(input_ids=IDS).logits, ref, atol=1e-6)
    exact, _ = load_model(name_or_path=str(tmp_path), verbose=False)  # mmt's loader: bit for bit
    assert torch.equal(exact.eval()(input_ids=IDS).logits, ref)


def test_missing_tensor_is_an_error_not_a_random_init(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    m = _toy()
    arch.mark(m, "test_toy_scale", {"layers": [1]})
    m.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = {k: v for k, v in load_file(str(f)).items() if "toy_scale" not in k}
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing keys.*toy_scale"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_config_naming_code_outside_mmt_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    m = _toy()
    arch.mark(m, "test_toy_scale", {"layers": [1]})
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "arch": "elsewhere", "module": "os"}))
    with pytest.raises(CheckpointError, match="only mmt's own modules"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "arch": "not_there", "module": "mmt.models"}))
    with pytest.raises(CheckpointError, match="unknown changed architecture 'not_there'"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_save_refuses_an_untagged_changed_model(tmp_path, tok):
    m = _toy()  # changed but not marked: plain loading would drop toy_scale silently
    with pytest.raises(CheckpointError, match="would not reload as itself.*toy_scale"):
        save_model(m, tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_lora_model_saves_merged_and_loads_plainly(tmp_path, tok):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mmt.export import merge_lora

    m = get_peft_model(
        tiny_model("llama", vocab=len(tok), hidden=32, intermediate=48),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    save_model(m, tok, tmp_path / "final")
    assert not (tmp_path / "final" / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "final", attn_implementation="eager").eval()
    merged = merge_lora(m).eval()
    m.eval()
    assert torch.allclose(plain(input_ids=IDS).logits, merged(input_ids=IDS).logits, atol=1e-6)
    assert torch.allclose(merged(input_ids=IDS).logits, m(input_ids=IDS).logits, atol=1e-5)
    assert hasattr(m, "peft_config")  # the trained peft model itself is untouched


def test_reload_in_a_fresh_process_is_bit_identical(tmp_path, tok):
    """A changed architecture of mmt's own (CAR) reloads in a new Python process to the same logits."""
    from mmt.methods.landermt import car

    m = tiny_model("bloom", vocab=len(tok), hidden=32, layers=2)
    d_ff = find_ffn(m)[1].d_ff
    owner = torch.arange(d_ff) % 4 - 1
    settings = {
        "languages": ["de", "en", "fr"],
        "layers": [1],
        "specific_gate": "one_minus",
        "other_languages_off": True,
    }
    car.attach(m, {1: owner}, settings)
    arch.mark(m, car.ARCH, settings)
    with torch.no_grad():
        find_ffn(m)[1].module.car_gate.weight.normal_()
    save_model(m, tok, tmp_path / "m")
    m.eval()
    arch.set_direction(m, "de", "en")
    ref = m(input_ids=IDS).logits
    code = (
        "import sys, torch; from mmt.models import load_model; from mmt.arch import set_direction;"
        f"m, _ = load_model(name_or_path={str(tmp_path / 'm')!r}, verbose=False); m.eval();"
        "set_direction(m, 'de', 'en');"
        f"torch.save(m(input_ids=torch.tensor({IDS.tolist()})).logits, {str(tmp_path / 'l.pt')!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    assert torch.equal(torch.load(tmp_path / "l.pt"), ref)


def _lora_adapter(tmp_path, tok, seed, name):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    m = get_peft_model(
        tiny_model("llama", vocab=len(tok), hidden=32, intermediate=48),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False),
    )
    m.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_adapter_merge_is_the_exact_ties_of_dense_updates(tmp_path, tok):
    from mmt.export import _lora_deltas, merge_adapters_into
    from mmt.merge import tensor_seed
    from mmt_kernels import merge as kmerge

    paths = [_lora_adapter(tmp_path, tok, s, f"a{s}") for s in (1, 2)]
    base = tiny_model("llama", vocab=len(tok), hidden=32, intermediate=48)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    summary = merge_adapters_into(base, paths, method="ties", density=0.3)
    assert summary["truncation"] is None and summary["tensors"] == 4
    deltas = [_lora_deltas(p) for p in paths]
    for name, p in base.named_parameters():
        if name in deltas[0]:
            want = before[name] + kmerge.merge(
                [d[name] for d in deltas],
                None,
                method="ties",
                density=0.3,
                seed=tensor_seed(0, name),
                backend="reference",
            )
            assert torch.allclose(p, want, atol=1e-6), name
        else:
            assert torch.equal(p, before[name]), name


def test_postprocess_cuts_at_the_templates_next_field():
    from mmt.evaluate import postprocess

    assert postprocess(" Hallo Welt. [Korean]: 안녕하세요", "T1") == "Hallo Welt."
    assert postprocess(" Hallo Welt. Translation: [German]: x", "T1") == "Hallo Welt."
    assert postprocess(" Hallo Welt.\nGerman: x", "alma") == "Hallo Welt."
    assert postprocess(" Hallo Welt. Translate from [German] to", "T3") == "Hallo Welt."
    assert postprocess(" Hallo [Welt] ist da", "T1") == "Hallo [Welt] ist da"  # brackets without a colon stay
    assert postprocess(" Hallo Welt. [Korean]: x") == "Hallo Welt. [Korean]: x"  # no template: the first line


def test_report_splits_seen_and_unseen():
    from mmt.evaluate import DirectionResult, EvalReport

    rs = [
        DirectionResult("de-en", 2, 10.0, 40.0, seen=True),
        DirectionResult("fr-de", 2, 2.0, 20.0, seen=False),
        DirectionResult("en-de", 2, 6.0, 30.0, seen=True),
    ]
    av = EvalReport("x", rs).averages()
    assert av["seen"]["bleu"] == 8.0 and av["unseen"]["bleu"] == 2.0 and av["all"]["bleu"] == 6.0
    assert "avg unseen" in EvalReport("x", rs).markdown()


@pytest.fixture(scope="module")
def flores_root(tmp_path_factory):
    import gzip

    sents = {
        "deu_Latn": ["Das Wetter ist schön.", "Ich lese ein Buch.", "Die Katze schläft."],
        "eng_Latn": ["The weather is nice.", "I am reading a book.", "The cat sleeps."],
    }
    root = tmp_path_factory.mktemp("flores_root")
    for split in ("dev", "devtest"):
        (root / "flores200" / split).mkdir(parents=True)
        for code, lines in sents.items():
            with gzip.open(root / "flores200" / split / f"{code}.txt.gz", "wt", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")
    with open(root / "train.jsonl", "w", encoding="utf-8") as fh:
        for a, b in zip(sents["deu_Latn"], sents["eng_Latn"]):
            fh.write(json.dumps({"src_lang": "de", "tgt_lang": "en", "src": a, "tgt": b}) + "\n")
    return root


def test_best_checkpoint_on_dev_and_checkpoints_evaluate(flores_root, tok, tmp_path):
    from mmt import train
    from mmt.cli import main as cli_main
    from mmt.config import load_config
    from mmt.evaluate import select_best_checkpoint

    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"data.train=[{{kind: jsonl, path: {flores_root / 'train.jsonl'}}}]",
            f"data.data_dir={flores_root}",
            f"train.output_dir={out}",
            "train.max_steps=3",
            "train.batch_size=2",
            "train.micro_batch_size=2",
            "train.save_every=1",
            "train.keep_last=5",
            "train.lr=1e-2",
            "train.progress=false",
            "eval.directions=[de-en]",
            "eval.max_new_tokens=4",
            "eval.off_target=false",
            "method.select_best=true",
            "method.directions=[de-en]",
        ],
        method="mfti",
    )
    train.run(
        cfg, model=tiny_model("llama", vocab=len(tok), hidden=32, intermediate=48), tokenizer=tok, print_plan=False
    )
    sel = select_best_checkpoint(cfg, metric="chrf", split="flores200/dev", log=None)
    assert set(sel["scores"]) == {"checkpoint-1", "checkpoint-2", "checkpoint-3", "final"}
    assert sel["best"] == max(sel["scores"], key=lambda k: (sel["scores"][k], k == "final"))
    assert (out / "best" / "config.json").is_file() and not (out / "best" / "optimizer.pt").exists()
    assert json.loads((out / "selection.json").read_text())["best"] == sel["best"]
    with pytest.raises(ValueError, match="test set"):
        select_best_checkpoint(cfg, split="flores200/devtest", log=None)
    rc = cli_main(
        [
            "eval",
            "--model",
            str(out / "checkpoints" / "checkpoint-1"),
            "--directions",
            "de-en",
            "--output-dir",
            str(tmp_path / "ev"),
            "--label",
            "ck",
            f"data.data_dir={flores_root}",
            "eval.max_new_tokens=4",
            "eval.off_target=false",
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "ev" / "ck.json").read_text())
    assert report["settings"]["seen_directions"] == ["de-en"] and report["results"][0]["seen"] is True

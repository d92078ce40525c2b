"""mmt merge's inputs and outputs: per-tensor settings on checkpoints, mergekit configs, dtypes, tokenizer and
chat template, the model card and saved config; every output reloaded in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmt import merge as mm
from mmt.cli import main
from mmt.merge import methods as mt
from mmt.merge.plan import tensor_settings

try:
    from mmt.testing import tiny_model
except ImportError:
    from mmt.testing import tiny_model

ARCH = dict(vocab=384, hidden=32, layers=3, intermediate=64)
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def _state(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tok_dir):
    """A 3-layer llama base with a tokenizer and three fine-tuned variants (ft0's tokenizer has a chat template)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("mk")
    paths = {}
    for i, name in enumerate(["base", "ft0", "ft1", "ft2"]):
        m = tiny_model("llama", **ARCH)
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        m.save_pretrained(root / name, safe_serialization=True, max_shard_size="60KB")
        tok = AutoTokenizer.from_pretrained(tok_dir)
        if name == "ft0":
            tok.chat_template = TEMPLATE
        tok.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def _inputs(ckpts, name, models=("ft0", "ft1", "ft2")):
    return [_state(ckpts[m])[name] for m in models], _state(ckpts["base"])[name]


def _expected(cfg, ckpts, name, models=("ft0", "ft1", "ft2")):
    xs, b = _inputs(ckpts, name, models)
    s = tensor_settings(cfg, name, ARCH["layers"])
    return mt.merge_one(cfg, name, xs, b, s, mm.tensor_seed(cfg.seed, name), None).to(b.dtype)


def _reload_in_fresh_process(outs: list[Path], tmp_path: Path) -> list[dict[str, torch.Tensor]]:
    """Load each output with AutoModelForCausalLM in a new interpreter; return what that model holds."""
    code = """
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
for i, out in enumerate(sys.argv[2:]):
    m = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    assert torch.isfinite(m(torch.tensor([[1, 5, 9]])).logits).all()
    save_file(sd, str(Path(sys.argv[1]) / f"reloaded{i}.safetensors"))
"""
    subprocess.run([sys.executable, "-c", code, str(tmp_path), *map(str, outs)], check=True, timeout=300)
    return [load_file(str(tmp_path / f"reloaded{i}.safetensors")) for i in range(len(outs))]


NEW_METHODS = {
    "slerp": dict(models=["ft0"], t=[0.2, 0.8]),
    "model_stock": dict(),
    "della": dict(density=0.5, epsilon=0.2, seed=3),
    "della_linear": dict(density=0.5, epsilon=0.1, lam=0.5),
    "breadcrumbs": dict(density=0.4, gamma=0.05),
    "breadcrumbs_ties": dict(density=0.4, gamma=0.05, tie_break="exact_k"),
    "ties": dict(density=[{"filter": "mlp", "value": [0.2, 0.6]}, {"value": 0.3}], tie_break="exact_k", lam=[1.0, 0.6]),
}


def test_new_methods_reload_in_a_fresh_process_to_the_expected_tensors(ckpts, tmp_path):
    outs, cfgs = [], []
    for method, kw in NEW_METHODS.items():
        raw = dict(
            method=method,
            base_model=str(ckpts["base"]),
            models=[str(ckpts[m]) for m in ("ft0", "ft1", "ft2")],
            output=str(tmp_path / method),
        )
        raw.update(kw)
        raw["models"] = [str(ckpts[m]) for m in raw["models"]] if method == "slerp" else raw["models"]
        cfg = mm.MergeConfig.from_dict(raw)
        mm.merge_checkpoints(cfg, progress=False)
        outs.append(tmp_path / method)
        cfgs.append(cfg)
    reloaded = _reload_in_fresh_process(outs, tmp_path)
    for (method, kw), cfg, sd in zip(NEW_METHODS.items(), cfgs, reloaded):
        models = kw.get("models", ("ft0", "ft1", "ft2"))
        for name in (
            "model.layers.2.mlp.down_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.norm.weight",
        ):
            want = _expected(cfg, ckpts, name, models)
            assert torch.equal(sd[name], want), (method, name)
        base = _state(ckpts["base"])["model.layers.2.mlp.down_proj.weight"]
        assert not torch.equal(sd["model.layers.2.mlp.down_proj.weight"], base), method


def test_filters_and_gradients_reach_each_tensor(ckpts, tmp_path):
    from mmt_kernels import merge as kmerge

    cfg = mm.MergeConfig.from_dict(
        dict(
            method="ties",
            base_model=str(ckpts["base"]),
            output=str(tmp_path / "o"),
            models=[
                {"path": str(ckpts["ft0"]), "density": [{"filter": "self_attn", "value": 0.9}]},
                str(ckpts["ft1"]),
                str(ckpts["ft2"]),
            ],
            density=[{"filter": "mlp", "value": [0.1, 0.5]}, {"value": 0.3}],
            lam=[1.0, 0.5],
        )
    )
    mm.merge_checkpoints(cfg, progress=False)
    got = _state(tmp_path / "o")
    # layer 1 of 3 sits half-way: mlp density 0.3 (ft0 too: its own filter does not match), lam 0.75
    name = "model.layers.1.mlp.up_proj.weight"
    xs, b = _inputs(ckpts, name)
    want = kmerge.merge(xs, b, method="ties", density=[0.3, 0.3, 0.3], lam=0.75, backend="reference")
    assert torch.equal(got[name], want)
    name = "model.layers.2.self_attn.v_proj.weight"  # ft0's own filter; lam 0.5 at the last layer
    xs, b = _inputs(ckpts, name)
    want = kmerge.merge(xs, b, method="ties", density=[0.9, 0.3, 0.3], lam=0.5, backend="reference")
    assert torch.equal(got[name], want)


def _mergekit_yaml(ckpts, path: Path, **extra) -> Path:
    cfg = {
        "merge_method": "ties",
        "base_model": str(ckpts["base"]),
        "models": [
            {"model": str(ckpts["base"])},
            {"model": str(ckpts["ft0"]), "parameters": {"weight": 1.0, "density": 0.3}},
            {"model": str(ckpts["ft1"]), "parameters": {"weight": 1.0}},
        ],
        "parameters": {"density": [{"filter": "mlp", "value": 0.5}, {"value": 0.2}], "normalize": True},
        "dtype": "float32",
        "out_dtype": "bfloat16",
        "tokenizer_source": "base",
    }
    cfg.update(extra)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_mergekit_config_read_as_it_is(ckpts, tmp_path, capsys):
    src = _mergekit_yaml(ckpts, tmp_path / "mk.yml")
    assert main(["merge", str(src), "tie_break=exact_k", "--output", str(tmp_path / "mk"), "--no-progress"]) == 0
    cfg = mm.load_merge_config(src, ["tie_break=exact_k"])
    assert cfg.semantics == "mergekit" and cfg.base_model == str(ckpts["base"])
    assert [s.path for s in cfg.models] == [str(ckpts["ft0"]), str(ckpts["ft1"])]  # the base is not a model
    assert cfg.dtype == "float32" and cfg.out_dtype == "bfloat16"
    got = _state(tmp_path / "mk")
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.2.self_attn.o_proj.weight"):
        want = _expected(cfg, ckpts, name, ("ft0", "ft1")).to(torch.bfloat16)
        assert torch.equal(got[name], want), name
    # ft0's own density wins over the global filters; ft1 takes the global ones
    s = tensor_settings(cfg, "model.layers.0.mlp.gate_proj.weight", 3)
    assert s.densities == [0.3, 0.5]
    assert json.loads((tmp_path / "mk" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    (reloaded,) = _reload_in_fresh_process([tmp_path / "mk"], tmp_path)
    assert all(torch.equal(reloaded[k].to(v.dtype), v) for k, v in got.items())
    # slices taking every layer are the same merge
    sl = {
        "slices": [{"sources": [{"model": str(ckpts[m]), "layer_range": [0, 3]} for m in ("base", "ft0", "ft1")]}],
        "models": None,
    }
    src2 = _mergekit_yaml(ckpts, tmp_path / "sl.yml", **sl)
    raw = yaml.safe_load(src2.read_text())
    raw.pop("models")
    raw["slices"][0]["sources"][1]["parameters"] = {"weight": 1.0, "density": 0.3}
    src2.write_text(yaml.safe_dump(raw))
    cfg2 = mm.load_merge_config(src2)
    assert [s.path for s in cfg2.models] == [str(ckpts["ft0"]), str(ckpts["ft1"])] and cfg2.models[0].density == 0.3


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"tokenizer_source": "union"}, "tokenizer_source: union"),
        ({"parameters": {"densty": 0.2}}, r"parameter\(s\) \['densty'\] are not supported"),
        ({"merge_method": "arcee_fusion"}, "merge_method 'arcee_fusion' is not supported"),
        ({"base_model": "org/model+lora"}, r"applies a LoRA to a model"),
        (
            {
                "models": None,
                "slices": [
                    {"sources": [{"model": "m", "layer_range": [0, 2]}]},
                    {"sources": [{"model": "m", "layer_range": [2, 3]}]},
                ],
            },
            r"slices\[0\]: base_model .* is not among the slice's sources",
        ),
        ({"tokenizer": {"source": "union"}}, "tokenizer merging"),
    ],
)
def test_mergekit_config_errors_name_the_problem(ckpts, tmp_path, extra, match):
    src = _mergekit_yaml(ckpts, tmp_path / "bad.yml", **extra)
    raw = yaml.safe_load(src.read_text())
    if raw.get("models") is None:
        raw.pop("models", None)
    src.write_text(yaml.safe_dump(raw))
    with pytest.raises(mm.MergeError, match=match):
        mm.load_merge_config(src)


def test_mergekit_slice_that_cuts_layers_is_a_slice(ckpts, tmp_path):
    raw = {
        "merge_method": "slerp",
        "base_model": str(ckpts["base"]),
        "parameters": {"t": 0.5},
        "slices": [{"sources": [{"model": str(ckpts[m]), "layer_range": [0, 2]} for m in ("base", "ft0")]}],
    }
    cfg = mm.MergeConfig.from_dict(raw)  # two of the three layers: a slice (see test_merge_slices.py)
    assert not cfg.models and [s.layer_range for s in cfg.slices[0].sources] == [[0, 2], [0, 2]]
    raw["slices"][0]["sources"] = [{"model": str(ckpts[m]), "layer_range": [0, 3]} for m in ("base", "ft0")]
    cfg = mm.MergeConfig.from_dict(raw)
    assert cfg.method == "slerp" and [s.path for s in cfg.models] == [str(ckpts["ft0"])] and cfg.t == 0.5


def test_compute_and_output_dtypes(ckpts, tmp_path):
    raw = dict(
        method="task_arithmetic",
        base_model=str(ckpts["base"]),
        models=[str(ckpts["ft0"]), str(ckpts["ft1"])],
        lam=0.5,
        output=str(tmp_path / "a"),
        dtype="float32",
        out_dtype="bfloat16",
    )
    cfg = mm.MergeConfig.from_dict(raw)
    mm.merge_checkpoints(cfg, progress=False)
    got = _state(tmp_path / "a")
    name = "model.layers.1.mlp.down_proj.weight"
    assert got[name].dtype == torch.bfloat16
    assert torch.equal(got[name], _expected(cfg, ckpts, name, ("ft0", "ft1")).to(torch.bfloat16))
    mm.merge_checkpoints(
        mm.MergeConfig.from_dict({**raw, "dtype": "bfloat16", "out_dtype": "float32", "output": str(tmp_path / "b")}),
        progress=False,
    )
    b = _state(tmp_path / "b")[name]
    assert b.dtype == torch.float32 and torch.equal(b, b.bfloat16().float())  # computed from bf16 inputs
    with pytest.raises(mm.MergeError, match="out_dtype must be one of"):
        mm.MergeConfig.from_dict({**raw, "out_dtype": "int8"})


def test_tokenizer_source_chat_template_card_and_saved_config(ckpts, tmp_path):
    from transformers import AutoTokenizer

    raw = dict(
        method="ties",
        base_model=str(ckpts["base"]),
        models=[str(ckpts["ft0"]), str(ckpts["ft1"])],
        density=0.4,
        output=str(tmp_path / "t"),
    )
    mm.merge_checkpoints(mm.MergeConfig.from_dict({**raw, "tokenizer_source": str(ckpts["ft0"])}), progress=False)
    assert AutoTokenizer.from_pretrained(tmp_path / "t").chat_template == TEMPLATE
    mm.merge_checkpoints(mm.MergeConfig.from_dict({**raw, "output": str(tmp_path / "u")}), progress=False)
    assert AutoTokenizer.from_pretrained(tmp_path / "u").chat_template is None  # the base's tokenizer
    other = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    mm.merge_checkpoints(
        mm.MergeConfig.from_dict(
            {**raw, "output": str(tmp_path / "v"), "chat_template": other, "tokenizer_source": str(ckpts["ft0"])}
        ),
        progress=False,
    )
    tok = AutoTokenizer.from_pretrained(tmp_path / "v")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi|"
    with pytest.raises(mm.MergeError, match="tokenizer_source .* has no tokenizer files"):
        mm.merge_checkpoints(
            mm.MergeConfig.from_dict({**raw, "output": str(tmp_path / "w"), "tokenizer_source": str(tmp_path)}),
            progress=False,
        )
    with pytest.raises(mm.MergeError, match="chat_template 'chatml' is neither"):
        mm.merge_checkpoints(
            mm.MergeConfig.from_dict({**raw, "output": str(tmp_path / "w"), "chat_template": "chatml"}), progress=False
        )
    # model card: HF front matter, method with its paper, the inputs, the settings, the config
    card = (tmp_path / "u" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == str(ckpts["base"]) and "ties" in front["tags"]
    assert "arXiv:2306.01708" in card and f"| `{ckpts['ft1']}` | 1.0 | 0.4 |" in card and "- density: 0.4" in card
    # the saved config repeats the merge exactly
    saved = tmp_path / "u" / "merge_config.yaml"
    assert main(["merge", str(saved), "--output", str(tmp_path / "again"), "--no-progress"]) == 0
    first, again = _state(tmp_path / "u"), _state(tmp_path / "again")
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_lora_merge_writes_card_and_config(tmp_path):
    from peft import LoraConfig, get_peft_model

    paths = []
    for i in range(2):
        m = get_peft_model(tiny_model("llama", **ARCH), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
        m.save_pretrained(tmp_path / f"a{i}")
        paths.append(str(tmp_path / f"a{i}"))
    mm.run_merge(
        mm.MergeConfig.from_dict(dict(method="ties", adapters=paths, density=0.5, output=str(tmp_path / "o"))),
        progress=False,
    )
    card = (tmp_path / "o" / "README.md").read_text()
    assert "library_name: peft" in card and "LoRA merge: svd" in card
    assert mm.load_merge_config(tmp_path / "o" / "merge_config.yaml").adapters[0].path == paths[0]

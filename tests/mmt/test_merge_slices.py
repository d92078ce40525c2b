"""mmt merge's slices: layer ranges stacked (passthrough frankenmerges) or merged per slice, read from mergekit YAML."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmt import merge as mm
from mmt.testing import tiny_model
from mmt_kernels import merge as kmerge

_LAYER = re.compile(r"\.layers\.(\d+)\.")
ARCH = dict(vocab=64, hidden=32, intermediate=64)
TOKENS = [[1, 5, 9, 3, 17, 22, 40, 8]]


def _state(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _save(arch: str, path: Path, layers: int, seed: int) -> Path:
    tiny_model(arch, layers=layers, seed=seed, **ARCH).save_pretrained(path, safe_serialization=True)
    return path


def _layer(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _renumber(name: str, i: int) -> str:
    return _LAYER.sub(f".layers.{i}.", name, count=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """7-layer Llama A and B (Gemma 3 needs 6 layers for one full-attention layer) and a 7-layer Gemma 3."""
    root = tmp_path_factory.mktemp("slices")
    return {
        "A": _save("llama", root / "A", 7, 0),
        "B": _save("llama", root / "B", 7, 1),
        "G": _save("gemma3", root / "G", 7, 2),
    }


def _run_cli(cfg: dict, root: Path, capsys) -> tuple[int, str]:
    from mmt.cli import main

    src = root / "merge.yml"
    src.write_text(yaml.safe_dump(cfg))
    rc = main(["merge", str(src), "--no-progress"])
    return rc, capsys.readouterr().err


def _logits_in_fresh_process(out: Path, root: Path) -> torch.Tensor:
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True, attn_implementation="eager").eval()
with torch.no_grad():
    torch.save(m(torch.tensor({TOKENS})).logits, sys.argv[2])
"""
    subprocess.run([sys.executable, "-c", code, str(out), str(root / "logits.pt")], check=True, timeout=300)
    return torch.load(root / "logits.pt")


# (arch, slices as (model, start, end)): a frankenmerge of one model, and one of two (embeddings from the first
# slice's model, final norm and lm_head from the last's, as mergekit)
FRANKEN = [
    ("gemma3", [("G", 0, 4), ("G", 2, 7)]),
    ("llama", [("A", 0, 3), ("B", 1, 5), ("A", 6, 7)]),
]


@pytest.mark.slow
@pytest.mark.parametrize("arch,slices", FRANKEN, ids=[f[0] for f in FRANKEN])
def test_passthrough_frankenmerge_stacks_layers_and_runs(models, tmp_path, arch, slices):
    out = tmp_path / "out"
    cfg = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(models[m]), "layer_range": [a, b]}]} for m, a, b in slices],
        "output": str(out),
    }
    src = tmp_path / "franken.yml"
    src.write_text(yaml.safe_dump(cfg))
    report = mm.run_merge(mm.load_merge_config(src), progress=False)
    # by hand: output layer j is layer `index` of `model`
    stack = [(m, i) for m, a, b in slices for i in range(a, b)]
    first, last = _state(models[slices[0][0]]), _state(models[slices[-1][0]])
    states = {m: _state(models[m]) for m, _, _ in slices}
    want = {n: t for n, t in first.items() if _layer(n) is None and "embed" in n}
    want.update({n: t for n, t in last.items() if _layer(n) is None and "embed" not in n})
    for j, (m, i) in enumerate(stack):
        want.update({_renumber(n, j): t for n, t in states[m].items() if _layer(n) == i})
    got = _state(out)
    assert got.keys() == want.keys()
    for n, t in want.items():
        assert torch.equal(got[n], t), n
    assert report.tensors_copied == len(want)
    # config.json: the layer count, and per-layer attention types taken from each source layer
    conf = json.loads((out / "config.json").read_text())
    src_conf = {m: json.loads((models[m] / "config.json").read_text()) for m, _, _ in slices}
    assert conf["num_hidden_layers"] == len(stack)
    if arch == "gemma3":
        assert conf["layer_types"] == [src_conf[m]["layer_types"][i] for m, i in stack]
        assert conf["layer_types"].count("full_attention") == 1
    # the same model assembled by hand in this process gives the logits of the output loaded in a fresh one
    from transformers import AutoConfig, AutoModelForCausalLM

    hand_conf = AutoConfig.from_pretrained(models[slices[0][0]])
    hand_conf.num_hidden_layers = len(stack)
    if arch == "gemma3":
        hand_conf.layer_types = [src_conf[m]["layer_types"][i] for m, i in stack]
    hand_conf._attn_implementation = "eager"
    hand = AutoModelForCausalLM.from_config(hand_conf).eval()
    missing, unexpected = hand.load_state_dict(want, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)  # lm_head tied to the embeddings
    with torch.no_grad():
        expected = hand(torch.tensor(TOKENS)).logits
    torch.testing.assert_close(_logits_in_fresh_process(out, tmp_path), expected, rtol=0, atol=0)
    # the written merge_config.yaml repeats the merge
    again = mm.load_merge_config(out / "merge_config.yaml", [f"output={tmp_path / 'again'}"])
    mm.run_merge(again, progress=False)
    assert all(torch.equal(t, got[n]) for n, t in _state(tmp_path / "again").items())


def test_passthrough_scale_filters(models, tmp_path):
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(models["A"]), "layer_range": [0, 2]}]},
            {
                "sources": [{"model": str(models["A"]), "layer_range": [1, 3]}],
                "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.5}]},
            },
        ],
        "output": str(tmp_path / "out"),
    }
    mm.run_merge(mm.MergeConfig.from_dict(cfg), progress=False)
    got, a = _state(tmp_path / "out"), _state(models["A"])
    assert not got["model.layers.2.self_attn.o_proj.weight"].any()  # layer 1 of A, scaled by 0
    assert torch.equal(got["model.layers.3.mlp.down_proj.weight"], a["model.layers.2.mlp.down_proj.weight"] * 0.5)
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], a["model.layers.2.mlp.up_proj.weight"])  # no filter
    assert torch.equal(got["model.layers.1.self_attn.o_proj.weight"], a["model.layers.1.self_attn.o_proj.weight"])


@pytest.mark.parametrize("method", ["ties", "linear"])
def test_two_slice_merge_equals_per_layer_merges_by_hand(models, tmp_path, method):
    """Slice 0 merges layers 0-2 of B into A's 0-2; slice 1 layers 4-6 of B into A's 2-4, with a density gradient
    over the slice (t = 0, 0.5, 1 on its three layers) and a per-source weight."""
    base, ft = str(models["A"]), str(models["B"])
    slices = [
        {"sources": [{"path": base, "layer_range": [0, 3]}, {"path": ft, "layer_range": [0, 3]}], "density": 0.5},
        {
            "sources": [{"path": base, "layer_range": [2, 5]}, {"path": ft, "layer_range": [4, 7], "weight": 0.5}],
            "density": [0.2, 0.6],
        },
    ]
    cfg = mm.MergeConfig.from_dict(
        dict(method=method, base_model=base, slices=slices, lam=0.8, output=str(tmp_path / "out"))
    )
    mm.merge_checkpoints(cfg, progress=False)
    got, a, b = _state(tmp_path / "out"), _state(models["A"]), _state(models["B"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6

    def by_hand(out_name, a_name, b_name, weights, density):
        if method == "linear":  # no base: both sources are inputs (the base's weight is 1)
            return kmerge.merge([a[a_name], b[b_name]], None, method="linear", weights=[1.0] + weights)
        seed = mm.tensor_seed(0, out_name)
        return kmerge.merge(
            [b[b_name]], a[a_name], method="ties", weights=weights, density=[density], lam=0.8, seed=seed,
            backend="reference",
        )  # fmt: skip

    checked = 0
    for j in range(6):
        s, r = (0, j) if j < 3 else (1, j - 3)
        a_layer, b_layer = (r, r) if s == 0 else (2 + r, 4 + r)
        density = 0.5 if s == 0 else 0.2 + 0.4 * (r / 2)
        weight = 1.0 if s == 0 else 0.5
        for n in [n for n in a if _layer(n) == a_layer]:
            out_name = _renumber(n, j)
            want = by_hand(out_name, n, _renumber(n, b_layer), [weight], density)
            torch.testing.assert_close(got[out_name], want, rtol=0, atol=0, msg=out_name)
            checked += 1
    for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):  # first / last slice, t = 0
        weight, density = (1.0, 0.5) if "embed" in n else (0.5, 0.2)
        torch.testing.assert_close(got[n], by_hand(n, n, n, [weight], density), rtol=0, atol=0, msg=n)
    assert checked == 6 * 9 and len(got) == checked + 3


def _bad(models, **change):
    a = str(models["A"])
    cfg = {
        "merge_method": "ties",
        "base_model": a,
        "parameters": {"weight": 1.0, "density": 0.5},
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 4]}, {"model": str(models["B"]), "layer_range": [0, 4]}]},
            {"sources": [{"model": a, "layer_range": [4, 7]}, {"model": str(models["B"]), "layer_range": [2, 5]}]},
        ],
    }
    for path, value in change.items():
        node = cfg
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if isinstance(node, list):
            node[int(keys[-1])] = value
        else:
            node[keys[-1]] = value
    return cfg


BAD = [
    (
        {"slices.1.sources.1.layer_range": [5, 8]},
        r"slices\[1\]\.sources\[1\] \(.*/B\): layer_range \[5, 8\] goes past the model's 7 layers",
    ),
    (
        {"slices.0.sources.1.layer_range": [0, 3]},
        r"slices\[0\]\.sources\[1\] \(.*/B\): layer_range \[0, 3\] has 3 layers but sources\[0\] .* has 4",
    ),
    (
        {"slices.0.sources.1.layer_range": [3, 1]},
        r"slices\[0\]\.sources\[1\] \(.*/B\): layer_range \[3, 1\] must be \[start, end\] with 0 <= start < end",
    ),
    ({"merge_method": "passthrough"}, r"slices\[0\]: passthrough copies one source per slice, got 2"),
    ({"slices.1.sources.0.parameters": {"scale": 2.0}}, r"slices\[1\]\.sources\[0\] \(.*/A\) scale: only passthrough"),
    ({"slices.1.base_model": "/elsewhere"}, r"slices\[1\]: base_model /elsewhere is not among the slice's sources"),
    ({"slices.0.residual_weight": 0.5}, r"slices\[0\]: residual_weight is not supported"),
    ({"slices.1.sources.0": {"model": "/x"}}, r"slices\[1\]\.sources\[0\] \(/x\): layer_range is required"),
    ({"slices.0.parameters": {"densty": 0.5}}, r"slices\[0\]\.parameters: parameter\(s\) \['densty'\]"),
]


@pytest.mark.parametrize("change,match", BAD, ids=[next(iter(c)) + "=" + str(next(iter(c.values()))) for c, _ in BAD])
def test_bad_slices_exit_2_with_the_slice_source_and_value(models, tmp_path, capsys, change, match):
    cfg = {**_bad(models, **change), "output": str(tmp_path / "out")}
    rc, err = _run_cli(cfg, tmp_path, capsys)
    assert rc == 2, err
    assert re.search(match, err), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()

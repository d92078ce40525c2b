"""mmt extract-lora: exact rank-r deltas reload through peft, Eckart-Young optimality, errors, atomic output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmt.cli import main
from mmt.merge.extract import extract_lora

RANK = 4
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROOT = Path(__file__).resolve().parents[2]


def _tiny(**kw):
    from mmt.testing import tiny_model

    return tiny_model("llama", vocab=128, hidden=32, layers=2, intermediate=64, **kw)


def _state(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _low_rank(shape, r, g, scale=0.05):
    return (torch.randn(shape[0], r, generator=g) @ torch.randn(r, shape[1], generator=g)) * scale / r**0.5


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A base, a tuned copy whose deltas are exactly rank 4 (linears, embeddings) plus a changed norm, and a
    copy with full-rank noise on top; saved sharded."""
    root = tmp_path_factory.mktemp("xlora")
    base = _tiny()
    base.save_pretrained(root / "base", safe_serialization=True, max_shard_size="40KB")
    g = torch.Generator().manual_seed(7)
    exact, noisy = _tiny(), _tiny()
    with torch.no_grad():
        for (name, p), q in zip(exact.named_parameters(), noisy.parameters()):
            if name.rsplit(".", 2)[-2] in LINEARS or name.endswith("embed_tokens.weight"):
                p.add_(_low_rank(p.shape, RANK, g))
                q.copy_(p + torch.randn(p.shape, generator=g) * 0.01)
        exact.model.layers[0].input_layernorm.weight.mul_(1.1)
        noisy.model.layers[0].input_layernorm.weight.copy_(exact.model.layers[0].input_layernorm.weight)
    exact.save_pretrained(root / "exact", safe_serialization=True, max_shard_size="40KB")
    noisy.save_pretrained(root / "noisy", safe_serialization=True, max_shard_size="40KB")
    assert len(list((root / "base").glob("*.safetensors"))) > 1, "fixture should be sharded"
    return root


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))


_LOGITS = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, tuned, adapters = sys.argv[1], sys.argv[2], sys.argv[3:]
ids = torch.tensor([[1, 5, 9, 17, 33, 64, 100, 127]])
with torch.no_grad():
    want = AutoModelForCausalLM.from_pretrained(tuned, local_files_only=True)(ids).logits
    diffs, plain = [], (AutoModelForCausalLM.from_pretrained(base, local_files_only=True)(ids).logits - want)
    for a in adapters:
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, local_files_only=True), a)
        diffs.append(float((m(ids).logits - want).abs().max()))
print(json.dumps({"diffs": diffs, "base_diff": float(plain.abs().max())}))
"""


@pytest.mark.slow
def test_exact_rank_delta_reloads_through_peft_in_a_fresh_process(ckpts, tmp_path):
    saved = extract_lora(ckpts / "base", ckpts / "exact", tmp_path / "ad", RANK, progress=False)
    emb = extract_lora(ckpts / "base", ckpts / "exact", tmp_path / "emb", RANK, embed_lora=True, progress=False)
    low = extract_lora(ckpts / "base", ckpts / "exact", tmp_path / "low", RANK, lowrank=True, progress=False)
    # mergekit's default: embeddings at full rank in modules_to_save, like the changed norm
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert conf["r"] == conf["lora_alpha"] == RANK and conf["base_model_name_or_path"] == str(ckpts / "base")
    assert sorted(conf["target_modules"]) == sorted(LINEARS)
    assert set(conf["modules_to_save"]) == {"model.embed_tokens", "model.layers.0.input_layernorm"}
    assert set(saved.saved) == set(conf["modules_to_save"]) and len(saved.modules) == 14
    keys = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (32, RANK)
    assert "base_model.model.model.embed_tokens.weight" in keys
    emb_conf = json.loads((tmp_path / "emb" / "adapter_config.json").read_text())
    assert emb_conf["modules_to_save"] == ["model.layers.0.input_layernorm"]
    assert "embed_tokens" in emb_conf["target_modules"]
    assert min(emb.energies().values()) > 1 - 1e-6 and min(low.energies().values()) > 1 - 1e-6
    assert (tmp_path / "ad" / "README.md").read_text().startswith("---\nbase_model:")

    adapters = [str(tmp_path / d) for d in ("ad", "emb", "low")]
    proc = subprocess.run(
        [sys.executable, "-c", _LOGITS, str(ckpts / "base"), str(ckpts / "exact"), *adapters],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print("max |logit diff| (saved, embed_lora, lowrank):", res["diffs"], "base vs tuned:", res["base_diff"])
    assert res["base_diff"] > 1e-2  # the deltas matter
    assert max(res["diffs"]) < 1e-5


def test_full_rank_noise_error_is_the_svd_optimum(ckpts, tmp_path):
    rep = extract_lora(ckpts / "base", ckpts / "noisy", tmp_path / "ad", RANK, progress=False)
    base, tuned = _state(ckpts / "base"), _state(ckpts / "noisy")
    ad = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert len(rep.modules) == 14
    for module, info in rep.modules.items():
        delta = (tuned[module + ".weight"] - base[module + ".weight"]).double()
        a = ad[f"base_model.model.{module}.lora_A.weight"].double()
        b = ad[f"base_model.model.{module}.lora_B.weight"].double()
        s2 = torch.linalg.svdvals(delta).pow(2)
        err2 = float((delta - b @ a).pow(2).sum())
        torch.testing.assert_close(err2, float(s2[RANK:].sum()), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(info["energy"], float(s2[:RANK].sum() / s2.sum()), rtol=1e-5, atol=0)
        assert info["rank"] == RANK and 0.5 < info["energy"] < 1
        # sqrt split: A's rows and B's columns carry the same norms
        torch.testing.assert_close(a.norm(dim=1), b.norm(dim=0), rtol=1e-4, atol=1e-8)
    print("retained energy per kind:", rep.by_kind())


def test_rank_energy_picks_the_smallest_rank(ckpts, tmp_path):
    rep = extract_lora(
        ckpts / "base", ckpts / "noisy", tmp_path / "ad", 16, rank_energy=0.9, dtype="bfloat16", progress=False
    )
    base, tuned = _state(ckpts / "base"), _state(ckpts / "noisy")
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    ad = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in ad.values())
    for module, info in rep.modules.items():
        s2 = torch.linalg.svdvals((tuned[module + ".weight"] - base[module + ".weight"]).double()).pow(2)
        cum = s2.cumsum(0) / s2.sum()
        k = info["rank"]
        assert cum[k - 1] >= 0.9 - 1e-6 and (k == 1 or cum[k - 2] < 0.9 + 1e-6), (module, k, cum[:k])
        assert ad[f"base_model.model.{module}.lora_A.weight"].shape[0] == k
        assert conf["rank_pattern"].get(module, conf["r"]) == k == conf["alpha_pattern"].get(module, conf["r"])
    assert conf["r"] == max(v["rank"] for v in rep.modules.values())


def test_modules_filter_and_skip_undecomposable(ckpts, tmp_path):
    rep = extract_lora(
        ckpts / "base",
        ckpts / "exact",
        tmp_path / "ad",
        RANK,
        modules=[r"self_attn\.(q|v)_proj$"],
        skip_undecomposable=True,
        progress=False,
    )
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert sorted(conf["target_modules"]) == ["q_proj", "v_proj"] and len(rep.modules) == 4
    assert "model.layers.0.mlp.up_proj.weight" in rep.left_out  # differs, not selected: reported
    assert "not selected" in rep.summary() or "NOT in the adapter" in rep.summary()


def _cli(capsys, *args):
    rc = main(["extract-lora", *map(str, args), "--no-progress"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_writes_adapter_card_and_summary(ckpts, tmp_path, capsys):
    out = tmp_path / "ad"
    rc, stdout, err = _cli(capsys, "--base", ckpts / "base", "--model", ckpts / "noisy", "--rank", 2, "-o", out)
    assert rc == 0, err
    assert "retained energy per module kind: " in stdout and "q_proj" in stdout
    card = (out / "README.md").read_text()
    assert "mmt extract-lora --base" in card and "| q_proj | 2 |" in card
    assert not list(tmp_path.glob(".ad.tmp-*"))


def test_cli_refuses_existing_output_without_overwrite(ckpts, tmp_path, capsys):
    out = tmp_path / "ad"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ("--base", ckpts / "base", "--model", ckpts / "noisy", "--rank", 2, "-o", out)
    rc, _, err = _cli(capsys, *args)
    assert rc == 2 and "already exists" in err and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "mine" and not (out / "adapter_config.json").exists()
    rc, _, err = _cli(capsys, *args, "--overwrite")
    assert rc == 0, err
    assert (out / "adapter_config.json").exists() and not (out / "keep.txt").exists()


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    from mmt.testing import tiny_model

    tiny_model("llama", vocab=128, hidden=32, layers=2, intermediate=96).save_pretrained(root / "w")
    return root / "w"


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing", "is not a directory"),
        ("shape", "has shape ["),
        ("rank0", "rank must be an integer >= 1, got 0"),
        ("same", "no LoRA-extractable weight differs"),
        ("energy", "rank_energy must be in (0, 1]"),
    ],
)
def test_cli_errors_exit_2_name_the_problem(ckpts, wide, tmp_path, capsys, case, expect):
    base, model, rank, extra = ckpts / "base", ckpts / "noisy", 2, []
    if case == "missing":
        model = tmp_path / "nope"
    elif case == "shape":
        model = wide
    elif case == "rank0":
        rank = 0
    elif case == "same":
        model = ckpts / "base"
    elif case == "energy":
        extra = ["--rank-energy", "1.5"]
    rc, _, err = _cli(capsys, "--base", base, "--model", model, "--rank", rank, "-o", tmp_path / "o", *extra)
    assert rc == 2, err
    assert err.startswith("mmt extract-lora: error: ") and expect in err, err
    assert "Traceback" not in err
    if case == "missing":
        assert str(tmp_path / "nope") in err
    if case == "shape":
        assert "model.layers.0.mlp." in err and "96" in err and "64" in err and str(wide) in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


@pytest.mark.slow
def test_cli_error_in_a_fresh_process_has_no_traceback(ckpts, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mmt.cli", "extract-lora", "--base", str(ckpts / "base"), "--model"]
        + [str(tmp_path / "missing"), "--rank", "4", "-o", str(tmp_path / "o")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"checkpoint {tmp_path / 'missing'} is not a directory" in proc.stderr


@pytest.mark.slow
def test_bias_deltas_as_lora_bias_or_module_saved(tmp_path):
    """Qwen2 has q/k/v biases: a target's bias delta goes to lora_B.bias, a non-target's module is saved whole."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mmt.testing import tiny_model

    base = tiny_model("qwen2", vocab=128, hidden=32, layers=1, intermediate=64)
    base.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(3)
    attn = base.model.layers[0].self_attn
    with torch.no_grad():
        attn.q_proj.weight.add_(_low_rank(attn.q_proj.weight.shape, 2, g))
        attn.q_proj.bias.add_(torch.randn(attn.q_proj.bias.shape, generator=g) * 0.1)
        attn.k_proj.bias.add_(torch.randn(attn.k_proj.bias.shape, generator=g) * 0.1)
    base.save_pretrained(tmp_path / "tuned")
    rep = extract_lora(tmp_path / "base", tmp_path / "tuned", tmp_path / "ad", 2, progress=False)
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert conf["lora_bias"] and conf["modules_to_save"] == ["model.layers.0.self_attn.k_proj"]
    assert rep.bias_deltas == ["model.layers.0.self_attn.q_proj.bias"] and list(rep.modules) == [
        "model.layers.0.self_attn.q_proj"
    ]
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        want = base(ids).logits
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "ad")
        torch.testing.assert_close(m(ids).logits, want, atol=1e-5, rtol=0)

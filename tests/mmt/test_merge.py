"""mmt merge: streaming checkpoint merge (bit-exact linear, loadable output, atomicity, errors) and LoRA merge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmt import merge as mm
from mmt_kernels import merge as kmerge


def _save(model, path: Path, shard="40KB", dtype=None):
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True, max_shard_size=shard)
    return path


def _state(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny llama base and three fine-tuned variants, saved sharded (several shards each)."""
    from mmt.testing import tiny_model

    root = tmp_path_factory.mktemp("ckpts")
    base = tiny_model("llama", vocab=128, hidden=32, layers=2, intermediate=64)
    paths = {"base": _save(base, root / "base")}
    for i in range(3):
        m = tiny_model("llama", vocab=128, hidden=32, layers=2, intermediate=64)
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        paths[f"ft{i}"] = _save(m, root / f"ft{i}")
    assert len(list(paths["base"].glob("*.safetensors"))) > 1, "fixture should be sharded"
    return paths


def _cfg(ckpts, out, **kw):
    raw = dict(
        method="ties",
        base_model=str(ckpts["base"]),
        models=[str(ckpts[f"ft{i}"]) for i in range(3)],
        density=0.3,
        output=str(out),
        shard_size="30KB",
    )
    raw.update(kw)
    return mm.MergeConfig.from_dict(raw)


def test_linear_of_one_model_is_bit_identical(ckpts, tmp_path):
    cfg = mm.MergeConfig.from_dict(
        dict(
            method="linear",
            models=[{"path": str(ckpts["ft0"]), "weight": 1.0}],
            output=str(tmp_path / "out"),
            shard_size="25KB",
        )
    )
    mm.merge_checkpoints(cfg, progress=False)
    got, want = _state(tmp_path / "out"), _state(ckpts["ft0"])
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(
            got[k].view(torch.uint8) if got[k].dtype != torch.bool else got[k],
            want[k].view(torch.uint8) if want[k].dtype != torch.bool else want[k],
        ), k
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_merged_checkpoint_loads_and_matches_kernel(ckpts, tmp_path, method):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(ckpts, tmp_path / "m", method=method, lam=0.8, seed=4, stats=True, plot=False)
    report = mm.merge_checkpoints(cfg, progress=False)
    assert report.tensors_merged > 0 and report.stats
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", local_files_only=True)
    base, fts = _state(ckpts["base"]), [_state(ckpts[f"ft{i}"]) for i in range(3)]
    sd = model.state_dict()
    name = "model.layers.1.mlp.down_proj.weight"
    want = kmerge.merge(
        [f[name] for f in fts],
        base[name],
        method=method,
        density=0.3,
        lam=0.8,
        seed=mm.tensor_seed(4, name),
        backend="reference",
    )
    torch.testing.assert_close(sd[name], want, rtol=0, atol=0)
    out = model(torch.tensor([[1, 5, 9]])).logits
    assert torch.isfinite(out).all()
    assert json.loads((tmp_path / "m" / "merge_report.json").read_text())["method"] == method


def test_bf16_output_and_dtype_conversion(ckpts, tmp_path):
    cfg = _cfg(ckpts, tmp_path / "bf", dtype="bfloat16")
    mm.merge_checkpoints(cfg, progress=False)
    st = _state(tmp_path / "bf")
    assert all(t.dtype == torch.bfloat16 for t in st.values())
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_failed_merge_leaves_no_output(ckpts, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = kmerge.merge

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(kmerge, "merge", flaky)
    with pytest.raises(KeyboardInterrupt):
        mm.merge_checkpoints(_cfg(ckpts, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_write_error_on_the_writer_thread_fails_the_merge(ckpts, tmp_path, monkeypatch):
    """Shards are written on a background thread: a full disk there must fail the merge, not be lost."""
    from mmt.merge import io as merge_io

    real_drain = merge_io.StreamingWriter._drain

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __getattr__(self, attr):
            return getattr(self.f, attr)

    def drain_on_full_disk(self):
        self.handles = [FullDisk(f) for f in self.handles]
        real_drain(self)

    monkeypatch.setattr(merge_io.StreamingWriter, "_drain", drain_on_full_disk)
    with pytest.raises(OSError, match="No space left"):
        mm.merge_checkpoints(_cfg(ckpts, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_killed_merge_leaves_no_complete_looking_output(ckpts, tmp_path):
    out = tmp_path / "out"
    cfg = json.dumps(
        dict(
            method="ties",
            base_model=str(ckpts["base"]),
            models=[str(ckpts[f"ft{i}"]) for i in range(3)],
            density=0.3,
            output=str(out),
        )
    )
    code = f"""
import json, time, mmt.merge as mm, mmt_kernels.merge as km
real = km.merge
def slow(*a, **k):
    time.sleep(0.2)
    return real(*a, **k)
km.merge = slow
mm.merge_checkpoints(mm.MergeConfig.from_dict(json.loads({cfg!r})), progress=False)
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed merge must not leave the output directory"
    # The next merge cleans the stale temporary directory and succeeds.
    mm.merge_checkpoints(_cfg(ckpts, out), progress=False)
    assert (out / "config.json").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_mismatched_checkpoints_name_tensor_and_file(ckpts, tmp_path):
    from mmt.testing import tiny_model

    wide = _save(tiny_model("llama", vocab=128, hidden=32, layers=2, intermediate=96), tmp_path / "wide")
    with pytest.raises(mm.MergeError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight: shape \[32, 96\]"):
        mm.merge_checkpoints(_cfg(ckpts, tmp_path / "o", models=[str(ckpts["ft0"]), str(wide)]), progress=False)
    deep = _save(tiny_model("llama", vocab=128, hidden=32, layers=3, intermediate=64), tmp_path / "deep")
    with pytest.raises(mm.MergeError, match=r"has tensor 'model\.layers\.2\."):
        mm.merge_checkpoints(_cfg(ckpts, tmp_path / "o", models=[str(ckpts["ft0"]), str(deep)]), progress=False)
    half = _save(
        tiny_model("llama", vocab=128, hidden=32, layers=2, intermediate=64), tmp_path / "half", dtype=torch.float16
    )
    with pytest.raises(mm.MergeError, match=r"dtype torch\.float16 in .*half.* set `dtype:`"):
        mm.merge_checkpoints(_cfg(ckpts, tmp_path / "o", models=[str(ckpts["ft0"]), str(half)]), progress=False)
    # with dtype set, mixes are converted
    mm.merge_checkpoints(
        _cfg(ckpts, tmp_path / "o", models=[str(ckpts["ft0"]), str(half)], dtype="float32"), progress=False
    )
    assert not list(tmp_path.glob(".o.tmp-*"))


def test_corrupt_and_missing_shards(ckpts, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpts["ft1"], bad)
    shard = sorted(bad.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(mm.MergeError, match=rf"cannot read shard .*{shard.name}"):
        mm.merge_checkpoints(_cfg(ckpts, tmp_path / "o", models=[str(ckpts["ft0"]), str(bad)]), progress=False)
    shard.unlink()
    with pytest.raises(mm.MergeError, match=rf"shard .*{shard.name} listed in the index .* is missing"):
        mm.merge_checkpoints(_cfg(ckpts, tmp_path / "o", models=[str(ckpts["ft0"]), str(bad)]), progress=False)
    with pytest.raises(mm.MergeError, match="neither model.safetensors"):
        mm.merge_checkpoints(_cfg(ckpts, tmp_path / "o", models=[str(tmp_path)]), progress=False)
    assert not (tmp_path / "o").exists()


def test_config_errors(ckpts, tmp_path):
    with pytest.raises(mm.MergeError, match="needs base_model"):
        mm.MergeConfig.from_dict(dict(method="ties", models=["a"]))
    with pytest.raises(mm.MergeError, match="unknown key"):
        mm.MergeConfig.from_dict(dict(method="ties", base_model="b", models=["a"], desnity=0.2))
    with pytest.raises(mm.MergeError, match="exactly one of"):
        mm.MergeConfig.from_dict(dict(method="ties", base_model="b"))
    (tmp_path / "exists").mkdir()
    with pytest.raises(mm.MergeError, match="already exists"):
        mm.merge_checkpoints(_cfg(ckpts, tmp_path / "exists"), progress=False)


def test_cli(ckpts, tmp_path, capsys):
    from mmt.cli import main

    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        f"method: ties\nbase_model: {ckpts['base']}\nmodels:\n  - {ckpts['ft0']}\n  - path: {ckpts['ft1']}\n"
        f"    weight: 0.5\ndensity: 0.2\noutput: {tmp_path / 'cli_out'}\n"
    )
    assert main(["merge", str(cfg), "density=0.4", "--no-progress"]) == 0
    assert "merged 2 models with ties" in capsys.readouterr().out
    assert main(["merge", str(cfg), "--no-progress"]) == 2  # exists
    assert "already exists" in capsys.readouterr().err


# ---- LoRA adapters ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from mmt.testing import tiny_model

    root = tmp_path_factory.mktemp("lora")
    paths = []
    for i in range(2):
        m = get_peft_model(
            tiny_model("llama", vocab=128, hidden=32, layers=2, intermediate=64),
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
        )
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        m.save_pretrained(root / f"a{i}")
        paths.append(root / f"a{i}")
    return paths


def _dense_deltas(path):
    ad = mm.LoraAdapter.load(path)
    return {mod: ad.scaling(mod) * (ad.factors(mod)[1] @ ad.factors(mod)[0]) for mod in ad.modules()}


def test_lora_svd_merge_full_rank_is_the_dense_merge(adapters, tmp_path):
    cfg = mm.MergeConfig.from_dict(
        dict(
            method="task_arithmetic",
            adapters=[str(p) for p in adapters],
            lora_mode="svd",
            rank=8,
            output=str(tmp_path / "ad"),
        )
    )
    report = mm.merge_lora_adapters(cfg, progress=False)
    assert "SVD truncation to rank 8" in report.summary()
    d0, d1, got = _dense_deltas(adapters[0]), _dense_deltas(adapters[1]), _dense_deltas(tmp_path / "ad")
    for mod in d0:
        torch.testing.assert_close(got[mod], d0[mod] + d1[mod], rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["r"] == 8


def test_lora_ties_svd_and_factor_load_in_peft(adapters, tmp_path):
    from peft import PeftModel

    from mmt.testing import tiny_model

    for mode in ("svd", "factor"):
        cfg = mm.MergeConfig.from_dict(
            dict(
                method="ties",
                adapters=[str(p) for p in adapters],
                lora_mode=mode,
                density=0.5,
                output=str(tmp_path / mode),
            )
        )
        mm.merge_lora_adapters(cfg, progress=False)
        model = PeftModel.from_pretrained(
            tiny_model("llama", vocab=128, hidden=32, layers=2, intermediate=64), tmp_path / mode
        )
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    # svd: the merged dense delta is the TIES merge of the dense deltas, up to the rank-4 truncation
    d = [_dense_deltas(p) for p in adapters]
    got = _dense_deltas(tmp_path / "svd")
    mod = next(iter(got))
    want = kmerge.merge([d[0][mod], d[1][mod]], None, method="ties", density=0.5)
    u, s, vh = torch.linalg.svd(want)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close(got[mod], best, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[2] / "examples" / "merge").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_merge_configs_load(path):
    from mmt.merge import load_merge_config

    cfg = load_merge_config(path)
    assert (cfg.models or cfg.adapters or cfg.slices) and cfg.output

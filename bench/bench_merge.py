"""Family 3 benchmarks: fused TIES / DARE-TIES merge vs peft's merge_utils, and a streaming checkpoint merge.

Run: ``pytest bench/bench_merge.py -q --benchmark-only`` (``MMT_BENCH_SMALL=1`` for 4M-element tensors and a
~70M-parameter streaming run). Peers run side by side on the same tensors; medians, ratios and peak memory go
to ``bench/results/<device>.md`` through ``bench/common.py``. Nothing is asserted about speed.

Both sides get task vectors (peft's functions take task tensors, no base) in fp32; ours includes the radix-select
threshold pass. The comparison with mergekit (whole checkpoints, separate processes) is bench/bench_mergekit.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # bench/conftest.py puts bench/ on sys.path
import pytest
import torch

from mmt_kernels import merge as kmerge

SUITE = "merge"
STREAM_SUITE = "merge_streaming"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = os.environ.get("MMT_BENCH_SMALL", "0") == "1"
SIZES = (
    [int(x) << 20 for x in os.environ["MMT_BENCH_MERGE_SIZES_M"].split(",")]
    if os.environ.get("MMT_BENCH_MERGE_SIZES_M")
    else ([4 << 20] if SMALL else [16 << 20, 64 << 20])
)
KS = [2, 4, 8]
DENSITY = 0.2
_BW: dict[str, float] = {}

peft_mu = pytest.importorskip("peft.utils.merge_utils")


def _bandwidth() -> float:
    if DEVICE not in _BW:
        _BW[DEVICE] = common.measure_copy_bandwidth(DEVICE)
    return _BW[DEVICE]


def _peft(method, tvs, w):
    if method == "ties":
        return peft_mu.ties(tvs, w, DENSITY)
    return peft_mu.dare_ties(tvs, w, DENSITY)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"{n >> 20}M")
def test_merge_vs_peft(benchmark, method, K, n):
    if n >= 64 << 20 and K == 8 and DEVICE == "cpu" and os.environ.get("MMT_BENCH_MERGE_BIG", "1") == "0":
        pytest.skip("MMT_BENCH_MERGE_BIG=0")
    torch.manual_seed(0)
    tvs = [torch.randn(n, device=DEVICE) * 0.01 for _ in range(K)]
    w = torch.linspace(0.5, 1.5, K, device=DEVICE)
    wl = w.tolist()

    def ours():
        return kmerge.merge(tvs, None, method=method, weights=wl, density=DENSITY, seed=1)

    reps = 3 if n <= 16 << 20 else 2
    t_ours = common.median_time(ours, warmup=1, reps=reps, device=DEVICE)
    t_peft = common.median_time(lambda: _peft(method, tvs, w), warmup=1, reps=1 if n > 16 << 20 else 2, device=DEVICE)
    mem_ours = common.peak_memory_bytes(ours, DEVICE)
    mem_peft = common.peak_memory_bytes(lambda: _peft(method, tvs, w), DEVICE)
    # Bytes the fused path must move: merge pass reads K inputs and writes one; TIES's threshold adds 3 reads.
    passes = (K * 4 + 1) if method == "ties" else (K + 1)
    gbs = passes * n * 4 / t_ours / 1e9
    benchmark.pedantic(ours, rounds=1, iterations=1)
    common.record(
        SUITE,
        {
            "method": method,
            "K": K,
            "elements": f"{n >> 20}M",
            "device": DEVICE,
            "backend": kmerge.MERGE.choose(tvs[0].device, None, tvs[0].dtype),
            "ours_s": t_ours,
            "peft_s": t_peft,
            "speedup_vs_peft": t_peft / t_ours,
            "ours_peak_MB": mem_ours / 2**20,
            "peft_peak_MB": mem_peft / 2**20,
            "mem_ratio_peft/ours": mem_peft / max(mem_ours, 1),
            "ours_GB/s": gbs,
            "pct_of_copy_bw": 100 * gbs * 1e9 / _bandwidth(),
        },
    )


def test_notes():
    common.note(
        SUITE,
        f"target on CPU: >= 5x faster than peft at K=8 with at most half its peak memory; "
        f"density {DENSITY}; fp32 task vectors; peak memory = rise of RSS sampled every 0.2 ms "
        "(CPU) or max_memory_allocated (CUDA), inputs excluded.",
    )
    common.note(
        SUITE,
        "GB/s counts the fused path's compulsory traffic (TIES: 3 select passes + 1 merge pass over "
        "K inputs, 1 write), against a measured copy bandwidth.",
    )


# ---- streaming merge of 8 checkpoints -----------------------------------------------------------------


def _synth_checkpoints(root: Path, n_models: int, params: int) -> list[Path]:
    """Random bf16 checkpoints with a Gemma-3-270M-like tensor list (~params parameters), 2 shards each."""
    from safetensors.torch import save_file

    hidden, inter, vocab = 640, 2048, 262144
    layers = max(1, (params - vocab * hidden) // (4 * hidden * hidden + 3 * hidden * inter))
    if SMALL:
        vocab = 32768
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (hidden, hidden),
                p + "self_attn.v_proj.weight": (hidden, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
                p + "input_layernorm.weight": (hidden,),
            }
        )
    names = list(shapes)
    half = len(names) // 2
    dirs = []
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g).bfloat16() for k, s in shapes.items()}
    for m in range(n_models + 1):
        d = root / ("base" if m == 0 else f"m{m}")
        d.mkdir()
        tensors = (
            base
            if m == 0
            else {k: (v.float() + torch.randn(v.shape, generator=g) * 0.01).bfloat16() for k, v in base.items()}
        )
        files = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        wmap = {}
        for f, ns in files.items():
            save_file({k: tensors[k] for k in ns}, str(d / f), metadata={"format": "pt"})
            wmap.update({k: f for k in ns})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
        (d / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "torch_dtype": "bfloat16"}))
        dirs.append(d)
        del tensors
    return dirs


def test_streaming_merge_8_checkpoints(benchmark):
    params = 70_000_000 if SMALL else 270_000_000
    with tempfile.TemporaryDirectory(dir=os.environ.get("MMT_BENCH_TMP")) as tmp:
        root = Path(tmp)
        dirs = _synth_checkpoints(root, 8, params)
        from safetensors import safe_open

        with safe_open(str(dirs[0] / "model-00001-of-00002.safetensors"), "pt") as f:
            n_params = sum(f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape()[1:] or [1])[0] for k in f.keys())
        with safe_open(str(dirs[0] / "model-00002-of-00002.safetensors"), "pt") as f:
            n_params += sum(
                f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape()[1:] or [1])[0] for k in f.keys()
            )
        cfg = {
            "method": "ties",
            "base_model": str(dirs[0]),
            "models": [str(d) for d in dirs[1:]],
            "density": DENSITY,
            "output": str(root / "merged"),
            "shard_size": "200MB",
        }
        (root / "merge.json").write_text(json.dumps(cfg))
        # A fresh process so peak RSS is the merge's alone (inputs are never all in memory at once).
        code = (
            "import json,sys,mmt.merge as mm;"
            "r=mm.run_merge(mm.MergeConfig.from_dict(json.load(open(sys.argv[1]))),progress=False);"
            "print(json.dumps({'s':r.seconds,'rss':r.peak_rss_mb,"
            "'read':r.bytes_read,'written':r.bytes_written}))"
        )
        t0 = time.time()
        out = subprocess.run(
            [sys.executable, "-c", code, str(root / "merge.json")], capture_output=True, text=True, check=True
        )
        wall = time.time() - t0
        res = json.loads(out.stdout.strip().splitlines()[-1])
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        model_gb = n_params * 2 / 1e9
        common.record(
            STREAM_SUITE,
            {
                "models": 8,
                "params_per_model_M": n_params / 1e6,
                "dtype": "bf16",
                "method": "ties",
                "merge_s": res["s"],
                "process_wall_s": wall,
                "read_GB": res["read"] / 1e9,
                "read_GB/s": res["read"] / res["s"] / 1e9,
                "peak_RSS_MB": res["rss"],
                "one_model_MB": model_gb * 1e3,
                "largest_tensor_MB": (32768 if SMALL else 262144) * 640 * 2 / 2**20,
            },
        )
        common.note(
            STREAM_SUITE,
            "Synthetic bf16 checkpoints (2 shards each) with Gemma-3-270M-like shapes; peak "
            "RSS of a fresh process running `mmt.merge.run_merge` (includes ~400 MB of torch "
            "import); files were just written, so reads come from the page cache.",
        )

"""Family 2 benchmarks: the MoE FFN forward+backward against its peers, and the FFT router features.

Providers, side by side in one process on the same inputs:

* ``loop``: Hugging Face Mixtral-style per-expert loop (``mmt_kernels.reference.moe.moe_ffn``);
* ``loop+compile``: ``torch.compile`` of that loop (graph breaks at the data-dependent ``torch.where``);
* ``grouped_mm``: sort + ``torch._grouped_mm`` + un-permute (Hugging Face v5's ``grouped_mm`` path),
  where this torch build has it;
* ``mmt``: ``mmt_kernels.moe_ffn`` with the automatic backend (C++ on CPU, Triton/CUDA on GPU).

Shapes: coarse (T 4096, d 1024, f 2816, E 8, k 2) and fine-grained (T 4096, d 1024, f 256, E 64, k 8).
``MMT_BENCH_QUICK=1`` shrinks T to 1024 for a smoke run. Timings are never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import common
import pytest
import torch

import mmt_kernels.moe as moe
from mmt_kernels.reference import moe as ref

SUITE = "moe"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = os.environ.get("MMT_BENCH_QUICK") == "1"
T = 1024 if QUICK else 4096
SHAPES = {"coarse": dict(T=T, d=1024, f=2816, E=8, k=2), "fine": dict(T=T, d=1024, f=256, E=64, k=8)}
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
REPS = dict(warmup=1, reps=2) if DEVICE == "cpu" else dict(warmup=3, reps=10)


def grouped_mm_moe(x, logits, w_gate, w_up, w_down, k=2, act="silu"):
    """Sort-based MoE on ``torch._grouped_mm`` (the Hugging Face v5 ``grouped_mm`` recipe)."""
    weights, ids, aux, z = ref.route(logits, k)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w_gate.shape[0])
    offs = counts.cumsum(0).to(torch.int32)
    xs = x[order // k]
    g = torch._grouped_mm(xs, w_gate.transpose(1, 2), offs=offs)
    u = torch._grouped_mm(xs, w_up.transpose(1, 2), offs=offs)
    h = ref.activation(g, act) * u
    ys = torch._grouped_mm(h, w_down.transpose(1, 2), offs=offs)
    y = torch.empty_like(ys).index_copy(0, order, ys)
    out = (y.view(x.shape[0], k, -1) * weights.to(y.dtype).unsqueeze(-1)).sum(1)
    return out, aux, z


def _inputs(T, d, f, E, k):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, d, generator=gen)
    logits = torch.randn(T, E, generator=gen)
    wg = torch.randn(E, f, d, generator=gen) / d**0.5
    wu = torch.randn(E, f, d, generator=gen) / d**0.5
    wd = torch.randn(E, d, f, generator=gen) / f**0.5
    return [t.to(DEVICE, DTYPE).requires_grad_(True) for t in (x, logits, wg, wu, wd)]


def _providers():
    def ours(x, lg, wg, wu, wd, k):
        r = moe.moe_ffn(x, lg, wg, wu, wd, k=k)
        return r.out, r.aux_loss, r.z_loss

    provs = {
        "loop": lambda *a, k: ref.moe_ffn(*a, k=k),
        "loop+compile": None,
        "grouped_mm": (lambda *a, k: grouped_mm_moe(*a, k=k)) if hasattr(torch, "_grouped_mm") else None,
        "mmt": lambda *a, k: ours(*a, k),
    }
    compiled = torch.compile(ref.moe_ffn, dynamic=True)  # per-expert token counts vary: one dynamic graph
    provs["loop+compile"] = lambda *a, k: compiled(*a, k=k)
    return provs


def _step_fn(fn, inputs, dout, k):
    def run():
        for t in inputs:
            t.grad = None
        out, aux, z = fn(*inputs, k=k)
        ((out * dout).sum() + 0.01 * aux + 1e-3 * z).backward()

    return run


def _peak_memory(provider: str, shape: str) -> int:
    """CPU peak memory of one forward+backward, in a fresh interpreter.

    (common.peak_memory_bytes forks; a child forked after OpenMP/autograd ran in the parent can hang in
    libgomp, so this spawns a new process instead: peak RSS minus RSS once the inputs exist.)"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(
        [sys.executable, __file__, "--peak-memory", provider, shape],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if res.returncode:
        raise RuntimeError(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "memory probe failed")
    return json.loads(res.stdout.strip().splitlines()[-1])["peak"]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_moe_layer_fwd_bwd(benchmark, shape):
    cfg = SHAPES[shape]
    inputs = _inputs(**cfg)
    dout = torch.randn(cfg["T"], cfg["d"], device=DEVICE, dtype=DTYPE)
    flops = 3 * 2 * cfg["T"] * cfg["k"] * cfg["d"] * cfg["f"] * 3  # 3 GEMMs; backward = 2x forward

    def step(fn):
        return _step_fn(fn, inputs, dout, cfg["k"])

    rows, base = {}, None
    for name, fn in _providers().items():
        if fn is None:
            common.note(SUITE, f"{name}: not available in torch {torch.__version__}")
            continue
        try:
            run = step(fn)
            t = common.median_time(run, device=DEVICE, **REPS)
            mem = _peak_memory(name, shape) if DEVICE == "cpu" else common.peak_memory_bytes(run, DEVICE)
        except Exception as exc:  # a peer that cannot run here is reported, not fatal
            common.note(SUITE, f"{name} at {shape}: failed ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        rows[name] = (t, mem)
        if name == "loop":
            base = (t, mem)
    for name, (t, mem) in rows.items():
        common.record(
            SUITE,
            {
                "case": f"layer fwd+bwd {shape}",
                **{k_: v for k_, v in cfg.items()},
                "dtype": str(DTYPE).replace("torch.", ""),
                "provider": name,
                "median_s": t,
                "speedup_vs_loop": base[0] / t if base else None,
                "GFLOP/s": flops / t / 1e9,
                "peak_MiB": mem / 2**20,
                "mem_vs_loop": mem / base[1] if base and base[1] > 0 else None,
            },
        )
    benchmark.pedantic(step(_providers()["mmt"]), rounds=1, iterations=1)


def test_fft_features_vs_rfft(benchmark):
    Tn, d, nf = 4 * T, 1024, 256
    x = torch.randn(Tn, d, device=DEVICE, dtype=DTYPE, requires_grad=True)
    g = torch.randn(Tn, nf, device=DEVICE, dtype=DTYPE)

    def run(fn):
        def go():
            x.grad = None
            fn(x, nf).backward(g)

        return go

    ours = run(lambda a, n: moe.fft_features(a, n))  # auto: rfft on CPU, the Triton DFT GEMM on a GPU
    gemm = run(lambda a, n: moe.fft_features(a, n, backend="cpu" if DEVICE == "cpu" else "triton"))
    peer = run(ref.fft_features)
    t_peer = common.median_time(peer, device=DEVICE, warmup=2, reps=5)
    t_ours = common.median_time(ours, device=DEVICE, warmup=2, reps=5)
    t_gemm = common.median_time(gemm, device=DEVICE, warmup=2, reps=5)
    rows = (("torch.fft.rfft eager", t_peer), ("mmt (auto)", t_ours), ("mmt (DFT GEMM)", t_gemm))
    for name, t in rows:
        common.record(
            SUITE,
            {
                "case": f"fft_features fwd+bwd T={Tn} d={d} F={nf}",
                "dtype": str(DTYPE).replace("torch.", ""),
                "provider": name,
                "median_s": t,
                "speedup_vs_rfft": t_peer / t,
            },
        )
    benchmark.pedantic(ours, rounds=1, iterations=1)


def test_targets_note():
    common.note(
        SUITE,
        "CPU targets from the brief: >= 1.5x the loop at coarse, >= 3x at fine-grained, no more "
        "peak memory. GFLOP/s counts the 3 expert GEMMs forward and 6 backward.",
    )


def _vm(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--peak-memory":
    import gc

    _, _, provider, shape = sys.argv
    cfg = SHAPES[shape]
    inputs = _inputs(**cfg)
    dout = torch.randn(cfg["T"], cfg["d"], device=DEVICE, dtype=DTYPE)
    run = _step_fn(_providers()[provider], inputs, dout, cfg["k"])
    run()  # lazy initialisation and compilation are not counted
    for t in inputs:
        t.grad = None
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak-RSS mark (Linux >= 4.0)
        fh.write("5")
    before = _vm("VmRSS")
    run()
    print(json.dumps({"peak": max(0, _vm("VmHWM") - before)}))

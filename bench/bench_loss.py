"""Fused linear + cross-entropy vs the unfused loss: step time (forward + backward) and peak memory.

Peers, side by side in one process on the same tensors: Hugging Face's loss (full logits in fp32, then
``cross_entropy``), ``torch.compile`` of that naive loss, and Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss``
(GPU only, when installed). Target at 8x256 tokens and a 262k vocabulary: peak memory at most 25% of HF's and
step time at most 1.0x HF's.

Run: ``pytest bench/bench_loss.py -q --benchmark-only``. ``MMT_BENCH_LOSS_TOKENS`` / ``MMT_BENCH_LOSS_VOCAB`` /
``MMT_BENCH_LOSS_HIDDEN`` change the shape (the default needs ~7 GB free for HF's loss);
``MMT_BENCH_COMPILE=0`` skips the torch.compile peer (its compilation takes minutes on a small CPU).
"""

from __future__ import annotations

import os

import common  # bench/conftest.py puts bench/ on sys.path
import pytest
import torch

import mmt_kernels

SUITE = "fused_linear_cross_entropy"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOKENS = int(os.environ.get("MMT_BENCH_LOSS_TOKENS", "2048"))
VOCAB = int(os.environ.get("MMT_BENCH_LOSS_VOCAB", "262144"))
HIDDEN = int(os.environ.get("MMT_BENCH_LOSS_HIDDEN", "640"))  # Gemma 3 270M
COMPILE = os.environ.get("MMT_BENCH_COMPILE", "1") != "0"


def _hf_loss(h, w, t):
    logits = h @ w.t()  # what the model's lm_head returns, then HF's loss upcasts to fp32
    return torch.nn.functional.cross_entropy(logits.float(), t, ignore_index=-100, reduction="sum")


def _providers(train_weight: bool):
    out = {
        "hf": _hf_loss,
        "mmt": lambda h, w, t: mmt_kernels.linear_cross_entropy(h, w, t),
        "mmt recompute": lambda h, w, t: mmt_kernels.linear_cross_entropy(h, w, t, recompute=True),
    }
    if COMPILE:
        out["hf+compile"] = torch.compile(_hf_loss, dynamic=False)
    if DEVICE == "cuda":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
            out["liger"] = lambda h, w, t: liger(w, h, t)
        except ImportError:
            common.note(SUITE, "liger-kernel is not installed: no Liger peer")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen_head", "trained_head"])
def test_fused_loss_vs_peers(benchmark, dtype, train_weight):
    torch.manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, device=DEVICE, dtype=dtype, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN, device=DEVICE) / HIDDEN**0.5).to(dtype).requires_grad_(train_weight)
    target = torch.randint(0, VOCAB, (TOKENS,), device=DEVICE)

    def run(fn):
        def step():
            hidden.grad = weight.grad = None
            fn(hidden, weight, target).backward()

        return step

    results = {}
    for name, fn in _providers(train_weight).items():
        step = run(fn)
        try:
            step()  # warm-up (and compilation)
        except (RuntimeError, MemoryError) as exc:
            common.note(SUITE, f"{name} failed at {TOKENS}x{VOCAB} {dtype}: {type(exc).__name__}: {exc}"[:300])
            continue
        if name == "mmt":
            benchmark.pedantic(step, rounds=3, warmup_rounds=0, iterations=1)
            times = list(benchmark.stats.stats.data)
        else:
            times = [common.median_time(step, warmup=0, reps=1, device=DEVICE) for _ in range(3)]
        peak = common.peak_memory_bytes(step, DEVICE)
        results[name] = (sorted(times)[len(times) // 2], min(times), max(times), peak)
    base_t, base_m = results["hf"][0], results["hf"][3]
    for name, (t, lo, hi, peak) in results.items():
        common.record(
            SUITE,
            {
                "tokens": TOKENS,
                "vocab": VOCAB,
                "hidden": HIDDEN,
                "dtype": str(dtype).replace("torch.", ""),
                "head": "trained" if train_weight else "frozen",
                "provider": name,
                "median_s": t,
                "min_s": lo,
                "max_s": hi,
                "time_vs_hf": t / base_t,
                "peak_MiB": peak / 2**20,
                "mem_vs_hf": peak / max(base_m, 1),
            },
        )

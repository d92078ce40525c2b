"""Family 3, CPU: the merge kernel (threshold + merge) against a copy of the same bytes, side by side.

Run: ``pytest bench/bench_merge_cpu.py -q --benchmark-only`` (``MMT_BENCH_MERGE_CPU_M=4`` for 4M elements).
Per case, one process runs, interleaved and ``REPS`` times each: ``dst.copy_(src)`` over the bytes the merge
reads (K inputs + base), the kernel as dispatched (AVX2 where the CPU has it), the kernel's baseline build
(``MMT_CPU_ISA=baseline``) and, when ``MMT_BENCH_MERGE_PEER=/path/lib.so:namespace`` names one, another build
of the kernel registered under its own op namespace (how the results' "before" column was measured: main's
csrc/cpu/merge.cpp built as ``mmt_old``). GB/s counts compulsory traffic only, (K + 2) * numel * itemsize (K
inputs and the base read once, the output written once), so % of copy is the share of a plain copy's bandwidth.
Nothing is asserted about speed.
"""

from __future__ import annotations

import os
import statistics
import time

import common  # bench/conftest.py puts bench/ on sys.path
import pytest
import torch

from mmt_kernels import _backend

SUITE = "merge_cpu_kernel"
N = int(os.environ.get("MMT_BENCH_MERGE_CPU_M", "16")) << 20
REPS = int(os.environ.get("MMT_BENCH_REPS", "5"))
DENSITY = 0.2

if not _backend.available("cpu", "cpu", "merge")[0]:
    pytest.skip("no C++ merge kernel", allow_module_level=True)


def _peer():
    spec = os.environ.get("MMT_BENCH_MERGE_PEER")
    if not spec:
        return None
    path, ns = spec.rsplit(":", 1)
    torch.ops.load_library(path)
    return getattr(torch.ops, ns)


def _run(ops, method, xs, b, K, isa=None):
    if isa == "baseline":
        os.environ["MMT_CPU_ISA"] = "baseline"
    try:
        thr = ops.merge_threshold(xs, b, [int(DENSITY * N)] * K) if method == "ties" else None
        return ops.merge(xs, b, [1.0] * K, thr, [DENSITY] * K, method, 1.0, 1, False)
    finally:
        os.environ.pop("MMT_CPU_ISA", None)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("K", [4, 8])
@pytest.mark.parametrize("method", ["ties", "dare_ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_kernel_vs_copy(benchmark, dtype, method, K, threads):
    if os.environ.get("MMT_CPU_ISA"):
        pytest.skip("MMT_CPU_ISA is set: this benchmark sets it itself")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        base32 = torch.randn(N, generator=g)
        b = base32.to(dtype)
        xs = [(base32 + torch.randn(N, generator=g) * 0.01).to(dtype) for _ in range(K)]
        src = torch.cat(xs + [b])
        dst = torch.empty_like(src)
        ops = torch.ops.mmt
        peer = _peer()
        runs = {
            "copy": lambda: dst.copy_(src),
            "kernel": lambda: _run(ops, method, xs, b, K),
            "baseline_isa": lambda: _run(ops, method, xs, b, K, "baseline"),
        }
        if peer is not None:
            runs["peer"] = lambda: _run(peer, method, xs, b, K)
        times = {k: [] for k in runs}
        names = list(runs)
        for r in range(REPS + 1):  # the first round warms up; odd rounds run in reverse order
            for name in names if r % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                runs[name]()
                if r:
                    times[name].append(time.perf_counter() - t0)
        outs = {k: runs[k]() for k in names if k != "copy"}
        ref = outs["kernel"]
        same = all(torch.equal(ref, o) for o in outs.values())
        benchmark.pedantic(runs["kernel"], rounds=1, iterations=1)
        copy_bw = 2 * src.numel() * src.element_size() / statistics.median(times["copy"])
        nbytes = (K + 2) * N * b.element_size()
        row = {
            "dtype": str(dtype).removeprefix("torch."),
            "method": method,
            "K": K,
            "threads": threads,
            "elements": f"{N >> 20}M",
            "copy_GB/s": copy_bw / 1e9,
        }
        for name in names[1:]:
            t = statistics.median(times[name])
            row[f"{name}_s"] = t
            row[f"{name}_spread_s"] = f"{min(times[name]):.3g}-{max(times[name]):.3g}"
            row[f"{name}_GB/s"] = nbytes / t / 1e9
            row[f"{name}_pct_of_copy"] = 100 * nbytes / t / copy_bw
        if peer is not None:
            ratios = [p / k for p, k in zip(times["peer"], times["kernel"])]
            row["peer/kernel"] = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        row["bit_identical"] = same
        common.record(SUITE, row)
    finally:
        torch.set_num_threads(old_threads)


def test_notes(benchmark):
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # so that --benchmark-only runs it
    common.note(
        SUITE,
        f"{N >> 20}M elements, base given, density {DENSITY}; medians of {REPS} interleaved rounds (spread = "
        "min-max); GB/s = (K inputs + base + output) bytes / time; % of copy against dst.copy_(src) over the "
        f"same inputs in the same process; load average at the end: {os.getloadavg()[0]:.2f}.",
    )

"""Shared benchmark helpers: timing, peak memory, bandwidth ceiling, and the results table.

Benchmarks record rows with :func:`record`; ``bench/conftest.py`` writes every suite into
``bench/results/<device>.md`` at the end of the session, with the versions used. Timings are
medians over repetitions, run side by side in one process, and reported as ratios against peers.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections import defaultdict
from typing import Callable

import torch

RESULTS: dict[str, list[dict]] = defaultdict(list)
NOTES: dict[str, list[str]] = defaultdict(list)


def synchronize(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def median_time(
    fn: Callable[[], object], *, warmup: int = 2, reps: int = 5, device=None, setup: Callable[[], None] | None = None
) -> float:
    """Median wall time of ``fn()`` in seconds (CUDA-synchronised); ``setup`` runs untimed before each rep."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if setup:
            setup()
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak extra memory while ``fn()`` runs.

    CUDA: ``max_memory_allocated`` above the starting allocation. CPU: the rise of resident memory,
    sampled every 0.2 ms by a thread (glibc returns large blocks to the OS on free, so RSS follows
    live tensors; a forked child would hang in libgomp once OpenMP has run). Run ``fn`` once
    beforehand so lazy initialisation is not counted.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    import gc
    import threading

    gc.collect()
    before = _current_rss()
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _current_rss())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
        peak = max(peak, _current_rss())
    finally:
        done.set()
        sampler.join()
    return max(0, peak - before)


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_copy_bandwidth(device: torch.device | str = "cpu", nbytes: int = 256 << 20) -> float:
    """Achievable memory bandwidth in bytes/s: a large device-to-device copy (read + write)."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), warmup=2, reps=5, device=device)
    return 2 * nbytes / t


def device_name(device: torch.device | str = "cpu") -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(0)
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def record(suite: str, row: dict) -> None:
    """Add one result row to ``suite``'s table (columns are the union of keys, in first-seen order)."""
    RESULTS[suite].append(row)


def note(suite: str, text: str) -> None:
    """A sentence printed under ``suite``'s table (targets, peers that could not run, caveats)."""
    NOTES[suite].append(text)


def fmt(value) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def render_markdown(device: str, versions: dict[str, str]) -> str:
    lines = [f"# Benchmarks on {device}", "", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    for suite in sorted(RESULTS):
        rows = RESULTS[suite]
        cols: list[str] = []
        for row in rows:
            cols += [c for c in row if c not in cols]
        lines += [f"## {suite}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
        lines += [""] + [f"- {n}" for n in NOTES.get(suite, [])] + [""]
    return "\n".join(lines)

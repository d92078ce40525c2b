"""`mmt merge` against mergekit, side by side on the same checkpoints: TIES, density 0.2, bf16, K = 4 and 8.

Run: ``pytest bench/bench_mergekit.py -q -s`` or ``python bench/bench_mergekit.py``. Writes
``bench/results/merge_vs_mergekit.md``. Inputs are random bf16 checkpoints with Gemma 3 270M's exact tensor
list and shapes (268M parameters, tied embeddings), written once to a temporary folder, so every run reads
them from the page cache. Each merge runs in a fresh process; the table gives that process's wall time
(imports included) and its peak RSS.

mergekit runs when it can be imported, or from ``MMT_MERGEKIT_PATH`` (a folder with mergekit installed, e.g.
by ``pip install --target``; it is put on that process's PYTHONPATH). Both of its precisions are measured:
``dtype: bfloat16`` (its maths in bf16) and ``dtype: float32, out_dtype: bfloat16``. The fp32 run at K = 8
needs more than 23 GB and is off unless ``MMT_BENCH_MERGEKIT_FP32_K8=1``; a run is skipped when the machine
has less free memory than it needs. ``MMT_BENCH_MERGEKIT_SCALE=small`` uses 6 layers and a 64k vocabulary
(about a third of the parameters); each shape set has its own section in the results file.

A second, small case checks fidelity: mergekit's fp32 TIES against ``mmt merge`` with ``tie_break: exact_k``
(expected: no element differs) and with the default ``tie_break: threshold``.

``MMT_BENCH_MERGEKIT_METHODS=ties,dare_ties,...`` adds a section per shape set with one row per method (K = 4,
nuslerp K = 2; both tools in fp32 maths with bf16 output, the same mergekit YAML): wall time, peak RSS and the share of output
elements that differ (``tie_break: exact_k``; DARE and DELLA draw their own random masks, so theirs differ by
design). ``MMT_BENCH_MERGEKIT_CKPTS=DIR`` reuses checkpoints written earlier by ``--write DIR 8 SCALE``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "merge_vs_mergekit.md"
DENSITY = 0.2
SCALE = os.environ.get("MMT_BENCH_MERGEKIT_SCALE", "full")
# Runs each process in-process through runpy and reports its own peak RSS.
RUNNER = """
import json, resource, runpy, sys
mod = sys.argv[1]
sys.argv = [mod] + sys.argv[2:]
try:
    runpy.run_module(mod, run_name="__main__", alter_sys=True)
except SystemExit as exc:
    if exc.code not in (0, None):
        raise
# VmHWM belongs to this program's memory map; ru_maxrss would carry over the forking parent's peak.
hwm = [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
rss = int(hwm[0]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("@@" + json.dumps({"rss_mb": rss}))
"""


def gemma3_270m_config(small: bool = False):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=65536 if small else 262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=6 if small else 18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        architectures=["Gemma3ForCausalLM"],
        torch_dtype="bfloat16",
    )


def write_checkpoints(root: Path, k: int, config) -> list[Path]:
    """A base and k fine-tuned bf16 checkpoints of ``config``'s tensor list (one shard each)."""
    from safetensors.torch import save_file
    from transformers import Gemma3ForCausalLM

    with torch.device("meta"):
        shapes = {
            n: tuple(p.shape) for n, p in Gemma3ForCausalLM(config).state_dict().items() if n != "lm_head.weight"
        }  # tied to the embeddings
    g = torch.Generator().manual_seed(0)
    dirs = []
    base = None
    for m in range(k + 1):
        d = root / ("base" if m == 0 else f"m{m}")
        d.mkdir(parents=True, exist_ok=True)
        if m == 0:
            base = {n: (torch.randn(s, generator=g) * 0.02).bfloat16() for n, s in shapes.items()}
            tensors = base
        else:
            tensors = {n: (v.float() + torch.randn(v.shape, generator=g) * 0.002).bfloat16() for n, v in base.items()}
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(d)
        dirs.append(d)
    return dirs


def _mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def _run(module: str, args: list[str], env_path: str | None = None, timeout: int = 1800) -> dict:
    env = dict(os.environ)
    if env_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env_path, env.get("PYTHONPATH")) if p)
    else:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, module, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO),
    )
    wall = time.time() - t0
    if proc.returncode != 0:
        killed = proc.returncode < 0 or proc.returncode == 137
        return {
            "wall_s": None,
            "rss_mb": None,
            "error": "killed (out of memory?)" if killed else proc.stderr.strip().splitlines()[-1:],
        }
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("@@"))
    return {"wall_s": wall, **json.loads(line[2:])}


def mergekit_path() -> str | None:
    """'' when mergekit imports here, a folder when MMT_MERGEKIT_PATH holds it, None when it is unavailable."""
    import importlib.util

    if importlib.util.find_spec("mergekit") is not None:
        return ""
    path = os.environ.get("MMT_MERGEKIT_PATH")
    return path if path and (Path(path) / "mergekit").is_dir() else None


def run_mmt(root: Path, dirs: list[Path], out: Path, **extra) -> dict:
    import yaml

    cfg = {
        "method": "ties",
        "base_model": str(dirs[0]),
        "models": [str(d) for d in dirs[1:]],
        "density": DENSITY,
        "output": str(out),
        "overwrite": True,
        **extra,
    }
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return _run("mmt.cli", ["merge", str(path), "--no-progress"])


def run_mergekit(root: Path, dirs: list[Path], out: Path, fp32: bool, mk: str) -> dict:
    import yaml

    cfg = {
        "merge_method": "ties",
        "base_model": str(dirs[0]),
        "models": [{"model": str(d), "parameters": {"weight": 1.0, "density": DENSITY}} for d in dirs[1:]],
        "dtype": "float32" if fp32 else "bfloat16",
    }
    if fp32:
        cfg["out_dtype"] = "bfloat16"
    path = root / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return _run("mergekit.scripts.run_yaml", [str(path), str(out), "--no-copy-tokenizer"], env_path=mk or None)


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def fidelity(root: Path, mk: str) -> list[str]:
    """Small Gemma 3 shapes, K = 4: elements that differ from mergekit's fp32 TIES, per tie_break."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=4096,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        tie_word_embeddings=True,
        architectures=["Gemma3ForCausalLM"],
        torch_dtype="bfloat16",
    )
    dirs = write_checkpoints(root / "fid", 4, config)
    r = run_mergekit(root, dirs, root / "fid_mergekit", fp32=True, mk=mk)
    if r.get("error"):
        return [f"fidelity check: mergekit failed ({r['error']})"]
    ref = _tensors(root / "fid_mergekit")
    lines = []
    for tie_break in ("exact_k", "threshold"):
        out = root / f"fid_mmt_{tie_break}"
        r = run_mmt(root, dirs, out, tie_break=tie_break, dtype="float32", out_dtype="bfloat16")
        got = _tensors(out)
        n = sum(t.numel() for t in ref.values())
        diff = sum(int((got[k].view(torch.int16) != v.view(torch.int16)).sum()) for k, v in ref.items())
        worst = max(float((got[k].float() - v.float()).abs().max()) for k, v in ref.items())
        lines.append(
            f"fidelity, K=4, {n / 1e6:.1f}M parameters, fp32 maths: `tie_break: {tie_break}` differs from "
            f"mergekit in {diff} of {n} elements ({100 * diff / n:.2f}%), largest difference {worst:.3g}"
        )
    return lines


# mergekit parameters per method for the methods section (K = 4 models over a base)
_SWEEP_PARAMS = {
    "ties": {"weight": 1.0, "density": DENSITY},
    "dare_ties": {"weight": 1.0, "density": DENSITY},
    "breadcrumbs_ties": {"weight": 1.0, "density": 0.9, "gamma": 0.01},
    "della": {"weight": 1.0, "density": DENSITY, "epsilon": 0.1},
    "task_arithmetic": {"weight": 0.5},
    "model_stock": None,
    "nuslerp": {"weight": 0.5},  # two models: t = 0.5 of the way between their task vectors
    "sce": None,
}
_SWEEP_GLOBAL = {"sce": {"select_topk": 0.5}}  # mergekit parameters of the merge, not of each model
_SWEEP_K = {"nuslerp": 2}  # methods that take a fixed number of models (the rest: K = 4)
_RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")


def methods_section(root: Path, dirs: list[Path], mk: str, methods: list[str], title: str) -> str:
    import yaml

    lines = [
        f"### {title.removeprefix('## ')}: methods, K = 4",
        "",
        "Both tools run the same mergekit YAML (fp32 maths, bf16 output); mmt with `tie_break: exact_k`. "
        f"Load average {os.getloadavg()[0]:.1f} before the first run.",
        "",
        "| method | mmt wall s | mmt peak RSS | mergekit wall s | mergekit peak RSS | mergekit / mmt time "
        "| elements that differ |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        params = _SWEEP_PARAMS[method]
        inputs = dirs[1 : 1 + _SWEEP_K.get(method, len(dirs) - 1)]
        models = [{"model": str(d), **({"parameters": params} if params else {})} for d in inputs]
        cfg = {
            "merge_method": method,
            "base_model": str(dirs[0]),
            "models": models,
            "dtype": "float32",
            "out_dtype": "bfloat16",
        }
        if method in _SWEEP_GLOBAL:
            cfg["parameters"] = _SWEEP_GLOBAL[method]
        src = root / f"sweep_{method}.yml"
        src.write_text(yaml.safe_dump(cfg))
        out_mk, out_mmt = root / f"sweep_mk_{method}", root / f"sweep_mmt_{method}"
        r_mk = _run("mergekit.scripts.run_yaml", [str(src), str(out_mk), "--no-copy-tokenizer"], env_path=mk or None)
        r_mmt = _run(
            "mmt.cli",
            ["merge", str(src), "--no-progress", "--overwrite", "-o", str(out_mmt), "tie_break=exact_k"],
        )
        if r_mk.get("error") or r_mmt.get("error"):
            lines.append(f"| {method} | {r_mmt.get('error') or ''} | | {r_mk.get('error') or ''} | | | |")
            continue
        want, got = _tensors(out_mk), _tensors(out_mmt)
        n = sum(t.numel() for t in want.values())
        diff = sum(int((got[k].view(torch.int16) != v.view(torch.int16)).sum()) for k, v in want.items())
        note = " (own random masks)" if method in _RANDOM_METHODS else ""
        label = f"{method} (K={_SWEEP_K[method]})" if method in _SWEEP_K else method
        lines.append(
            f"| {label} | {r_mmt['wall_s']:.1f} | {r_mmt['rss_mb'] / 1024:.1f} GB | {r_mk['wall_s']:.1f} | "
            f"{r_mk['rss_mb'] / 1024:.1f} GB | {r_mk['wall_s'] / r_mmt['wall_s']:.1f}x | "
            f"{100 * diff / n:.3f}%{note} |"
        )
        for d in (out_mk, out_mmt):
            subprocess.run(["rm", "-rf", str(d)], check=False)
    return "\n".join(lines + [""])


def main() -> str:
    mk = mergekit_path()
    small = SCALE == "small"
    rows, notes = [], []
    sweep = [m for m in os.environ.get("MMT_BENCH_MERGEKIT_METHODS", "").split(",") if m]
    unknown = sorted(set(sweep) - set(_SWEEP_PARAMS))
    if unknown:
        raise SystemExit(f"MMT_BENCH_MERGEKIT_METHODS: unknown {unknown}; known: {sorted(_SWEEP_PARAMS)}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("MMT_BENCH_TMP")) as tmp:
        root = Path(tmp)
        ckpts = Path(os.environ["MMT_BENCH_MERGEKIT_CKPTS"]) if os.environ.get("MMT_BENCH_MERGEKIT_CKPTS") else None
        if ckpts is None:
            ckpts = root / "ck"
            # Written by a child process, so that this one stays small: a forked child's peak RSS starts at ours.
            subprocess.run(
                [sys.executable, __file__, "--write", str(ckpts), "8", SCALE],
                check=True,
                env=dict(os.environ, PYTHONPATH=str(REPO)),
            )
        dirs8 = [ckpts / ("base" if m == 0 else f"m{m}") for m in range(9)]
        n_params = sum(math.prod(s) for s in _shapes(dirs8[0]).values())
        for k in (4, 8):
            dirs = dirs8[: k + 1]
            r = run_mmt(root, dirs, root / f"mmt_k{k}")
            rows.append((f"K={k}", "mmt", r))
            if mk is None:
                continue
            for fp32 in (False, True):
                tool = f"mergekit, {'fp32' if fp32 else 'bf16'} maths"
                need = {(4, False): 8.5, (8, False): 14.0, (4, True): 15.5, (8, True): 25.0}[k, fp32] * n_params / 268e6
                if fp32 and k == 8 and not small and os.environ.get("MMT_BENCH_MERGEKIT_FP32_K8") != "1":
                    rows.append(
                        (
                            f"K={k}",
                            tool,
                            {"error": "not run: needs more than 23 GB (MMT_BENCH_MERGEKIT_FP32_K8=1 runs it)"},
                        )
                    )
                    continue
                if _mem_available_gb() < need:
                    rows.append(
                        (
                            f"K={k}",
                            tool,
                            {"error": f"not run: {_mem_available_gb():.0f} GB free, needs about {need:.0f} GB"},
                        )
                    )
                    continue
                rows.append((f"K={k}", tool, run_mergekit(root, dirs, root / f"mk_k{k}_{int(fp32)}", fp32, mk)))
        title = "## Reduced shapes (6 layers, 64k vocabulary)" if small else "## Gemma 3 270M's full shapes"
        sweep_text = methods_section(root, dirs8[:5], mk, sweep, title) if sweep and mk is not None else ""
        if mk is not None:
            notes += fidelity(root, mk)
        else:
            notes.append("mergekit is not installed here (nor in MMT_MERGEKIT_PATH): only mmt was measured")
    lines = [
        title,
        "",
        f"TIES, density {DENSITY}, bf16 checkpoints with Gemma 3 270M's tensors"
        + (" (reduced: 6 layers, 64k vocabulary)" if small else "")
        + f", {n_params / 1e6:.0f}M parameters "
        f"each; {os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.0f} at the end: shared); "
        f"torch {torch.__version__}. Wall time of a fresh process (imports included), peak RSS (VmHWM) of "
        "that process. Inputs come from the page cache.",
        "",
        "| case | tool | wall s | peak RSS |",
        "|---|---|---|---|",
    ]
    for case, tool, r in rows:
        if r.get("error"):
            lines.append(f"| {case} | {tool} | {r['error']} | – |")
        else:
            lines.append(f"| {case} | {tool} | {r['wall_s']:.1f} | {r['rss_mb'] / 1024:.1f} GB |")
    lines += [""] + [f"- {n}" for n in notes] + [""]
    if sweep_text:
        lines += [sweep_text]
    section = "\n".join(lines)
    # One file, one section per shape set: a run replaces its own section and keeps the other.
    sections = {}
    if RESULTS.exists():
        for part in RESULTS.read_text().split("\n## ")[1:]:
            sections["## " + part.split("\n", 1)[0]] = "## " + part.rstrip() + "\n"
    sections[title] = section
    order = sorted(sections, key=lambda t: t.startswith("## Reduced"))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text("# mmt merge vs mergekit\n\n" + "\n".join(sections[t] for t in order))
    return section


def test_mmt_merge_vs_mergekit():
    print(main())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        write_checkpoints(Path(sys.argv[2]), int(sys.argv[3]), gemma3_270m_config(sys.argv[4] == "small"))
    else:
        print(main())

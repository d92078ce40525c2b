"""The streaming checkpoint merge: read K + 1 tensors, merge, write, drop; one parameter at a time."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from mmt.errors import MergeError

from .io import FLOAT_DTYPES, Checkpoint, StreamingWriter, TensorPlan, atomic_output
from .lora import merge_lora_adapters
from .methods import merge_tensor, sign_conflict
from .plan import MergeConfig, parse_size, plan_tensors, tensor_seed
from .report import MergeReport, peak_rss_mb, plot_stats, write_report_and_commit

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja", "added_tokens.json")


def merge_checkpoints(cfg: MergeConfig, progress: bool = True) -> MergeReport:
    """Merge ``cfg.models`` (into ``cfg.base_model``) and write ``cfg.output`` atomically."""
    from tqdm.auto import tqdm

    t0 = time.time()
    models = [Checkpoint(s.path) for s in cfg.models]
    base = Checkpoint(cfg.base_model) if cfg.base_model else None
    ref = base or models[0]
    plan = plan_tensors(cfg, models, base)
    output = Path(cfg.output)
    tmp = atomic_output(output, cfg.overwrite)
    report = MergeReport(output=str(output), method=cfg.method, num_models=len(models))
    weights = [s.weight for s in cfg.models]
    dens = cfg.densities(cfg.models)
    device = torch.device(cfg.device)
    backend = None if cfg.backend == "auto" else cfg.backend
    try:
        writer = StreamingWriter(tmp, plan, parse_size(cfg.shard_size))
        bar = tqdm(plan, desc=f"merge ({cfg.method}, K={len(models)})", unit="tensor", disable=not progress)
        for name, dtype, shape in bar:
            b = base.get(name) if base is not None else None
            xs = [ck.get(name) for ck in models]
            report.bytes_read += sum(x.nbytes for x in xs) + (b.nbytes if b is not None else 0)
            if not xs[0].is_floating_point():
                for spec, x in zip(cfg.models, xs):  # integer buffers are copied, but must agree
                    if not torch.equal(x, xs[0]):
                        raise MergeError(f"non-float tensor {name} differs between checkpoints ({spec.path})")
                writer.write(name, xs[0] if b is None else b)
                report.tensors_copied += 1
                continue
            work = dtype if dtype in FLOAT_DTYPES else torch.float32
            xs = [x.to(device=device, dtype=work) for x in xs]
            b = b.to(device=device, dtype=work) if b is not None else None
            merged = merge_tensor(xs, b, method=cfg.method, weights=weights, densities=dens, lam=cfg.lam,
                                  seed=tensor_seed(cfg.seed, name), sign=cfg.sign, backend=backend)
            if cfg.stats and b is not None:
                report.stats[name] = sign_conflict([x - b for x in xs])
            writer.write(name, merged.to(dtype))
            report.tensors_merged += 1
            report.parameters += merged.numel()
            del xs, b, merged
        writer.close()
        report.bytes_written = writer.total_bytes
        write_model_config(ref.path, tmp, plan)
        if cfg.copy_tokenizer:
            for f in TOKENIZER_FILES:
                if (ref.path / f).exists():
                    shutil.copy2(ref.path / f, tmp / f)
        report.seconds = time.time() - t0
        report.peak_rss_mb = peak_rss_mb()
        if cfg.stats and report.stats:
            (tmp / "merge_stats.json").write_text(json.dumps(report.stats, indent=1))
            if cfg.plot:
                plot_stats(report.stats, tmp / "merge_conflicts.png", report)
        write_report_and_commit(tmp, output, cfg.to_dict(), report)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def write_model_config(src: Path, dst: Path, plan: list[TensorPlan]) -> None:
    """The reference's config.json, with its dtype set to the output's (when the output has one float dtype)."""
    conf = src / "config.json"
    if not conf.exists():
        return
    data = json.loads(conf.read_text())
    float_dtypes = {d for _, d, _ in plan if d in FLOAT_DTYPES}
    if len(float_dtypes) == 1:
        name = str(next(iter(float_dtypes))).removeprefix("torch.")
        for key in ("torch_dtype", "dtype"):
            if key in data or key == "torch_dtype":
                data[key] = name
    (dst / "config.json").write_text(json.dumps(data, indent=2))


def run_merge(cfg: MergeConfig, progress: bool = True) -> MergeReport:
    """Merge LoRA adapters or full checkpoints, whichever the config names."""
    return merge_lora_adapters(cfg, progress) if cfg.adapters else merge_checkpoints(cfg, progress)

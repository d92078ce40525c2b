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
from .methods import merge_one, sign_conflict
from .plan import NAMED_DTYPES, MergeConfig, layer_count, parse_size, plan_tensors, tensor_seed, tensor_settings
from .report import MergeReport, peak_rss_mb, plot_stats, write_card_and_config, write_report_and_commit

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
    "added_tokens.json",
)


def merge_checkpoints(cfg: MergeConfig, progress: bool = True) -> MergeReport:
    """Merge ``cfg.models`` (into ``cfg.base_model``) and write ``cfg.output`` atomically."""
    from tqdm.auto import tqdm

    t0 = time.time()
    models = [Checkpoint(s.path) for s in cfg.models]
    base = Checkpoint(cfg.base_model) if cfg.base_model else None
    ref = base or models[0]
    plan = plan_tensors(cfg, models, base)
    num_layers = layer_count(ref.path, ref.names())
    settings = {name: tensor_settings(cfg, name, num_layers) for name, _, _ in plan}  # every bad value, up front
    tokenizer_dir = _tokenizer_source(cfg, ref.path)
    template = _chat_template(cfg)
    output = Path(cfg.output)
    tmp = atomic_output(output, cfg.overwrite)
    report = MergeReport(output=str(output), method=cfg.method, num_models=len(models))
    compute = NAMED_DTYPES[cfg.dtype] if cfg.dtype else None
    device = torch.device(cfg.device)
    backend = None if cfg.backend == "auto" else cfg.backend
    writer = None
    try:
        writer = StreamingWriter(tmp, plan, parse_size(cfg.shard_size))
        bar = tqdm(plan, desc=f"merge ({cfg.method}, K={len(models)})", unit="tensor", disable=not progress)
        inputs = models + ([base] if base is not None else [])
        for i, (name, dtype, shape) in enumerate(bar):
            if i + 1 < len(plan):
                for ck in inputs:
                    ck.prefetch(plan[i + 1][0])
            b = base.get(name) if base is not None else None
            xs = [ck.get(name) for ck in models]
            report.bytes_read += sum(x.nbytes for x in xs) + (b.nbytes if b is not None else 0)
            if not xs[0].is_floating_point():
                for spec, x in zip(cfg.models, xs):  # integer buffers are copied, but must agree
                    if not torch.equal(x, xs[0]):
                        raise MergeError(f"non-float tensor {name} differs between checkpoints ({spec.path})")
                writer.write(name, xs[0] if b is None else b)
                report.tensors_copied += 1
                for ck in inputs:
                    ck.release(name)
                continue
            work = compute or xs[0].dtype
            xs = [x.to(device=device, dtype=work) for x in xs]
            b = b.to(device=device, dtype=work) if b is not None else None
            merged = merge_one(cfg, name, xs, b, settings[name], tensor_seed(cfg.seed, name), backend)
            if cfg.stats and b is not None:
                report.stats[name] = sign_conflict([x - b for x in xs])
            writer.write(name, merged.to(dtype))
            report.tensors_merged += 1
            report.parameters += merged.numel()
            del xs, b, merged
            for ck in inputs:
                ck.release(name)
        writer.close()
        report.bytes_written = writer.total_bytes
        write_model_config(ref.path, tmp, plan)
        if tokenizer_dir is not None:
            for f in TOKENIZER_FILES:
                if (tokenizer_dir / f).exists():
                    shutil.copy2(tokenizer_dir / f, tmp / f)
        if template is not None:
            _write_chat_template(tmp, template)
        report.seconds = time.time() - t0
        report.peak_rss_mb = peak_rss_mb()
        if cfg.stats and report.stats:
            (tmp / "merge_stats.json").write_text(json.dumps(report.stats, indent=1))
            if cfg.plot:
                plot_stats(report.stats, tmp / "merge_conflicts.png", report)
        write_card_and_config(tmp, cfg, report)
        write_report_and_commit(tmp, output, cfg.to_dict(), report)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _tokenizer_source(cfg: MergeConfig, ref: Path) -> Path | None:
    """Where the output's tokenizer comes from: ``tokenizer_source`` (base or a path), else the reference model."""
    if not cfg.copy_tokenizer:
        return None
    src = cfg.tokenizer_source
    if src is None:
        return ref
    if src == "base":
        if not cfg.base_model:
            raise MergeError("tokenizer_source: base, but the config has no base_model")
        src = cfg.base_model
    path = Path(src)
    if not any((path / f).exists() for f in TOKENIZER_FILES[:5]):
        raise MergeError(f"tokenizer_source {src} has no tokenizer files ({', '.join(TOKENIZER_FILES[:5])})")
    return path


def _chat_template(cfg: MergeConfig) -> str | None:
    """``chat_template``: a Jinja template, or a file holding one."""
    value = cfg.chat_template
    if value is None:
        return None
    if "{%" in value or "{{" in value:
        return value
    path = Path(value)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise MergeError(
        f"chat_template {value!r} is neither a Jinja template nor a file holding one "
        "(named templates such as chatml are not built in)"
    )


def _write_chat_template(out: Path, template: str) -> None:
    """The template as ``chat_template.jinja``; a copy in tokenizer_config.json would compete with it, so it goes."""
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    conf = out / "tokenizer_config.json"
    if conf.exists():
        data = json.loads(conf.read_text(encoding="utf-8"))
        if data.pop("chat_template", None) is not None:
            conf.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


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

"""The streaming checkpoint merge: read K + 1 tensors, merge, write, drop; one parameter at a time."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from mmt.errors import MergeError

from .io import FLOAT_DTYPES, StreamingWriter, TensorPlan, atomic_output
from .lora import merge_lora_adapters
from .methods import merge_one, sign_conflict
from .plan import NAMED_DTYPES, PASSTHROUGH, MergeConfig, parse_size, plan_merge, tensor_seed
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
    """Merge ``cfg.models`` (into ``cfg.base_model``), or build ``cfg.slices``, and write ``cfg.output`` atomically."""
    from tqdm.auto import tqdm

    t0 = time.time()
    mp = plan_merge(cfg)  # every input, shape and setting checked before the output exists
    jobs, ref = mp.jobs, mp.reference
    plan = [(j.name, j.dtype, j.shape) for j in jobs]
    tokenizer_dir = _tokenizer_source(cfg, ref.path)
    template = _chat_template(cfg)
    output = Path(cfg.output)
    tmp = atomic_output(output, cfg.overwrite)
    num_inputs = len({ck.path for j in jobs for ck, _ in j.inputs + ([j.base] if j.base else [])})
    report = MergeReport(output=str(output), method=cfg.method, num_models=len(cfg.models) or num_inputs)
    compute = NAMED_DTYPES[cfg.dtype] if cfg.dtype else None
    device = torch.device(cfg.device)
    backend = None if cfg.backend == "auto" else cfg.backend
    writer = None
    try:
        writer = StreamingWriter(tmp, plan, parse_size(cfg.shard_size))
        desc = f"merge ({cfg.method}, " + (f"{len(cfg.slices)} slices)" if cfg.slices else f"K={len(cfg.models)})")
        bar = tqdm(jobs, desc=desc, unit="tensor", disable=not progress)
        for i, job in enumerate(bar):
            reads = job.inputs + ([job.base] if job.base is not None else [])
            if i + 1 < len(jobs):
                nxt = jobs[i + 1]
                for ck, n in nxt.inputs + ([nxt.base] if nxt.base is not None else []):
                    ck.prefetch(n)
            name, dtype, jcfg, s = job.name, job.dtype, job.cfg, job.settings
            b = job.base[0].get(job.base[1]) if job.base is not None else None
            xs = [ck.get(n) for ck, n in job.inputs]
            report.bytes_read += sum(x.nbytes for x in xs) + (b.nbytes if b is not None else 0)
            if not xs[0].is_floating_point():
                for (ck, _), x in zip(job.inputs, xs):  # integer buffers are copied, but must agree
                    if not torch.equal(x, xs[0]):
                        raise MergeError(f"non-float tensor {name} differs between checkpoints ({ck.path})")
                writer.write(name, xs[0] if b is None else b)
                report.tensors_copied += 1
                for ck, n in reads:
                    ck.release(n)
                continue
            work = compute or xs[0].dtype
            xs = [x.to(device=device, dtype=work) for x in xs]
            b = b.to(device=device, dtype=work) if b is not None else None
            if jcfg.method == PASSTHROUGH:  # mergekit's: the one input, times its scale if it has one
                merged = xs[0] if s.scales[0] is None else xs[0] * s.scales[0]
                report.tensors_copied += 1
            else:
                merged = merge_one(jcfg, name, xs, b, s, tensor_seed(cfg.seed, name), backend)
                report.tensors_merged += 1
            if cfg.stats and b is not None:
                report.stats[name] = sign_conflict([x - b for x in xs])
            writer.write(name, merged.to(dtype))
            report.parameters += merged.numel()
            del xs, b, merged
            for ck, n in reads:
                ck.release(n)
        writer.close()
        report.bytes_written = writer.total_bytes
        write_model_config(ref.path, tmp, plan, mp.layers)
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


# Per-layer lists in a config: rebuilt from the source layers when slices restack the layers (Gemma 3's
# sliding/full attention pattern, SmolLM3's rope-less layers). mergekit sets only the layer count, so such an
# output fails transformers' check that layer_types has num_hidden_layers entries.
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")


def _layer_node(data: dict) -> dict:
    """The part of a config.json that counts the layers (the top level, or ``text_config``)."""
    for node in (data, data.get("text_config") or {}):
        if isinstance(node.get("num_hidden_layers"), int):
            return node
    return data


def write_model_config(
    src: Path, dst: Path, plan: list[TensorPlan], layers: list[tuple[Path, int]] | None = None
) -> None:
    """The reference's config.json, with its dtype set to the output's (when the output has one float dtype);
    with ``layers`` (slices: each output layer's source checkpoint and layer), the layer count and the per-layer
    lists are the output's."""
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
    if layers is not None:
        node = _layer_node(data)
        node["num_hidden_layers"] = len(layers)
        sources: dict[Path, dict] = {}
        for key in PER_LAYER_KEYS:
            if key not in node:
                continue
            values = []
            for path, index in layers:
                if path not in sources:
                    f = path / "config.json"
                    sources[path] = _layer_node(json.loads(f.read_text())) if f.exists() else {}
                per_layer = sources[path].get(key)
                if not isinstance(per_layer, list) or index >= len(per_layer):
                    raise MergeError(
                        f"cannot write {key} of the output's layer {len(values)}: {path / 'config.json'} has no "
                        f"{key} entry for its layer {index}"
                    )
                values.append(per_layer[index])
            node[key] = values
    (dst / "config.json").write_text(json.dumps(data, indent=2))


def run_merge(cfg: MergeConfig, progress: bool = True) -> MergeReport:
    """Merge LoRA adapters or full checkpoints, whichever the config names."""
    return merge_lora_adapters(cfg, progress) if cfg.adapters else merge_checkpoints(cfg, progress)

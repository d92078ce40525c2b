"""``mmt merge``: streaming merge of Hugging Face checkpoints (and LoRA adapters) through mmt_kernels.

Checkpoints are read tensor by tensor with ``safetensors.safe_open`` (single file or sharded with
``model.safetensors.index.json``) and written tensor by tensor: the output's shard layout and
safetensors headers are planned from the base's shapes before any merging, so each merged tensor
goes to disk as soon as it exists. Peak memory is the K + 1 input tensors and one output tensor of
the largest parameter, never a whole model. The output appears atomically: everything is written
to a hidden temporary directory next to it and renamed at the end, so a killed merge leaves no
directory that looks like a finished checkpoint.

YAML config (every key but ``models``/``adapters`` and ``output`` has a default)::

    method: ties                # linear | task_arithmetic | ties | dare_linear | dare_ties
    base_model: runs/base       # needed by every method but linear
    models:                     # K fine-tuned checkpoints: a path, or {path, weight, density}
      - {path: runs/group1/final, weight: 1.0}
      - runs/group2/final
    density: 0.2                # TIES: fraction kept per task and tensor; DARE: keep probability
    lam: 1.0                    # scale of the merged task vector
    sign: total                 # TIES sign election: total | count
    seed: 0                     # DARE drop mask (mixed with each tensor's name)
    dtype: null                 # output dtype (float32 | bfloat16 | float16); default: the base's
    output: runs/merged
    shard_size: 2GB
    device: cpu                 # or cuda: merge math on the GPU, I/O on the host
    backend: auto               # mmt_kernels backend (auto | reference | cpu | triton | cuda)
    stats: false                # per-tensor sign-conflict statistics (merge_stats.json, + plot)

LoRA adapters instead of full checkpoints: ``adapters: [dir, ...]`` (peft adapter directories),
``lora_mode: svd`` (dense ``s*B@A`` per module, merged, truncated back to ``rank`` by SVD) or
``factor`` (merge the A and B factors separately with weights sqrt(w * scaling), as peft's
``add_weighted_adapter`` does for TIES/DARE). The result is a peft adapter directory.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_NAMED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
_COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja", "added_tokens.json")


class MergeError(ValueError):
    """Inputs that cannot be merged; the message names the tensor and the file."""


# ------------------------------------------------------------------------------------------
# config


@dataclass
class ModelSpec:
    path: str
    weight: float = 1.0
    density: float | None = None


@dataclass
class MergeConfig:
    method: str = "ties"
    base_model: str | None = None
    models: list[ModelSpec] = field(default_factory=list)
    adapters: list[ModelSpec] = field(default_factory=list)
    density: float = 0.2
    lam: float = 1.0
    sign: str = "total"
    seed: int = 0
    dtype: str | None = None
    output: str = "merged"
    shard_size: str | int = "2GB"
    device: str = "cpu"
    backend: str = "auto"
    stats: bool = False
    plot: bool = True
    lora_mode: str = "svd"
    rank: int | None = None
    overwrite: bool = False
    copy_tokenizer: bool = True

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "<merge config>") -> "MergeConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise MergeError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        values = dict(raw)
        for key in ("models", "adapters"):
            specs = []
            for i, item in enumerate(values.get(key) or []):
                if isinstance(item, str):
                    specs.append(ModelSpec(item))
                elif isinstance(item, dict) and "path" in item and set(item) <= {"path", "weight", "density"}:
                    specs.append(ModelSpec(str(item["path"]), float(item.get("weight", 1.0)),
                                           None if item.get("density") is None else float(item["density"])))
                else:
                    raise MergeError(f"{where}: {key}[{i}] must be a path or {{path, weight, density}}, got {item!r}")
            values[key] = specs
        cfg = cls(**values)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "<merge config>") -> None:
        from mmt_kernels.reference.merge import METHODS

        if self.method not in METHODS:
            raise MergeError(f"{where}: method {self.method!r} is not one of {', '.join(METHODS)}")
        if bool(self.models) == bool(self.adapters):
            raise MergeError(f"{where}: give exactly one of 'models' (checkpoints) or 'adapters' (LoRA)")
        if self.models and self.method != "linear" and not self.base_model:
            raise MergeError(f"{where}: method {self.method!r} needs base_model (task vectors are model - base)")
        if self.sign not in ("total", "count"):
            raise MergeError(f"{where}: sign must be 'total' or 'count', got {self.sign!r}")
        if self.dtype is not None and self.dtype not in _NAMED_DTYPES:
            raise MergeError(f"{where}: dtype must be one of {sorted(_NAMED_DTYPES)} or null, got {self.dtype!r}")
        if self.lora_mode not in ("svd", "factor"):
            raise MergeError(f"{where}: lora_mode must be 'svd' or 'factor', got {self.lora_mode!r}")
        for spec in self.models + self.adapters:
            d = self.density if spec.density is None else spec.density
            if not 0.0 <= d <= 1.0 or (self.method.startswith("dare") and d == 0.0):
                raise MergeError(f"{where}: density {d} for {spec.path} is outside the method's range")

    def densities(self, specs: list[ModelSpec]) -> list[float]:
        return [self.density if s.density is None else s.density for s in specs]


def load_merge_config(path: str | Path | None, overrides: Iterable[str] = ()) -> MergeConfig:
    import yaml

    raw: dict[str, Any] = {}
    where = "<command line>"
    if path is not None:
        where = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"merge config {path} does not exist") from None
        if "merge" in raw and isinstance(raw["merge"], dict) and len(raw) == 1:
            raw = raw["merge"]  # a `merge:` section is accepted too
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise MergeError(f"override {item!r} must look like key=value")
        raw[key.removeprefix("merge.")] = yaml.safe_load(value)
    return MergeConfig.from_dict(raw, where)


def parse_size(value: str | int) -> int:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)i?B?\s*", str(value).upper())
    if not m:
        raise MergeError(f"shard_size {value!r} must look like 500MB, 2GB or a byte count")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


# ------------------------------------------------------------------------------------------
# reading


class Checkpoint:
    """Tensor-by-tensor access to a safetensors checkpoint directory (single file or sharded)."""

    def __init__(self, path: str | Path, weights_name: str = "model"):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MergeError(f"checkpoint {self.path} is not a directory")
        index = self.path / f"{weights_name}.safetensors.index.json"
        single = self.path / f"{weights_name}.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise MergeError(f"{index}: not a valid safetensors index ({exc})") from None
            self.files = {name: self.path / f for name, f in weight_map.items()}
        elif single.exists():
            self.files = {name: single for name in self._open(single).keys()}
        else:
            raise MergeError(f"checkpoint {self.path} has neither {single.name} nor {index.name} "
                             "(only safetensors checkpoints are streamed; re-save with safe_serialization=True)")
        self._handles: dict[Path, Any] = {}

    def _open(self, file: Path):
        from safetensors import safe_open

        if file in getattr(self, "_handles", {}):
            return self._handles[file]
        if not file.exists():
            raise MergeError(f"shard {file} listed in the index of {self.path} is missing")
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
            raise MergeError(f"cannot read shard {file}: {exc} (corrupt or truncated?)") from None
        if hasattr(self, "_handles"):
            self._handles[file] = handle
        return handle

    def names(self) -> list[str]:
        return list(self.files)

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        sl = self._open(self.files[name]).get_slice(name)
        dtype = {v: k for k, v in _ST_DTYPES.items()}.get(sl.get_dtype())
        if dtype is None:
            raise MergeError(f"tensor {name} in {self.files[name]} has unsupported dtype {sl.get_dtype()}")
        return dtype, tuple(sl.get_shape())

    def get(self, name: str) -> torch.Tensor:
        file = self.files.get(name)
        if file is None:
            raise MergeError(f"tensor {name} is missing from checkpoint {self.path}")
        try:
            return self._open(file).get_tensor(name)
        except MergeError:
            raise
        except Exception as exc:
            raise MergeError(f"cannot read tensor {name} from {file}: {exc} (corrupt shard?)") from None


# ------------------------------------------------------------------------------------------
# writing


class StreamingWriter:
    """Writes a sharded safetensors checkpoint whose layout is planned up front.

    The header of each shard (names, dtypes, shapes, offsets) is known before merging, so every
    tensor is written at its offset as soon as it is computed and then dropped.
    """

    def __init__(self, out_dir: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], shard_bytes: int,
                 weights_name: str = "model"):
        self.dir = out_dir
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for item in plan:
            nbytes = _nbytes(item[1], item[2])
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += nbytes
        n = len(shards)
        self.names = ([f"{weights_name}.safetensors"] if n == 1 else
                      [f"{weights_name}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.where: dict[str, tuple[int, int]] = {}  # tensor -> (shard, absolute byte offset)
        self.handles = []
        self.total_bytes = 0
        for i, items in enumerate(shards):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, dtype, shape in items:
                nbytes = _nbytes(dtype, shape)
                header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
            f = open(out_dir / self.names[i], "wb")
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            start = 8 + len(blob)
            f.truncate(start + offset)
            for name, _, _ in items:
                self.where[name] = (i, start + header[name]["data_offsets"][0])
            self.handles.append(f)
            self.total_bytes += offset
        self.expected = {name: (dtype, shape) for name, dtype, shape in plan}
        self.written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = self.expected[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise MergeError(f"internal: {name} planned as {dtype}{list(shape)}, got {tensor.dtype}{list(tensor.shape)}")
        shard, offset = self.where[name]
        f = self.handles[shard]
        f.seek(offset)
        t = tensor.detach().contiguous().cpu()
        f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        self.written.add(name)

    def close(self) -> None:
        for f in self.handles:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        missing = set(self.expected) - self.written
        if missing:
            raise MergeError(f"internal: tensors never written: {sorted(missing)[:5]}")
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {name: self.names[self.where[name][0]] for name in self.expected}}
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _atomic_output(output: Path, overwrite: bool) -> Path:
    if output.exists() and not overwrite:
        raise MergeError(f"output {output} already exists; remove it or set overwrite: true")
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f".{output.name}.tmp-*"):  # left by a killed merge
        shutil.rmtree(stale, ignore_errors=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    return tmp


def _commit(tmp: Path, output: Path) -> None:
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output)


# ------------------------------------------------------------------------------------------
# merging checkpoints


@dataclass
class MergeReport:
    output: str
    method: str
    num_models: int
    tensors_merged: int = 0
    tensors_copied: int = 0
    parameters: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        gbps = self.bytes_read / max(self.seconds, 1e-9) / 1e9
        lines = [f"merged {self.num_models} models with {self.method}: {self.tensors_merged} tensors merged, "
                 f"{self.tensors_copied} copied from the base, {self.parameters:,} parameters",
                 f"read {self.bytes_read / 1e9:.2f} GB, wrote {self.bytes_written / 1e9:.2f} GB in "
                 f"{self.seconds:.1f} s ({gbps:.2f} GB/s read), peak RSS {self.peak_rss_mb:.0f} MB",
                 f"output: {self.output}"]
        if self.stats:
            rates = [s["sign_conflict"] for s in self.stats.values()]
            lines.append(f"sign conflict (elements where the kept task values disagree in sign): mean "
                         f"{sum(rates) / len(rates):.3f}, max {max(rates):.3f} over {len(rates)} tensors")
        lines += self.notes
        return "\n".join(lines)


def tensor_seed(seed: int, name: str) -> int:
    """DARE seed for one tensor: equal-sized tensors must not share a drop pattern."""
    return (seed ^ zlib.crc32(name.encode())) & 0xFFFFFFFF


def sign_conflict(task_vectors: list[torch.Tensor]) -> dict[str, float]:
    """Among elements where at least two tasks are nonzero, the fraction whose signs disagree."""
    pos = sum((t > 0).to(torch.int32) for t in task_vectors)
    neg = sum((t < 0).to(torch.int32) for t in task_vectors)
    active = (pos + neg) >= 2
    n_active = int(active.sum())
    conflict = int((active & (pos > 0) & (neg > 0)).sum())
    return {"sign_conflict": conflict / max(n_active, 1), "active_fraction": n_active / max(pos.numel(), 1)}


def merge_checkpoints(cfg: MergeConfig, progress: bool = True) -> MergeReport:
    """Merge ``cfg.models`` (into ``cfg.base_model``) and write ``cfg.output`` atomically."""
    from tqdm.auto import tqdm

    from mmt_kernels import merge as kmerge

    t0 = time.time()
    models = [Checkpoint(s.path) for s in cfg.models]
    base = Checkpoint(cfg.base_model) if cfg.base_model else None
    ref = base or models[0]
    names = ref.names()
    name_set = set(names)
    for spec, ck in zip(cfg.models, models):
        missing = [n for n in names if n not in ck.files]
        extra = [n for n in ck.files if n not in name_set]
        if missing or extra:
            what = (f"is missing tensor {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
                    if missing else f"has tensor {extra[0]!r} that {ref.path} lacks")
            raise MergeError(f"checkpoint {spec.path} {what}; all checkpoints must have the same tensors")
    out_dtype = _NAMED_DTYPES[cfg.dtype] if cfg.dtype else None
    plan = []
    for n in names:
        dtype, shape = ref.meta(n)
        for spec, ck in zip(cfg.models, models):
            d2, s2 = ck.meta(n)
            if s2 != shape:
                raise MergeError(f"tensor {n}: shape {list(s2)} in {ck.files[n]} but {list(shape)} in {ref.files[n]}")
            if d2 != dtype and out_dtype is None:
                raise MergeError(f"tensor {n}: dtype {d2} in {ck.files[n]} but {dtype} in {ref.files[n]}; "
                                 "set `dtype:` in the merge config to convert every input to one dtype")
        plan.append((n, out_dtype if (out_dtype is not None and dtype in _FLOAT) else dtype, shape))

    output = Path(cfg.output)
    tmp = _atomic_output(output, cfg.overwrite)
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
            report.bytes_read += sum(x.numel() * x.element_size() for x in xs) + (b.nbytes if b is not None else 0)
            if not xs[0].is_floating_point():
                for spec, x in zip(cfg.models, xs):  # integer buffers are copied, but must agree
                    if not torch.equal(x, xs[0]):
                        raise MergeError(f"non-float tensor {name} differs between checkpoints ({spec.path})")
                writer.write(name, xs[0] if b is None else b)
                report.tensors_copied += 1
                continue
            work = dtype if dtype in _FLOAT else torch.float32
            xs = [x.to(device=device, dtype=work) for x in xs]
            b = b.to(device=device, dtype=work) if b is not None else None
            merged = kmerge.merge(xs, b, method=cfg.method, weights=weights, density=dens, lam=cfg.lam,
                                  seed=tensor_seed(cfg.seed, name), sign=cfg.sign, backend=backend)
            if cfg.stats and b is not None:
                report.stats[name] = sign_conflict([x - b for x in xs])
            writer.write(name, merged.to(dtype))
            report.tensors_merged += 1
            report.parameters += merged.numel()
            del xs, b, merged
        writer.close()
        report.bytes_written = writer.total_bytes
        _write_config(ref.path, tmp, plan, cfg)
        if cfg.copy_tokenizer:
            for f in _COPY_FILES:
                if (ref.path / f).exists():
                    shutil.copy2(ref.path / f, tmp / f)
        report.seconds = time.time() - t0
        report.peak_rss_mb = _peak_rss_mb()
        if cfg.stats and report.stats:
            (tmp / "merge_stats.json").write_text(json.dumps(report.stats, indent=1))
            if cfg.plot:
                _plot_stats(report.stats, tmp / "merge_conflicts.png", report)
        _write_report_and_commit(tmp, output, cfg, report)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _write_config(src: Path, dst: Path, plan, cfg: MergeConfig) -> None:
    conf = src / "config.json"
    if not conf.exists():
        return
    data = json.loads(conf.read_text())
    float_dtypes = {d for _, d, _ in plan if d in _FLOAT}
    if len(float_dtypes) == 1:
        name = str(next(iter(float_dtypes))).removeprefix("torch.")
        for key in ("torch_dtype", "dtype"):
            if key in data or key == "torch_dtype":
                data[key] = name
    (dst / "config.json").write_text(json.dumps(data, indent=2))


def _write_report_and_commit(tmp: Path, output: Path, cfg: MergeConfig, report: "MergeReport") -> None:
    """The last file of a merge, then the atomic rename that makes the output visible."""
    (tmp / "merge_report.json").write_text(json.dumps(
        {"config": _cfg_dict(cfg), **{k: v for k, v in report.__dict__.items() if k != "stats"}}, indent=2))
    _commit(tmp, output)


def _cfg_dict(cfg: MergeConfig) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(cfg)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _plot_stats(stats: dict[str, dict[str, float]], path: Path, report: MergeReport) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        report.notes.append("matplotlib is not installed: no conflict plot")
        return
    names = list(stats)
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.12), 3.5))
    ax.bar(range(len(names)), [stats[n]["sign_conflict"] for n in names])
    ax.set_ylabel("sign conflict rate")
    ax.set_xlabel("tensor (checkpoint order)")
    ax.set_title(f"{report.method}: sign disagreement among active task values")
    from mmt.plots import save_figure

    save_figure(fig, path)


# ------------------------------------------------------------------------------------------
# LoRA adapters


@dataclass
class LoraAdapter:
    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @classmethod
    def load(cls, path: str | Path) -> "LoraAdapter":
        from safetensors.torch import load_file

        p = Path(path)
        conf, weights = p / "adapter_config.json", p / "adapter_model.safetensors"
        for f in (conf, weights):
            if not f.exists():
                raise MergeError(f"LoRA adapter {p} has no {f.name}")
        try:
            tensors = load_file(str(weights))
        except Exception as exc:
            raise MergeError(f"cannot read {weights}: {exc} (corrupt?)") from None
        return cls(p, json.loads(conf.read_text()), tensors)

    def scaling(self, module: str) -> float:
        r = self.config.get("rank_pattern", {}).get(module, self.config["r"])
        alpha = self.config.get("alpha_pattern", {}).get(module, self.config["lora_alpha"])
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def modules(self) -> list[str]:
        return sorted({k.rsplit(".lora_A", 1)[0] for k in self.tensors if ".lora_A" in k})

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        a = next((v for k, v in self.tensors.items() if k.startswith(module + ".lora_A")), None)
        b = next((v for k, v in self.tensors.items() if k.startswith(module + ".lora_B")), None)
        if a is None or b is None:
            raise MergeError(f"LoRA adapter {self.path}: module {module} lacks lora_A or lora_B")
        return a, b


def merge_lora_adapters(cfg: MergeConfig, progress: bool = True) -> MergeReport:
    """Merge peft LoRA adapters into one adapter (``lora_mode`` svd or factor); atomic output."""
    from tqdm.auto import tqdm

    from mmt_kernels import merge as kmerge

    t0 = time.time()
    adapters = [LoraAdapter.load(s.path) for s in cfg.adapters]
    mods = adapters[0].modules()
    for spec, ad in zip(cfg.adapters, adapters):
        if ad.modules() != mods:
            diff = sorted(set(mods) ^ set(ad.modules()))
            raise MergeError(f"LoRA adapter {spec.path} targets different modules (e.g. {diff[0]}) "
                             f"than {cfg.adapters[0].path}")
    weights = [s.weight for s in cfg.adapters]
    dens = cfg.densities(cfg.adapters)
    backend = None if cfg.backend == "auto" else cfg.backend
    ranks = sorted({ad.config["r"] for ad in adapters})
    if cfg.lora_mode == "factor" and len(ranks) > 1:
        raise MergeError(f"lora_mode: factor needs adapters of one rank, got ranks {ranks}; use lora_mode: svd")
    rank = cfg.rank or max(ranks)
    out_t: dict[str, torch.Tensor] = {}
    report = MergeReport(output=cfg.output, method=f"{cfg.method} ({cfg.lora_mode})", num_models=len(adapters))
    errors = []
    # peft's ties/dare methods take no base: a method that needs one works on the deltas directly.
    for mod in tqdm(mods, desc=f"merge LoRA ({cfg.lora_mode})", unit="module", disable=not progress):
        facs = [ad.factors(mod) for ad in adapters]
        a_key = next(k for k in adapters[0].tensors if k.startswith(mod + ".lora_A"))
        b_key = next(k for k in adapters[0].tensors if k.startswith(mod + ".lora_B"))
        dtype = facs[0][0].dtype
        seed = tensor_seed(cfg.seed, mod)
        if cfg.lora_mode == "svd":
            deltas = [ad.scaling(_peft_module_key(mod)) * (b.float() @ a.float()) for ad, (a, b) in zip(adapters, facs)]
            dense = kmerge.merge(deltas, None, method=cfg.method if cfg.method != "linear" else "task_arithmetic",
                                 weights=weights, density=dens, lam=cfg.lam, seed=seed, sign=cfg.sign,
                                 backend=backend)
            u, s, vh = torch.linalg.svd(dense, full_matrices=False)
            r = min(rank, s.numel())
            root = s[:r].sqrt()
            new_b, new_a = u[:, :r] * root, root[:, None] * vh[:r]
            approx = new_b @ new_a
            errors.append(float((dense - approx).norm() / dense.norm().clamp_min(1e-30)))
            out_t[a_key], out_t[b_key] = new_a.to(dtype).contiguous(), new_b.to(dtype).contiguous()
        else:
            # As peft's add_weighted_adapter: each factor carries sqrt(w * scaling).
            roots = [math.sqrt(abs(w) * ad.scaling(_peft_module_key(mod))) for w, ad in zip(weights, adapters)]
            signs = [1.0 if w >= 0 else -1.0 for w in weights]
            method = cfg.method if cfg.method != "linear" else "task_arithmetic"
            new_a = kmerge.merge([a.float() for a, _ in facs], None, method=method,
                                 weights=[r_ * sg for r_, sg in zip(roots, signs)], density=dens, lam=1.0, seed=seed,
                                 sign=cfg.sign, backend=backend)
            new_b = kmerge.merge([b.float() for _, b in facs], None, method=method, weights=roots, density=dens,
                                 lam=cfg.lam, seed=seed + 1, sign=cfg.sign, backend=backend)
            out_t[a_key], out_t[b_key] = new_a.to(dtype), new_b.to(dtype)
        report.tensors_merged += 2
        report.parameters += out_t[a_key].numel() + out_t[b_key].numel()
    output = Path(cfg.output)
    tmp = _atomic_output(output, cfg.overwrite)
    try:
        from safetensors.torch import save_file

        save_file(out_t, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        conf = dict(adapters[0].config)
        new_r = rank if cfg.lora_mode == "svd" else ranks[0]
        conf.update(r=new_r, lora_alpha=new_r, use_rslora=False, rank_pattern={}, alpha_pattern={})
        (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2))
        report.bytes_written = sum(t.nbytes for t in out_t.values())
        report.seconds = time.time() - t0
        report.peak_rss_mb = _peak_rss_mb()
        if errors:
            report.notes.append(f"SVD truncation to rank {rank}: relative Frobenius error mean "
                                f"{sum(errors) / len(errors):.4f}, max {max(errors):.4f} over {len(errors)} modules")
        else:
            report.notes.append("factor-space merge (peft-style): the product of merged factors is not the merged "
                                "product; use lora_mode: svd for the dense definition")
        _write_report_and_commit(tmp, output, cfg, report)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _peft_module_key(module: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj' -> the key peft uses in rank/alpha patterns."""
    return module.removeprefix("base_model.model.")


def run_merge(cfg: MergeConfig, progress: bool = True) -> MergeReport:
    return merge_lora_adapters(cfg, progress) if cfg.adapters else merge_checkpoints(cfg, progress)


# ------------------------------------------------------------------------------------------
# CLI


def add_args(p: argparse.ArgumentParser) -> None:
    p.epilog = """examples:
  mmt merge examples/merge/ties.yaml
  mmt merge merge.yaml output=runs/merged_d03 density=0.3 method=dare_ties seed=1
  mmt merge merge.yaml stats=true        # also write merge_stats.json and merge_conflicts.png

The output directory appears only when the merge has finished (written to a hidden temporary
directory next to it, then renamed). Config keys: see `python -c "import mmt.merge; help(mmt.merge)"`."""
    p.add_argument("config", nargs="?", help="YAML merge config (method, base_model, models or adapters, ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. density=0.3")
    p.add_argument("--output", "-o", help="output directory (overrides `output`)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"output={args.output}")
    if args.overwrite:
        overrides.append("overwrite=true")
    try:
        cfg = load_merge_config(args.config, overrides)
        report = run_merge(cfg, progress=not args.no_progress)
    except MergeError as exc:
        import sys

        print(f"mmt merge: error: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0

"""What a merge does: its config (YAML -> :class:`MergeConfig`), which tensors it writes, and each one's settings."""
from __future__ import annotations

import dataclasses
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from mmt.config import parse_value
from mmt.errors import MergeError, MmtError

from .io import FLOAT_DTYPES, Checkpoint, TensorPlan

NAMED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# TEMPORARY shim: mmt.config.check_keys(cls_or_names, values, where) replaces this once it exists.
def check_keys(cls_or_names, values: dict[str, Any], where: str) -> None:
    known = set(cls_or_names.__dataclass_fields__) if hasattr(cls_or_names, "__dataclass_fields__") \
        else set(cls_or_names)
    unknown = sorted(set(values) - known)
    if unknown:
        raise MergeError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")


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
        try:
            check_keys(cls, raw, where)
        except MmtError as exc:  # the shared check raises ConfigError; a merge config's mistakes are MergeErrors
            raise MergeError(str(exc)) from None
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
        if self.dtype is not None and self.dtype not in NAMED_DTYPES:
            raise MergeError(f"{where}: dtype must be one of {sorted(NAMED_DTYPES)} or null, got {self.dtype!r}")
        if self.lora_mode not in ("svd", "factor"):
            raise MergeError(f"{where}: lora_mode must be 'svd' or 'factor', got {self.lora_mode!r}")
        for spec in self.models + self.adapters:
            d = self.density if spec.density is None else spec.density
            if not 0.0 <= d <= 1.0 or (self.method.startswith("dare") and d == 0.0):
                raise MergeError(f"{where}: density {d} for {spec.path} is outside the method's range")

    def densities(self, specs: list[ModelSpec]) -> list[float]:
        return [self.density if s.density is None else s.density for s in specs]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_merge_config(path: str | Path | None, overrides: Iterable[str] = ()) -> MergeConfig:
    """Read a merge YAML (top level, or one ``merge:`` section) and apply ``key=value`` overrides."""
    import yaml

    raw: dict[str, Any] = {}
    where = "<command line>"
    if path is not None:
        where = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise MergeError(f"merge config {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise MergeError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise MergeError(f"{path}: the top level must be a mapping of merge keys")
        if "merge" in raw and isinstance(raw["merge"], dict) and len(raw) == 1:
            raw = raw["merge"]  # a `merge:` section is accepted too
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise MergeError(f"override {item!r} must look like key=value")
        raw[key.strip().removeprefix("merge.")] = parse_value(value)
    return MergeConfig.from_dict(raw, where)


def parse_size(value: str | int) -> int:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)i?B?\s*", str(value).upper())
    if not m:
        raise MergeError(f"shard_size {value!r} must look like 500MB, 2GB or a byte count")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def tensor_seed(seed: int, name: str) -> int:
    """DARE seed for one tensor: equal-sized tensors must not share a drop pattern."""
    return (seed ^ zlib.crc32(name.encode())) & 0xFFFFFFFF


def plan_tensors(cfg: MergeConfig, models: list[Checkpoint], base: Checkpoint | None) -> list[TensorPlan]:
    """The output's tensors in the reference checkpoint's order; refuses inputs that do not line up."""
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
    out_dtype = NAMED_DTYPES[cfg.dtype] if cfg.dtype else None
    plan = []
    for n in names:
        dtype, shape = ref.meta(n)
        for ck in models:
            d2, s2 = ck.meta(n)
            if s2 != shape:
                raise MergeError(f"tensor {n}: shape {list(s2)} in {ck.files[n]} but {list(shape)} in {ref.files[n]}")
            if d2 != dtype and out_dtype is None:
                raise MergeError(f"tensor {n}: dtype {d2} in {ck.files[n]} but {dtype} in {ref.files[n]}; "
                                 "set `dtype:` in the merge config to convert every input to one dtype")
        plan.append((n, out_dtype if (out_dtype is not None and dtype in FLOAT_DTYPES) else dtype, shape))
    return plan

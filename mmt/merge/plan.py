"""What a merge does: its config (YAML -> :class:`MergeConfig`), which tensors it writes, and each one's settings.

A numeric setting (``weight``, ``density``, ``lam``, ``epsilon``, ``gamma``, ``t``, ``select_topk``) is given
globally or per model (``select_topk`` globally only), and may be

* a number: the same for every tensor;
* a gradient, a list of numbers: interpolated over the layers, the first value at layer 0 and the last at
  the last layer (tensors outside the layers, such as embeddings, take the first value);
* a list of filters, ``[{filter: self_attn, value: 0.3}, {filter: mlp, value: [0.1, 0.5]}, {value: 0.2}]``:
  the first entry whose ``filter`` occurs in the tensor's name applies (no filter, or ``*``, matches all).

These are mergekit's rules, so its configs mean the same here; a model's own setting wins over the global one.
"""

from __future__ import annotations

import dataclasses
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from mmt.config import check_keys, parse_value
from mmt.errors import MergeError, MmtError

from .io import FLOAT_DTYPES, Checkpoint, TensorPlan

NAMED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
KERNEL_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
METHODS = KERNEL_METHODS + ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "slerp", "model_stock")
METHODS += ("nuslerp", "sce")
NO_BASE_METHODS = ("linear", "nuslerp")  # the methods base_model is optional for
# Methods that elect a sign per element and combine only the agreeing task values.
CONSENSUS_METHODS = ("ties", "dare_ties", "breadcrumbs_ties", "della")
# numeric, per tensor (filters, gradients)
SETTINGS = ("weight", "density", "lam", "epsilon", "gamma", "t", "select_topk")
MODEL_SETTINGS = ("weight", "density", "epsilon", "gamma")  # may also be set per model


def _check_setting(value: Any, where: str) -> None:
    """A setting's shape: number | [numbers] | [{filter?, value}] (values nested the same way)."""
    if isinstance(value, bool) or value is None:
        raise MergeError(
            f"{where}: expected a number, a gradient [numbers] or filters [{{filter, value}}], got {value!r}"
        )
    if isinstance(value, (int, float)):
        return
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise MergeError(
            f"{where}: expected a number, a gradient [numbers] or filters [{{filter, value}}], got {value!r}"
        )
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return
    for i, cond in enumerate(value):
        if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
            raise MergeError(
                f"{where}[{i}]: a filter entry is {{filter: <part of a tensor name>, value: ...}}, got {cond!r}"
            )
        _check_setting(cond["value"], f"{where}[{i}].value")


def evaluate_setting(value: Any, name: str, t: float) -> float | None:
    """The number a setting gives tensor ``name`` at relative depth ``t`` in [0, 1]; None if no filter matches."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        value = [value]
    if all(isinstance(v, (int, float)) for v in value):
        scaled = t * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * float(value[i0]) + frac * float(value[i1])
    for cond in value:
        flt = cond.get("filter")
        if flt is None or flt == "*" or str(flt) in name:
            return evaluate_setting(cond["value"], name, t)
    return None


@dataclass
class ModelSpec:
    """One input model; a setting left None takes the global one."""

    path: str
    weight: Any = 1.0
    density: Any = None
    epsilon: Any = None
    gamma: Any = None


@dataclass
class MergeConfig:
    method: str = "ties"
    base_model: str | None = None
    models: list[ModelSpec] = field(default_factory=list)
    adapters: list[ModelSpec] = field(default_factory=list)
    density: Any = 0.2
    lam: Any = 1.0
    epsilon: Any = 0.15
    gamma: Any = 0.01
    t: Any = 0.5
    tie_break: str = "threshold"
    normalize: bool | None = None
    rescale: bool | None = None
    filter_wise: bool = False
    nuslerp_flatten: bool = True
    nuslerp_row_wise: bool = False
    select_topk: Any = 1.0
    semantics: str = "mmt"
    sign: str = "total"
    seed: int = 0
    dtype: str | None = None
    out_dtype: str | None = None
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
    tokenizer_source: str | None = None
    chat_template: str | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "<merge config>") -> "MergeConfig":
        if "merge_method" in raw:  # a mergekit config, read as it is
            from .compat import from_mergekit

            raw = from_mergekit(raw, where)
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
                elif isinstance(item, dict) and "path" in item and set(item) <= {"path", *MODEL_SETTINGS}:
                    specs.append(ModelSpec(str(item["path"]), **{k: item[k] for k in MODEL_SETTINGS if k in item}))
                else:
                    raise MergeError(
                        f"{where}: {key}[{i}] must be a path or {{path, {', '.join(MODEL_SETTINGS)}}}, got {item!r}"
                    )
            values[key] = specs
        for key in ("dtype", "out_dtype"):
            if isinstance(values.get(key), str):
                values[key] = _DTYPE_ALIASES.get(values[key], values[key])
        cfg = cls(**values)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "<merge config>") -> None:
        if self.method not in METHODS:
            raise MergeError(f"{where}: method {self.method!r} is not one of {', '.join(METHODS)}")
        if bool(self.models) == bool(self.adapters):
            raise MergeError(f"{where}: give exactly one of 'models' (checkpoints) or 'adapters' (LoRA)")
        if self.models and self.method not in NO_BASE_METHODS and not self.base_model:
            raise MergeError(f"{where}: method {self.method!r} needs base_model (task vectors are model - base)")
        if self.adapters and self.method not in KERNEL_METHODS:
            raise MergeError(f"{where}: LoRA adapters merge with {', '.join(KERNEL_METHODS)}, not {self.method!r}")
        if self.method == "slerp" and len(self.models) != 1:
            raise MergeError(
                f"{where}: slerp interpolates base_model towards exactly one model, got {len(self.models)} models"
            )
        if self.method == "model_stock" and len(self.models) < 2:
            raise MergeError(f"{where}: model_stock needs at least 2 models besides base_model")
        self._validate_nuslerp_sce(where)
        for key, allowed in (
            ("sign", ("total", "count")),
            ("lora_mode", ("svd", "factor")),
            ("tie_break", ("threshold", "exact_k")),
            ("semantics", ("mmt", "mergekit")),
        ):
            if getattr(self, key) not in allowed:
                raise MergeError(f"{where}: {key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.rescale and not self.method.startswith(("dare", "della")):
            raise MergeError(f"{where}: rescale applies to the dare and della methods, not {self.method!r}")
        if self.normalize is not None and self.method in ("slerp", "model_stock", "nuslerp", "sce"):
            raise MergeError(f"{where}: normalize does not apply to {self.method}")
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and value not in NAMED_DTYPES:
                raise MergeError(f"{where}: {key} must be one of {sorted(NAMED_DTYPES)} or null, got {value!r}")
        for key in SETTINGS:
            if key != "weight":
                _check_setting(getattr(self, key), f"{where}: {key}")
        for i, spec in enumerate(self.models + self.adapters):
            for key in MODEL_SETTINGS:
                value = getattr(spec, key)
                if value is not None:
                    _check_setting(value, f"{where}: models[{i}] ({spec.path}) {key}")
        scalars = [self.density, self.lam] + [v for s in self.adapters for v in (s.weight, s.density) if v is not None]
        if self.adapters and not all(isinstance(v, (int, float)) for v in scalars):
            raise MergeError(f"{where}: LoRA merges take one number for density and lam (no filters or gradients)")
        for i, spec in enumerate(self.models + self.adapters):  # scalar densities are checked now, the rest per tensor
            d = self.density if spec.density is None else spec.density
            if isinstance(d, (int, float)):
                self.check_density(float(d), f"{where}: density {d} for {spec.path}")

    def _validate_nuslerp_sce(self, where: str) -> None:
        for key in ("nuslerp_flatten", "nuslerp_row_wise"):
            if not isinstance(getattr(self, key), bool):
                raise MergeError(f"{where}: {key} must be true or false, got {getattr(self, key)!r}")
        if self.method == "nuslerp":
            if len(self.models) != 2:
                raise MergeError(
                    f"{where}: nuslerp interpolates exactly 2 models (besides base_model), got {len(self.models)}"
                )
            if self.t != 0.5:  # the field's default; nuslerp's t comes from the two weights
                raise MergeError(
                    f"{where}: nuslerp takes per-model weights, not t (t = w1 / (w0 + w1)), got t={self.t!r}"
                )
            if self.nuslerp_row_wise and self.nuslerp_flatten:  # mergekit would flatten and ignore row_wise
                raise MergeError(f"{where}: nuslerp_row_wise: true needs nuslerp_flatten: false")
        elif self.nuslerp_row_wise or not self.nuslerp_flatten:
            raise MergeError(f"{where}: nuslerp_flatten and nuslerp_row_wise apply to nuslerp, not {self.method!r}")
        if self.method == "sce":
            if len(self.models) < 2:
                raise MergeError(f"{where}: sce needs at least 2 models besides base_model (it selects by variance)")
            for spec in self.models:
                if spec.weight != 1.0:  # mergekit's sce takes no weight either
                    raise MergeError(
                        f"{where}: sce computes each model's weight from its task vector; weight {spec.weight!r} "
                        f"for {spec.path} is not used, leave it out"
                    )
        if self.select_topk != 1.0 and self.method != "sce":
            raise MergeError(f"{where}: select_topk applies to sce, not {self.method!r}")
        if isinstance(self.select_topk, (int, float)) and not isinstance(self.select_topk, bool):
            self.check_select_topk(float(self.select_topk), f"{where}: select_topk")

    @staticmethod
    def check_select_topk(value: float, what: str) -> None:
        if not 0.0 < value <= 1.0:
            raise MergeError(f"{what} {value} is outside (0, 1] (the fraction of elements kept)")

    def check_density(self, d: float, what: str) -> None:
        if not 0.0 <= d <= 1.0 or (self.method.startswith(("dare", "della")) and d == 0.0):
            raise MergeError(f"{what} is outside the method's range")

    def densities(self, specs: list[ModelSpec]) -> list[float]:
        """Scalar densities of ``specs`` (LoRA merges and callers that take no per-tensor settings)."""
        return [float(self.density if s.density is None else s.density) for s in specs]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TensorSettings:
    """The resolved settings of one tensor: one value per model, or one for the merge."""

    weights: list[float]
    densities: list[float]
    epsilons: list[float]
    gammas: list[float]
    lam: float
    t: float
    select_topk: float = 1.0


_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_count(checkpoint_dir: Path, names: Iterable[str]) -> int:
    """The number of layers: config.json's ``num_hidden_layers`` (text config too), else the names' highest index."""
    conf = checkpoint_dir / "config.json"
    if conf.exists():
        try:
            data = json.loads(conf.read_text())
        except ValueError:
            data = {}
        for node in (data, data.get("text_config") or {}):
            if isinstance(node.get("num_hidden_layers"), int):
                return node["num_hidden_layers"]
    found = [int(m.group(1)) for n in names if (m := _LAYER.search(n))]
    return max(found) + 1 if found else 1


def relative_depth(name: str, num_layers: int) -> float:
    """A tensor's position for gradients: layer i of n is i / (n - 1); tensors outside the layers are 0."""
    m = _LAYER.search(name)
    if m is None or num_layers <= 1:
        return 0.0
    return min(1.0, int(m.group(1)) / (num_layers - 1))


def tensor_settings(cfg: MergeConfig, name: str, num_layers: int) -> TensorSettings:
    """Resolve every setting of ``cfg`` for tensor ``name``; refuses values out of range, naming the tensor."""
    t = relative_depth(name, num_layers)

    def one(value: Any, key: str, default: float | None = None) -> float:
        got = evaluate_setting(value, name, t)
        if got is None:
            if default is None:
                raise MergeError(f"no {key} filter matches tensor {name}; add an entry without a filter as the default")
            return default
        return got

    def per_model(key: str) -> list[float]:
        glob = getattr(cfg, key) if key != "weight" else 1.0
        out = []
        for spec in cfg.models:
            own = getattr(spec, key)
            got = evaluate_setting(own, name, t) if own is not None else None
            out.append(got if got is not None else one(glob, key))
        return out

    s = TensorSettings(
        weights=per_model("weight"),
        densities=per_model("density"),
        epsilons=per_model("epsilon"),
        gammas=per_model("gamma"),
        lam=one(cfg.lam, "lam"),
        t=one(cfg.t, "t"),
        select_topk=one(cfg.select_topk, "select_topk"),
    )
    if cfg.method == "sce":
        cfg.check_select_topk(s.select_topk, f"tensor {name}: select_topk")
    for spec, d, eps in zip(cfg.models, s.densities, s.epsilons):
        cfg.check_density(d, f"tensor {name}: density {d} for {spec.path}")
        if cfg.method.startswith("della") and not (0.0 < d - eps and d + eps <= 1.0):
            raise MergeError(
                f"tensor {name}: della needs 0 < density - epsilon and density + epsilon <= 1, got "
                f"density {d}, epsilon {eps} for {spec.path}"
            )
    for spec, g in zip(cfg.models, s.gammas):
        if not 0.0 <= g <= 1.0:
            raise MergeError(f"tensor {name}: gamma {g} for {spec.path} is outside [0, 1]")
    return s


def load_merge_config(path: str | Path | None, overrides: Iterable[str] = ()) -> MergeConfig:
    """Read a merge YAML (top level, one ``merge:`` section, or a mergekit config) and apply ``key=value`` overrides."""
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
            what = (
                f"is missing tensor {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
                if missing
                else f"has tensor {extra[0]!r} that {ref.path} lacks"
            )
            raise MergeError(f"checkpoint {spec.path} {what}; all checkpoints must have the same tensors")
    out_name = cfg.out_dtype or cfg.dtype
    out_dtype = NAMED_DTYPES[out_name] if out_name else None
    plan = []
    for n in names:
        dtype, shape = ref.meta(n)
        for ck in models:
            d2, s2 = ck.meta(n)
            if s2 != shape:
                raise MergeError(f"tensor {n}: shape {list(s2)} in {ck.files[n]} but {list(shape)} in {ref.files[n]}")
            if d2 != dtype and cfg.dtype is None:
                raise MergeError(
                    f"tensor {n}: dtype {d2} in {ck.files[n]} but {dtype} in {ref.files[n]}; "
                    "set `dtype:` in the merge config to convert every input to one dtype"
                )
        plan.append((n, out_dtype if (out_dtype is not None and dtype in FLOAT_DTYPES) else dtype, shape))
    return plan

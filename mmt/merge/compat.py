"""Reading a mergekit config as it is.

A mapping with ``merge_method`` is a mergekit config: ``merge_method``, ``base_model``, ``models`` (each
``{model, parameters}``), ``parameters`` (numbers, gradients and filter lists, see :mod:`.plan`), ``dtype``,
``out_dtype``, ``tokenizer_source`` and ``chat_template`` map onto a :class:`~mmt.merge.plan.MergeConfig`
with ``semantics: mergekit``, so that the weighting, normalisation and rescaling defaults are mergekit's.
``slices`` (layer ranges of the inputs, stacked: frankenmerges with ``passthrough``, or merged per slice) map onto
mmt's slices with mergekit's precedence (a source's parameters, then its slice's, then the global ones), see
:mod:`.plan`. mmt's keys that mergekit lacks (``output``, ``tie_break``, ``seed``, ``shard_size``,
``device``, ...) may be added. Anything this reader cannot honour is refused by name rather than ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmt.errors import MergeError

from .plan import METHODS, chain_setting

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


def _whole_model_slice(raw: dict[str, Any], method: str) -> tuple[list, Any, Any] | None:
    """(models, slice parameters, base) when ``slices`` is one slice taking every layer of each source."""
    slices = raw.get("slices")
    if method == "passthrough" or not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
        return None
    sl = slices[0]
    if set(sl) - {"sources", "parameters", "base_model"} or not isinstance(sl.get("sources"), list):
        return None
    models = []
    for src in sl["sources"]:
        if not isinstance(src, dict) or set(src) - {"model", "layer_range", "parameters"}:
            return None
        path = src.get("model")
        n = _num_layers(path) if isinstance(path, str) else None
        if n is None or list(src.get("layer_range") or []) != [0, n]:
            return None
        models.append({"model": path, "parameters": src.get("parameters")})
    return (models, sl.get("parameters"), sl.get("base_model") or raw.get("base_model")) if models else None


def _from_slices(raw: dict[str, Any], params: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """mergekit's ``slices`` -> mmt's: each source's settings chained to its slice's and the global ones."""
    slices = raw["slices"]
    if not isinstance(slices, list) or not all(isinstance(sl, dict) for sl in slices):
        raise MergeError(f"{where}: slices must be a list of {{sources, base_model, parameters}}")
    out = []
    for i, sl in enumerate(slices):
        w = f"{where}: slices[{i}]"
        unknown = sorted(set(sl) - {"sources", "parameters", "base_model", "residual_weight"})
        if unknown:
            raise MergeError(f"{w}: unsupported key(s) {unknown}")
        if sl.get("residual_weight") is not None:
            raise MergeError(f"{w}: residual_weight is not supported (mergekit declares it but does not apply it)")
        own = _params(sl.get("parameters"), tuple(_PARAMS) + _FLAGS + ("scale",), f"{w}.parameters")
        spec: dict[str, Any] = {}
        for key in _FLAGS:
            if key in own:
                value = own.pop(key)
                if not isinstance(value, bool):
                    raise MergeError(f"{w}.parameters.{key} must be true or false here, got {value!r}")
                if key in ("normalize", "rescale"):
                    spec[key] = value
                elif key == "filter_wise" and value != bool(params.get(key, False)):
                    raise MergeError(f"{w}.parameters.filter_wise: one value for the whole merge, set it globally")
        for key, ours in _PARAMS.items():
            if key in own and key not in ("weight",):
                spec[ours] = own[key]
        sources = []
        for j, src in enumerate(sl.get("sources") or []):
            ws = f"{w}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src or set(src) - {"model", "layer_range", "parameters"}:
                raise MergeError(f"{ws}: expected {{model, layer_range, parameters}}, got {src!r}")
            if "layer_range" not in src:
                raise MergeError(f"{ws} ({src['model']}): layer_range is required (as in mergekit)")
            mine = _params(src.get("parameters"), _MODEL_PARAMS + ("scale",), f"{ws}.parameters")
            item = {"path": _ref(src["model"], f"{ws}.model"), "layer_range": src["layer_range"]}
            for key in _MODEL_PARAMS + ("scale",):
                # a source's, then its slice's, then the global: mergekit's precedence per input
                value = chain_setting(mine.get(key), chain_setting(own.get(key), params.get(key)))
                if key in ("weight", "scale"):
                    if value is not None:
                        item[key] = value
                elif mine.get(key) is not None:
                    item[key] = mine[key]  # the slice's and the global values reach it through the slice
            sources.append(item)
        if not sources:
            raise MergeError(f"{w} has no sources")
        if sl.get("base_model") is not None:
            spec["base_model"] = _ref(sl["base_model"], f"{w}.base_model")
        out.append({"sources": sources, **spec})
    return out


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
    base = raw.get("base_model")
    base = _ref(base, f"{where}: base_model") if base is not None else None
    params = _params(raw.get("parameters"), tuple(_PARAMS) + _FLAGS + ("scale",), f"{where}: parameters")
    if "scale" in params and method != "passthrough":
        raise MergeError(f"{where}: parameters.scale: only passthrough takes a scale")
    whole = _whole_model_slice(raw, method)
    if whole is not None:  # one slice of every layer: the same merge as models (its parameters over the global)
        entries, slice_params, base = whole
        slice_params = _params(slice_params, tuple(_PARAMS) + _FLAGS, f"{where}: slices[0].parameters")
        for key, value in slice_params.items():
            params[key] = value if key in _FLAGS else chain_setting(value, params.get(key))
        base = _ref(base, f"{where}: slices[0].base_model") if base is not None else None
    elif raw.get("slices"):
        out["slices"] = _from_slices(raw, params, where)
        entries = []
        if base is not None:
            out["base_model"] = base  # the output's config and tokenizer come from it, as in mergekit
    else:
        entries = raw["models"]
        if not isinstance(entries, list):
            raise MergeError(f"{where}: models must be a list of {{model, parameters}}")
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
        if base is not None and path == base and method not in ("linear", "passthrough"):
            continue  # the base listed among the models is the base, as in mergekit
        own = _params(item.get("parameters"), _MODEL_PARAMS + ("scale",), f"{w}.parameters")
        spec = {"path": path}
        for key in ("weight", "scale"):
            if key in params:
                spec[key] = params[key]
        spec.update(own)
        models.append(spec)
    if models:
        out["models"] = models
    if base is not None and method not in ("linear", "passthrough") and models:
        out["base_model"] = base
    elif base is not None and models:
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

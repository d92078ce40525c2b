"""Changed architectures: models that a method extends beyond their base architecture (CAR gates, MoE experts).

Such a model must reload as itself, never as its base with the new tensors dropped. A method registers a
*builder* once::

    @register_arch("landermt_car")
    def build(model, settings):            # change a freshly built base model in place
        ...                                # (add modules, persistent buffers, hooks); weights load afterwards

    register_direction_setter("landermt_car", fn)   # optional: fn(model, settings, src, tgt) per direction

and, after changing a live model (e.g. in ``prepare``), tags it with ``mark(model, "landermt_car", settings)``.
A tagged model's ``save_pretrained`` writes an ``mmt`` config (``model_type: "mmt"``) that records the base
config (``base``), the builder's name (``arch``), the module that registers it (``module``) and its
``settings``. Importing :mod:`mmt` registers that config type with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(dir)`` rebuilds the base model, runs the builder and loads the weights;
no ``trust_remote_code``. Missing, unexpected or mis-shaped tensors are an error, not a warning.

The loaded model is an instance of a subclass of its base class (e.g. ``MmtGemma3ForCausalLM``), so generation
and every base-class feature work unchanged. :func:`set_direction` routes any model for a (src, tgt) pair (a
no-op for models without direction-dependent behaviour).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

from transformers.configuration_utils import PretrainedConfig
from transformers.models.auto.configuration_auto import AutoConfig

from mmt.errors import CheckpointError

MODEL_TYPE = "mmt"
FORMAT = 1

_BUILDERS: dict[str, Callable[[Any, dict], None]] = {}
_DIRECTION_SETTERS: dict[str, Callable[[Any, dict, str, str], None]] = {}
_MODULES: dict[str, str] = {}
_CLASSES: dict[type, type] = {}


def register_arch(name: str, build: Callable[[Any, dict], None] | None = None):
    """Register ``build(model, settings)`` under ``name`` (usable as a decorator)."""

    def deco(fn):
        _BUILDERS[name] = fn
        _MODULES[name] = fn.__module__
        return fn

    return deco(build) if build is not None else deco


def register_direction_setter(name: str, fn: Callable[[Any, dict, str, str], None]) -> None:
    _DIRECTION_SETTERS[name] = fn


def _builder(name: str, module: str | None) -> Callable[[Any, dict], None]:
    if name not in _BUILDERS and module:
        if not (module == "mmt" or module.startswith("mmt.")):  # a config file never picks code outside mmt
            raise CheckpointError(f"mmt config names module {module!r}; only mmt's own modules are imported")
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise CheckpointError(f"changed architecture {name!r}: cannot import {module} ({exc})") from None
    if name not in _BUILDERS:
        raise CheckpointError(
            f"unknown changed architecture {name!r} (known: {sorted(_BUILDERS)}); this checkpoint needs a newer mmt"
        )
    return _BUILDERS[name]


class MmtConfig(PretrainedConfig):
    """Config of a changed architecture: the base model's config plus the method's name and settings."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        base: dict | None = None,
        arch: str | None = None,
        module: str | None = None,
        settings: dict | None = None,
        mmt_format: int = FORMAT,
        **kwargs,
    ):
        self.base = dict(base or {})
        self.arch = arch
        self.module = module
        self.settings = dict(settings or {})
        self.mmt_format = mmt_format
        super().__init__(**kwargs)

    def base_config(self) -> PretrainedConfig:
        base = dict(self.base)
        model_type = base.pop("model_type", None)
        if not model_type:
            raise CheckpointError("mmt config has no base.model_type; the checkpoint is damaged")
        if self.mmt_format > FORMAT:
            raise CheckpointError(f"mmt config format {self.mmt_format} is newer than this mmt ({FORMAT})")
        cfg = AutoConfig.for_model(model_type, **base)
        cfg._mmt_spec = {"arch": self.arch, "module": self.module, "settings": self.settings}
        return cfg


class MmtModelMixin:
    """Behaviour of a changed-architecture model on top of its base class (first in the MRO)."""

    _mmt_spec: dict

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        spec = getattr(config, "_mmt_spec", None)
        if spec is not None:  # built from an mmt config: apply the change to the fresh base model
            _builder(spec["arch"], spec.get("module"))(self, spec["settings"])
            self._mmt_spec = spec

    def mmt_config(self) -> MmtConfig:
        base = self.config.to_dict()
        base.pop("_mmt_spec", None)
        for key in ("architectures", "transformers_version"):
            base.pop(key, None)
        spec = self._mmt_spec
        return MmtConfig(
            base=base,
            arch=spec["arch"],
            module=spec.get("module"),
            settings=spec["settings"],
            architectures=["MmtForCausalLM"],
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            cfg = self.mmt_config().to_dict()
            Path(save_directory, "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        return out


def _tagged_class(base_cls: type) -> type:
    if issubclass(base_cls, MmtModelMixin):
        return base_cls
    if base_cls not in _CLASSES:
        _CLASSES[base_cls] = type(f"Mmt{base_cls.__name__}", (MmtModelMixin, base_cls), {"__module__": __name__})
    return _CLASSES[base_cls]


def mark(model, arch: str, settings: dict) -> None:
    """Tag a model that ``arch``'s builder-equivalent change was applied to (in place)."""
    if arch not in _BUILDERS:
        raise KeyError(f"mark: {arch!r} is not a registered architecture change")
    model.__class__ = _tagged_class(type(model))
    model._mmt_spec = {"arch": arch, "module": _MODULES[arch], "settings": json.loads(json.dumps(settings))}


def spec_of(model) -> dict | None:
    """{arch, module, settings} of a changed-architecture model, else None (peft wrappers are looked through)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "_mmt_spec", None)


def set_direction(model, src: str, tgt: str) -> None:
    """Route ``model`` for the pair (src, tgt) when its architecture depends on it (CAR); else nothing."""
    spec = spec_of(model)
    if spec is not None and spec["arch"] in _DIRECTION_SETTERS:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        _DIRECTION_SETTERS[spec["arch"]](base, spec["settings"], src, tgt)


def _check_loading_info(path, info: dict) -> None:
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(
            f"{k.replace('_', ' ')}: {', '.join(map(str, v[:4]))}" + (f" (+{len(v) - 4})" if len(v) > 4 else "")
            for k, v in problems.items()
        )
        raise CheckpointError(f"{path}: the weights do not match the architecture its config describes ({detail})")


class MmtForCausalLM:
    """Auto-class entry for ``model_type: mmt``: builds the base class with the change and loads the weights.

    Returns an instance of ``Mmt<BaseClass>``, not of this class.
    """

    config_class = MmtConfig

    @staticmethod
    def _resolve(config: MmtConfig):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        base_cfg = config.base_config()
        _builder(config.arch, config.module)
        try:
            base_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(base_cfg)]
        except KeyError:
            raise CheckpointError(f"no causal-LM class for base model type {base_cfg.model_type!r}") from None
        return base_cfg, _tagged_class(base_cls)

    @classmethod
    def from_pretrained(cls, path, *args, config: MmtConfig | None = None, **kwargs):
        if config is None or not isinstance(config, MmtConfig):
            config = MmtConfig.from_pretrained(path)
        base_cfg, model_cls = cls._resolve(config)
        # AutoModel hands attn_implementation to the config it loads: carry it over to the base config
        attn = kwargs.pop("attn_implementation", None) or getattr(config, "_attn_implementation_internal", None)
        if attn:
            base_cfg._attn_implementation = attn
        want_info = kwargs.pop("output_loading_info", False)
        model, info = model_cls.from_pretrained(path, *args, config=base_cfg, output_loading_info=True, **kwargs)
        _check_loading_info(path, info)
        return (model, info) if want_info else model

    @classmethod
    def _from_config(cls, config: MmtConfig, **kwargs):
        base_cfg, model_cls = cls._resolve(config)
        return model_cls._from_config(base_cfg, **kwargs)

    from_config = _from_config


def register_model() -> None:
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    AutoModelForCausalLM.register(MmtConfig, MmtForCausalLM, exist_ok=True)


AutoConfig.register(MODEL_TYPE, MmtConfig, exist_ok=True)
_model_auto = sys.modules.get("transformers.models.auto.modeling_auto")
if _model_auto is None or hasattr(_model_auto, "AutoModelForCausalLM"):
    register_model()
# else: transformers is importing its auto-model module right now; mmt's import hook registers when it is done

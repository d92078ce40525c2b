"""The method registry: every post-training method registers itself here with one call.

A method package ``mmt/methods/<name>/`` ends its ``__init__.py`` with::

    register_method("name", module=__name__, config=Config, prepare=prepare)           # one training run
    register_method("name", module=__name__, config=Config, prepare=prepare, run=run)  # several runs

:mod:`mmt.methods` imports the built-in packages so that they register; :func:`get_method` imports it on
first use, so ``mmt.config`` can resolve ``method.name`` without importing any method itself (this module
and :mod:`mmt.config` import nothing from mmt but :mod:`mmt.errors`, which keeps the graph acyclic).
See docs/architecture.md, "Adding a method".
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

from mmt.errors import ConfigError


@dataclass(frozen=True)
class Method:
    """A registered method.

    ``config``: its ``MethodConfig`` subclass; ``prepare(model, config, tokenizer=None) -> (model, TrainingPlan)``;
    ``run(cfg, *, with_eval=False) -> int``: optional entry point for a method that is several training runs
    (``mmt train`` calls it instead of one :func:`mmt.train.run`); ``module``: the registering package.
    """

    name: str
    config: type
    prepare: Callable[..., Any]
    run: Callable[..., int] | None
    module: str


_METHODS: dict[str, Method] = {}


def register_method(
    name: str, *, module: str, config: type, prepare: Callable[..., Any], run: Callable[..., int] | None = None
) -> Method:
    """Register method ``name`` from the package ``module`` (pass ``__name__``). Registering one name from two
    packages is a programming error."""
    previous = _METHODS.get(name)
    assert previous is None or previous.module == module, f"method {name!r} registered twice"
    method = Method(name=name, config=config, prepare=prepare, run=run, module=module)
    _METHODS[name] = method
    return method


def _load_builtins() -> None:
    # deliberate late import: the method packages import torch and mmt_kernels, and import this module
    importlib.import_module("mmt.methods")


def method_names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    _load_builtins()
    return tuple(_METHODS)


def get_method(name: str) -> Method:
    """The registered method ``name`` (case and ``-``/``_`` insensitive); :class:`ConfigError` naming the known
    methods otherwise."""
    _load_builtins()
    key = name.strip().lower().replace("-", "_")
    if key not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(_METHODS)}")
    return _METHODS[key]


def method_module(name: str) -> ModuleType:
    """The package that registered method ``name`` (it exposes ``Config`` and ``prepare``)."""
    return sys.modules[get_method(name).module]

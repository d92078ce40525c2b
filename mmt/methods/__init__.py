"""Post-training methods. Each is a package ``mmt/methods/<name>/`` that registers itself with
:func:`mmt.registry.register_method` (``Config``, ``prepare`` and, for a method of several runs, ``run``).

Importing this package imports the built-in methods, in the order their names are listed, so that they
register. See docs/architecture.md for how to add one.
"""

from __future__ import annotations

from types import ModuleType

from mmt.registry import Method, get_method, method_module, method_names, register_method

# isort: off
from . import mfti, landermt, mixmoe, directional  # noqa: F401  (registration order = listing order)

# isort: on
from .base import MethodConfig, StepInfo, TrainingPlan, count_parameters, default_optimizer

__all__ = [
    "Method",
    "MethodConfig",
    "StepInfo",
    "TrainingPlan",
    "count_parameters",
    "default_optimizer",
    "get",
    "get_method",
    "method_names",
    "register_method",
]


def get(name: str) -> ModuleType:
    """The package of method ``name`` (it exposes ``Config`` and ``prepare``); ConfigError naming the known
    methods otherwise."""
    return method_module(name)

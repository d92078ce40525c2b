"""Post-training methods. Each is a module with ``Config`` and ``prepare`` (see :mod:`.base`).

Modules are imported lazily so that importing :mod:`mmt` never pulls in a method's
dependencies (e.g. ``mmt_kernels``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .base import MethodConfig, StepInfo, TrainingPlan, count_parameters, default_optimizer

KNOWN = ("mfti", "landermt", "mixmoe", "directional")

__all__ = ["KNOWN", "MethodConfig", "StepInfo", "TrainingPlan", "count_parameters",
           "default_optimizer", "get"]


def get(name: str) -> ModuleType:
    """Return the method module ``mmt.methods.<name>``; raises with the known names otherwise."""
    key = name.strip().lower().replace("-", "_")
    if key not in KNOWN:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(KNOWN)}")
    try:
        module = importlib.import_module(f"{__name__}.{key}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{key}":
            raise ValueError(f"method {name!r} is not available yet (mmt/methods/{key}.py is missing)") from exc
        raise
    for attr in ("Config", "prepare"):
        if not hasattr(module, attr):
            raise ValueError(f"method module mmt.methods.{key} does not define {attr!r}")
    return module

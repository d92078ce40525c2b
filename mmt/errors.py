"""Every error a user can cause derives from :class:`MmtError`.

The CLI catches ``MmtError`` once and prints its message with exit code 2, without a traceback.
Anything else that escapes is a bug in mmt and keeps its traceback. Internal invariants are
``assert`` statements, not these classes.
"""

from __future__ import annotations

import importlib


class MmtError(Exception):
    """A user mistake or an unusable input; the message names the place (file:line, key, tensor)."""


class ConfigError(MmtError, ValueError):
    """A config file or override is invalid; the message names the file, the key and the value."""


class DataError(MmtError, ValueError):
    """A data file is missing, empty or malformed; the message names the file and line."""


class ModelLoadError(MmtError, RuntimeError):
    """A model or tokenizer cannot be loaded, or a folder is not what it was passed as."""


class CheckpointError(MmtError, RuntimeError):
    """A checkpoint or run folder is damaged, incomplete or does not match the run resuming it."""


class MergeError(MmtError, ValueError):
    """A merge config or its inputs are invalid (missing tensors, shape or dtype mismatch)."""


class MethodError(MmtError, ValueError):
    """A method cannot be applied as configured (e.g. to this model architecture)."""


class MissingDependencyError(MmtError, ImportError):
    """An optional dependency is not installed; the message names the package and the extra."""

    def __init__(self, package: str, extra: str | None = None, purpose: str = ""):
        hint = f"pip install 'mmt[{extra}]'" if extra else f"pip install {package}"
        what = f" ({purpose})" if purpose else ""
        super().__init__(f"the optional package {package!r} is not installed{what}: {hint}")
        self.package, self.extra = package, extra


def require(module: str, package: str | None = None, extra: str | None = None, purpose: str = ""):
    """Import an optional dependency, or raise :class:`MissingDependencyError` naming how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(package or module, extra, purpose) from None

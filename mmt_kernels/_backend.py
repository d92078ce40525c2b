"""Backend selection for mmt_kernels ops.

Every op has up to four implementations:

- ``reference``: plain PyTorch in ``mmt_kernels/reference/`` (the spec; any device);
- ``cpu``: C++ kernels in ``mmt_kernels._C`` (``torch.ops.mmt.*``, CPU tensors);
- ``cuda``: C++/CUDA kernels in ``mmt_kernels._C`` (CUDA tensors);
- ``triton``: Triton kernels in ``mmt_kernels/triton/`` (CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``, which is how the CPU test suite checks them).

``auto`` (the default) picks, for the tensors' device, the first available backend in the op's
preference order; ``MMT_KERNELS_BACKEND=reference|cpu|triton|cuda`` (or :func:`set_backend`)
forces one and raises :class:`BackendUnavailableError` if it cannot run. A failed ``_C`` load is
reported once, with the reason, and the op falls back to the reference: never silently wrong.

This module answers "can backend X run here"; ``_registry`` declares the ops and picks their backend.
"""

from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this op on these tensors."""


def _env_backend() -> str:
    value = os.environ.get("MMT_KERNELS_BACKEND", "auto").strip().lower()
    if value not in BACKENDS + ("auto",):
        raise ValueError(f"MMT_KERNELS_BACKEND={value!r}: expected one of auto, {', '.join(BACKENDS)}")
    return value


_forced: str = _env_backend()
_C_error: str | None = None


def set_backend(name: str) -> None:
    """Force a backend for every op in this process (``"auto"`` restores automatic choice)."""
    global _forced
    name = name.lower()
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {name!r}: expected one of auto, {', '.join(BACKENDS)}")
    _forced = name


def get_backend() -> str:
    return _forced


@lru_cache(maxsize=None)
def load_C() -> bool:
    """Import the compiled library once; report a failure once, with its reason."""
    global _C_error
    try:
        importlib.import_module("mmt_kernels._C")
        return True
    except Exception as exc:  # ImportError, undefined symbols, ABI mismatch ...
        _C_error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "mmt_kernels._C could not be loaded, so the PyTorch reference kernels are used instead "
            f"({_C_error}). Build it with `make install` (or `pip install --no-build-isolation -e .`).",
            RuntimeWarning,
            stacklevel=3,
        )
        return False


@lru_cache(maxsize=None)
def has_compiled(op: str, dispatch_key: str) -> bool:
    """True if ``torch.ops.mmt.<op>`` has a compiled kernel for ``dispatch_key`` ("CPU"/"CUDA")."""
    if not load_C():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"mmt::{op}", dispatch_key)
    except RuntimeError:
        return False


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401

        return True
    except Exception:
        return False


def available(backend: str, device_type: str, op: str, *, has_triton: bool = True) -> tuple[bool, str]:
    """Whether ``backend`` can run ``op`` on ``device_type``, and why not."""
    if backend == "reference":
        return True, ""
    if backend == "cpu":
        if device_type != "cpu":
            return False, f"the cpu backend takes CPU tensors, got {device_type}"
        if not has_compiled(op, "CPU"):
            return False, "mmt_kernels._C has no CPU kernel for it" + (f" ({_C_error})" if _C_error else "")
        return True, ""
    if backend == "cuda":
        if device_type != "cuda":
            return False, f"the cuda backend takes CUDA tensors, got {device_type}"
        if not has_compiled(op, "CUDA"):
            return False, "mmt_kernels._C was built without CUDA kernels for it" + (
                f" ({_C_error})" if _C_error else ""
            )
        return True, ""
    if backend == "triton":
        if not has_triton:
            return False, "it has no Triton kernel"
        if not triton_importable():
            return False, "triton is not installed"
        if device_type == "cuda":
            return True, ""
        if device_type == "cpu" and triton_interpret():
            return True, ""
        return False, f"Triton runs on CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), got {device_type}"
    raise ValueError(f"unknown backend {backend!r}")


def report() -> dict[str, object]:
    """Build and availability facts, for ``python -m mmt_kernels.info``."""
    info: dict[str, object] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"unavailable ({type(exc).__name__})"
    info["C_loaded"] = load_C()
    info["C_error"] = _C_error
    info["cpu_kernels"] = load_C() and any(
        torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU") for name in _mmt_op_names()
    )
    info["cuda_kernels"] = load_C() and any(
        torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA") for name in _mmt_op_names()
    )
    info["ops"] = sorted(_mmt_op_names())
    info["cuda_available"] = torch.cuda.is_available()
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    info["triton_interpret"] = triton_interpret()
    info["forced_backend"] = _forced
    info["omp_threads"] = torch.get_num_threads()
    return info


def _mmt_op_names() -> list[str]:
    if not load_C():
        return []
    return [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("mmt::")]

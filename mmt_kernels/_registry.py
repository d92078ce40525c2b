"""Every mmt op is declared once, as an :class:`OpSpec`, and registered by :func:`register`.

A spec names the op, gives its schema (the same text as its ``m.def`` in ``csrc/ops.cpp``), its PyTorch
reference and fake (meta) kernel with the schema's signature, its Triton launcher, whether a C++/CUDA
kernel exists, which backends take fp64, and the autograd function its public wrapper applies.
:func:`register` attaches the fake to the C++ op (when ``_C`` defines it), wraps the Triton launcher as
the custom op ``mmt::<name>_triton`` with the same schema and fake (opaque to ``torch.compile``), and
returns an :class:`Op` whose :meth:`Op.choose` is the one place a backend is picked. How to add an op:
docs/kernels.md.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import _backend
from ._backend import BackendUnavailableError

DEFAULT_CUDA_ORDER = ("cuda", "triton", "reference")  # faster-by-measurement order on CUDA tensors
TRITON_ONLY_CUDA_ORDER = ("triton", "reference")       # ops without a CUDA C++ kernel
CPU_ORDER = ("cpu", "reference")


@dataclass(frozen=True)
class OpSpec:
    name: str                      # torch.ops.mmt.<name> (C++ CPU/CUDA); mmt::<name>_triton (Triton)
    schema: str                    # "(Tensor x, int k) -> Tensor", as in csrc/ops.cpp
    reference: Callable[..., Any]  # the schema's signature, plain PyTorch, any device
    fake: Callable[..., Any]       # output shapes/dtypes for torch.compile and meta tensors
    triton: str | None = None      # "module:function" in mmt_kernels/triton (imported on first use)
    cuda: bool = True              # has a CUDA C++ kernel; False: Triton runs it on GPU, even when "cuda" is forced
    fp64: tuple[str, ...] = ("reference", "cpu")  # backends that accept fp64 inputs
    autograd: type[torch.autograd.Function] | None = None  # what the public wrapper applies off the reference


class Op:
    """A registered op: backend choice and the kernel of each backend."""

    def __init__(self, spec: OpSpec):
        self.spec = spec
        self.name = spec.name
        self.triton_op = None
        if spec.triton is not None:
            self.triton_op = torch.library.custom_op(f"mmt::{spec.name}_triton", self._launch_triton,
                                                     mutates_args=_mutated(spec.schema), schema=spec.schema)
            self.triton_op.register_fake(spec.fake)
        if _backend.load_C() and hasattr(torch.ops.mmt, spec.name):
            torch.library.register_fake(f"mmt::{spec.name}")(spec.fake)

    def _launch_triton(self, *args):
        module, function = self.spec.triton.split(":")
        return getattr(importlib.import_module(f"mmt_kernels.triton.{module}"), function)(*args)

    def kernel(self, which: str) -> Callable[..., Any]:
        """The implementation of ``which`` backend, called with the schema's arguments."""
        if which in ("cpu", "cuda"):
            return getattr(torch.ops.mmt, self.name)
        if which == "triton":
            return self.triton_op
        assert which == "reference", which
        return self.spec.reference

    def __call__(self, which: str, *args):
        return self.kernel(which)(*args)

    def apply(self, *args):
        """The op's autograd function (for a kernel backend; the reference differentiates itself)."""
        return self.spec.autograd.apply(*args)

    def choose(self, device: torch.device | str, backend: str | None = None,
               dtype: torch.dtype | None = None) -> str:
        return _choose(self.name, device, backend, dtype)


OPS: dict[str, Op] = {}


def register(spec: OpSpec) -> Op:
    """Register ``spec`` once (fake, Triton custom op) and return its :class:`Op`."""
    assert spec.name not in OPS, f"mmt op {spec.name!r} registered twice"
    op = OPS[spec.name] = Op(spec)
    return op


def _mutated(schema: str) -> tuple[str, ...]:
    args = schema[schema.index("(") + 1:schema.rindex(") ->")]
    return tuple(a.split()[-1] for a in args.split(",") if "!)" in a)


@torch.compiler.assume_constant_result  # evaluated once while tracing: no graph break under torch.compile
def _choose(name: str, device: torch.device | str, backend: str | None, dtype: torch.dtype | None) -> str:
    spec = OPS[name].spec
    device_type = torch.device(device).type
    wanted = (backend or _backend.get_backend()).lower()
    if wanted == "cuda" and device_type == "cuda" and not spec.cuda:
        wanted = "triton"  # documented: no CUDA C++ kernel for this op, so Triton runs it on GPU
    has_triton = spec.triton is not None
    if wanted != "auto":
        if dtype == torch.float64 and wanted not in spec.fp64:
            raise BackendUnavailableError(f"backend {wanted!r} cannot run mmt op {name!r}: it takes no fp64 "
                                          f"tensors (only {', '.join(spec.fp64)} do)")
        ok, why = _backend.available(wanted, device_type, name, has_triton=has_triton)
        if not ok:
            raise BackendUnavailableError(f"backend {wanted!r} cannot run mmt op {name!r}: {why}")
        return wanted
    order = (DEFAULT_CUDA_ORDER if spec.cuda else TRITON_ONLY_CUDA_ORDER) if device_type == "cuda" else CPU_ORDER
    for candidate in order:
        if dtype == torch.float64 and candidate not in spec.fp64:
            continue
        if _backend.available(candidate, device_type, name, has_triton=has_triton)[0]:
            return candidate
    return "reference"


def choose(name: str, device: torch.device | str, *, backend: str | None = None,
           dtype: torch.dtype | None = None) -> str:
    """The backend that runs mmt op ``name`` on tensors of ``dtype`` on ``device``.

    ``backend`` (per call) beats ``set_backend``/``MMT_KERNELS_BACKEND``, which beat ``auto`` (the first
    available backend of the op's order for the device).
    """
    return OPS[name].choose(device, backend, dtype)

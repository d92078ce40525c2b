"""Every mmt op is declared once, as an :class:`OpSpec`, and registered by :func:`register`.

A spec names the op, gives its schema (the same text as its ``m.def`` in ``csrc/ops.cpp``), its PyTorch
reference and fake (meta) kernel with the schema's signature, its Triton launcher, whether a C++/CUDA
kernel exists, which backends take fp64, and the autograd function its public wrapper applies.
:func:`register` attaches the fake to the C++ op (when ``_C`` defines it), wraps the Triton launcher as
the custom op ``mmt::<name>_triton`` (``<name>_triton_`` for an in-place op) with the same schema and
fake (opaque to ``torch.compile``), and returns an :class:`Op` whose :meth:`Op.choose` is the one place a
backend is picked. How to add an op: docs/kernels.md.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import _backend
from ._backend import BackendUnavailableError

DEFAULT_CUDA_ORDER = ("cuda", "triton", "reference")  # faster-by-measurement order on CUDA tensors
TRITON_ONLY_CUDA_ORDER = ("triton", "reference")  # ops without a CUDA C++ kernel
CPU_ORDER = ("cpu", "reference")


@dataclass(frozen=True)
class OpSpec:
    name: str  # torch.ops.mmt.<name> (C++ CPU/CUDA); mmt::<name>_triton (Triton)
    schema: str  # "(Tensor x, int k) -> Tensor", as in csrc/ops.cpp
    reference: Callable[..., Any]  # the schema's signature, plain PyTorch, any device
    fake: Callable[..., Any]  # output shapes/dtypes for torch.compile and meta tensors
    triton: str | None = None  # "module:function" in mmt_kernels/triton (imported on first use)
    cuda: bool = True  # has a CUDA C++ kernel; False: Triton runs it on GPU, even when "cuda" is forced
    fp64: tuple[str, ...] = ("reference", "cpu")  # backends that accept fp64 inputs
    autograd: type[torch.autograd.Function] | None = None  # what the public wrapper applies off the reference
    cpu_order: tuple[str, ...] = CPU_ORDER  # auto's order on CPU tensors, fastest first by measurement
    cuda_order: tuple[str, ...] | None = None  # auto's order on CUDA tensors; None: from `cuda`


class Op:
    """A registered op: backend choice and the kernel of each backend."""

    def __init__(self, spec: OpSpec):
        self.spec = spec
        self.name = spec.name
        self.triton_op = None
        if spec.triton is not None:
            self.triton_op = torch.library.custom_op(
                f"mmt::{triton_name(spec.name)}",
                self._launch_triton,
                mutates_args=_mutated(spec.schema),
                schema=spec.schema,
            )
            self.triton_op.register_fake(spec.fake)
        if _backend.load_C() and hasattr(torch.ops.mmt, spec.name):
            torch.library.register_fake(f"mmt::{spec.name}")(spec.fake)
        self._mutated = _mutated_positions(spec.schema)

    def _launch_triton(self, *args):
        # The launchers index tensors by their shapes: a strided view would be read and written wrongly.
        for i, t in enumerate(_tensors(args)):
            if not t.is_contiguous():
                raise ValueError(
                    f"mmt::{triton_name(self.name)}: tensor argument {i} (shape {tuple(t.shape)}, strides "
                    f"{t.stride()}) must be contiguous"
                )
        module, function = self.spec.triton.split(":")
        launcher = getattr(importlib.import_module(f"mmt_kernels.triton.{module}"), function)
        device = next((t.device for t in _tensors(args) if t.is_cuda), None)
        if device is None:
            return launcher(*args)
        with torch.cuda.device(device):  # Triton launches on the current device, not on the tensors' one
            return launcher(*args)

    def kernel(self, which: str) -> Callable[..., Any]:
        """The implementation of ``which`` backend, called with the schema's arguments."""
        if which in ("cpu", "cuda"):
            return getattr(torch.ops.mmt, self.name)
        if which == "triton":
            return self.triton_op
        assert which == "reference", which
        return self.spec.reference

    def __call__(self, which: str, *args):
        """Run backend ``which``. The kernels take contiguous tensors: a strided input is copied, and a strided
        tensor the op writes is updated through a contiguous copy that is written back afterwards."""
        args, write_back = list(args), []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and not a.is_contiguous():
                args[i] = a.contiguous()
                if i in self._mutated:
                    write_back.append((a, args[i]))
            elif isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and not t.is_contiguous() for t in a):
                args[i] = [t.contiguous() if isinstance(t, torch.Tensor) else t for t in a]
                if i in self._mutated:
                    write_back += [(t, c) for t, c in zip(a, args[i]) if c is not t]
        out = self.kernel(which)(*args)
        for view, dense in write_back:
            view.copy_(dense)
        return out

    def apply(self, *args):
        """The op's autograd function (for a kernel backend; the reference differentiates itself)."""
        return self.spec.autograd.apply(*args)

    def choose(
        self,
        device: torch.device | str,
        backend: str | None = None,
        dtype: torch.dtype | None = None,
        unable: tuple[str, ...] = (),
    ) -> str:
        """The backend for tensors of ``dtype`` on ``device``; ``unable``: backends whose kernels cannot take
        these inputs (e.g. too many tensors), skipped by ``auto`` and refused when forced."""
        return _choose(self.name, device, backend, dtype, unable)


OPS: dict[str, Op] = {}


def register(spec: OpSpec) -> Op:
    """Register ``spec`` once (fake, Triton custom op) and return its :class:`Op`."""
    assert spec.name not in OPS, f"mmt op {spec.name!r} registered twice"
    op = OPS[spec.name] = Op(spec)
    return op


def triton_name(name: str) -> str:
    """``moe_dispatch`` -> ``moe_dispatch_triton``; an in-place ``sparse_adamw_`` -> ``sparse_adamw_triton_``."""
    return f"{name[:-1]}_triton_" if name.endswith("_") else f"{name}_triton"


def _arguments(schema: str) -> list[str]:
    return [a.strip() for a in schema[schema.index("(") + 1 : schema.rindex(") ->")].split(",")]


def _mutated(schema: str) -> tuple[str, ...]:
    return tuple(a.split()[-1] for a in _arguments(schema) if "!)" in a)


def _mutated_positions(schema: str) -> frozenset[int]:
    return frozenset(i for i, a in enumerate(_arguments(schema)) if "!)" in a)


def _tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


@torch.compiler.assume_constant_result  # evaluated once while tracing: no graph break under torch.compile
def _choose(
    name: str, device: torch.device | str, backend: str | None, dtype: torch.dtype | None, unable: tuple[str, ...] = ()
) -> str:
    spec = OPS[name].spec
    device_type = torch.device(device).type
    wanted = (backend or _backend.get_backend()).lower()
    if wanted == "cuda" and device_type == "cuda" and not spec.cuda:
        wanted = "triton"  # documented: no CUDA C++ kernel for this op, so Triton runs it on GPU
    has_triton = spec.triton is not None
    if wanted != "auto":
        if dtype == torch.float64 and wanted not in spec.fp64:
            raise BackendUnavailableError(
                f"backend {wanted!r} cannot run mmt op {name!r}: it takes no fp64 "
                f"tensors (only {', '.join(spec.fp64)} do)"
            )
        if wanted in unable:
            raise BackendUnavailableError(f"backend {wanted!r} cannot run mmt op {name!r} on these inputs")
        ok, why = _backend.available(wanted, device_type, name, has_triton=has_triton)
        if not ok:
            raise BackendUnavailableError(f"backend {wanted!r} cannot run mmt op {name!r}: {why}")
        return wanted
    if device_type == "cuda":
        order = spec.cuda_order or (DEFAULT_CUDA_ORDER if spec.cuda else TRITON_ONLY_CUDA_ORDER)
    else:
        order = spec.cpu_order
    for candidate in order:
        if (dtype == torch.float64 and candidate not in spec.fp64) or candidate in unable:
            continue
        if _backend.available(candidate, device_type, name, has_triton=has_triton)[0]:
            return candidate
    return "reference"


def choose(
    name: str, device: torch.device | str, *, backend: str | None = None, dtype: torch.dtype | None = None
) -> str:
    """The backend that runs mmt op ``name`` on tensors of ``dtype`` on ``device``.

    ``backend`` (per call) beats ``set_backend``/``MMT_KERNELS_BACKEND``, which beat ``auto`` (the first
    available backend of the op's order for the device).
    """
    return OPS[name].choose(device, backend, dtype)


def check_indices(op: str, name: str, idx: torch.Tensor, upper, *, increasing: bool = False) -> None:
    """Every value of ``idx`` in ``[0, upper)`` (and strictly increasing): an out-of-range index would make a
    kernel read or write outside its tensors, a repeated one race. On CPU this raises at once; on a GPU it is
    an asynchronous device-side assertion (no host sync) that fails the next synchronising call."""
    if idx.numel() == 0 or torch.compiler.is_compiling():
        return
    ok = (idx.min() >= 0) & (idx.max() < upper)
    if increasing and idx.numel() > 1:
        ok = ok & (idx[1:] > idx[:-1]).all()
    order = " or not strictly increasing" if increasing else ""
    torch._assert_async(ok, f"{op}: {name} has values outside [0, {upper}){order}")

"""Stage 1: the router's FFT features and top-k routing.

There is no CUDA C++ kernel for the FFT features: on GPU, Triton runs them (also when ``cuda`` is forced). On CPU,
``auto`` takes the reference (``torch.fft.rfft``, an O(d log d) FFT): the C++ DFT GEMM ran at 0.67-0.80x of it
(``bench/bench_moe.py``); ``backend="cpu"`` still runs the GEMM.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .._registry import OpSpec, register
from ..reference import moe as _ref
from ._common import acc_dtype, check_float

route = _ref.route  # routing is a handful of small torch ops (topk, softmax); the same on every backend


class _FFTFeatures(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, basis, which):
        feats, reim = MOE_FFT_FEATURES(which, x, basis)
        ctx.save_for_backward(reim, basis)
        ctx.which = which
        return feats

    @staticmethod
    def backward(ctx, grad):
        reim, basis = ctx.saved_tensors
        return MOE_FFT_FEATURES_BACKWARD(ctx.which, grad.contiguous(), reim, basis), None, None


def _fft_reference(x, basis):
    reim = x.to(basis.dtype) @ basis
    n_freq = basis.shape[1] // 2
    return torch.log1p(torch.hypot(reim[:, :n_freq], reim[:, n_freq:])).to(x.dtype), reim


def _fft_backward_reference(grad, reim, basis):
    n_freq = basis.shape[1] // 2
    re, im = reim[:, :n_freq], reim[:, n_freq:]
    mag = torch.hypot(re, im)
    s = torch.where(mag > 0, grad.to(reim.dtype) / (mag * (1 + mag)).clamp_min(torch.finfo(reim.dtype).tiny), 0)
    return (torch.cat([s * re, s * im], 1) @ basis.t()).to(grad.dtype)


MOE_FFT_FEATURES = register(
    OpSpec(
        name="moe_fft_features",
        schema="(Tensor x, Tensor basis) -> (Tensor feats, Tensor reim)",
        reference=_fft_reference,
        fake=lambda x, basis: (
            x.new_empty(x.shape[0], basis.shape[1] // 2),
            basis.new_empty(x.shape[0], basis.shape[1]),
        ),
        triton="moe:fft_features",
        cuda=False,
        autograd=_FFTFeatures,
        cpu_order=("reference", "cpu"),
    )
)
MOE_FFT_FEATURES_BACKWARD = register(
    OpSpec(
        name="moe_fft_features_backward",
        schema="(Tensor grad, Tensor reim, Tensor basis) -> Tensor",
        reference=_fft_backward_reference,
        fake=lambda grad, reim, basis: grad.new_empty(grad.shape[0], basis.shape[0]),
        triton="moe:fft_features_backward",
        cuda=False,
        cpu_order=("reference", "cpu"),
    )
)


@lru_cache(maxsize=32)
def _basis(d: int, n_freq: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _ref.dft_basis(d, n_freq, dtype=dtype, device=device).contiguous()


def fft_features(x: torch.Tensor, n_freq: int, *, backend: str | None = None) -> torch.Tensor:
    """``log1p(|rfft(x)|)[..., :n_freq]`` over the last dim, as a DFT GEMM; differentiable (subgradient 0 at |X|=0)."""
    op = "moe_fft_features"
    check_float("x", x, op)
    d = x.shape[-1]
    if not 1 <= n_freq <= d // 2 + 1:
        raise ValueError(f"{op}: n_freq must be in [1, d//2+1 = {d // 2 + 1}] for hidden size d={d}, got {n_freq}")
    which = MOE_FFT_FEATURES.choose(x.device, backend, x.dtype)
    if which == "reference":
        return _ref.fft_features(x, n_freq)
    basis = _basis(d, n_freq, acc_dtype(x), x.device)
    out = MOE_FFT_FEATURES.apply(x.reshape(-1, d).contiguous(), basis, which)
    return out.reshape(*x.shape[:-1], n_freq)

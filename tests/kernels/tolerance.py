"""Tolerances derived from the reference's own low-precision error (flash-attn's rule).

A kernel's output may be at most ``factor`` times as far from a golden (fp64) result as the
reference run in the same precision, plus a few units in the last place of the output dtype (fused multiply-adds and
a different operation order; the Triton interpreter truncates fp32->bf16 stores instead of rounding).
"""

from __future__ import annotations

import torch


def ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of ``t.dtype`` at each element's magnitude."""
    eps = torch.finfo(t.dtype).eps
    tiny = torch.finfo(t.dtype).tiny
    return (t.detach().double().abs() * eps).clamp_min(tiny)


def assert_close_to_golden(
    out: torch.Tensor,
    ref_out: torch.Tensor,
    golden: torch.Tensor,
    *,
    factor: float = 2.0,
    ulps: float = 4.0,
    name: str = "output",
) -> None:
    assert out.shape == golden.shape, f"{name}: shape {tuple(out.shape)} != {tuple(golden.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten poison?)"
    if out.numel() == 0:
        return
    gold = golden.double()
    ref_err = (ref_out.double() - gold).abs()
    err = (out.double() - gold).abs()
    allowed = factor * ref_err.max() + ulps * ulp(golden.to(out.dtype))
    worst = (err - allowed).max()
    if worst > 0:
        idx = torch.argmax(err - allowed)
        raise AssertionError(
            f"{name}: error {err.flatten()[idx]:.3e} at flat index {int(idx)} exceeds allowed "
            f"{allowed.flatten()[idx]:.3e} (reference's own error max {ref_err.max():.3e}, dtype {out.dtype})"
        )


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) or an out-of-range value so elements a kernel forgot to write fail."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).min)

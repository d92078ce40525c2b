"""Family 2: FFT-routed top-k mixture of experts.

Pieces, each usable alone and each differentiable:

* :func:`fft_features` ``(x [T, d], n_freq) -> [T, F]``: ``log1p(|rfft(x)|)[:F]`` per token over the
  hidden dim, computed as a GEMM against a cached ``[d, 2F]`` cos/sin basis (exact, no complex tensor);
* :func:`route`: softmax top-k over router logits, returning the load-balancing and z losses;
* :func:`moe_permute`: counting sort of the (token, choice) slots by expert: ``perm``, ``inv``, ``offsets``;
* :func:`moe_dispatch` / :func:`moe_combine`: gather tokens into expert order / weighted gather back
  (no atomics: deterministic);
* :func:`grouped_mlp`: SwiGLU (or GeGLU) experts over their contiguous segments, forward and backward,
  with ``train_mask`` skipping the weight gradients of frozen experts;
* :func:`moe_ffn` and :class:`MoEFFN`: the whole dropless MoE FFN.

Backends: ``cpu`` (C++ in ``_C``), ``triton`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``),
``cuda`` (C++/CUDA for permute/dispatch/combine; the grouped GEMM and the FFT features are Triton-only
on GPU, so a forced ``cuda`` backend runs those two with Triton), ``reference`` (plain PyTorch).

One module per stage: ``routing`` (FFT features, top-k), ``permute``, ``dispatch`` (dispatch and combine),
``experts`` (grouped MLP), ``fused`` (the whole FFN), ``layer`` (:class:`MoEFFN`).
"""

from ._common import ACTS
from .dispatch import moe_combine, moe_dispatch
from .experts import grouped_mlp
from .fused import MoEOutput, moe_ffn
from .layer import MoEFFN
from .permute import moe_permute
from .routing import fft_features, route

__all__ = [
    "ACTS",
    "MoEFFN",
    "MoEOutput",
    "fft_features",
    "grouped_mlp",
    "moe_combine",
    "moe_dispatch",
    "moe_ffn",
    "moe_permute",
    "route",
]

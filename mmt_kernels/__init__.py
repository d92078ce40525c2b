"""mmt_kernels: fused ops for multilingual LLM post-training, usable without the rest of mmt.

Each op has a PyTorch reference (``mmt_kernels.reference``), a C++ CPU kernel, and Triton and CUDA
kernels; ``MMT_KERNELS_BACKEND`` or :func:`set_backend` forces one (see ``python -m mmt_kernels.info``).

- family 1, neuron-sparse AdamW: :func:`sparse_adamw_`, :func:`sparse_adamw_multi_`,
  :class:`NeuronSparseAdamW`, the Taylor importance accumulator :func:`taylor_accumulate_`, and neuron-sparse
  weight gradients (:func:`sparse_linear`, :func:`sparse_weight_grad_`);
- family 2, FFT-routed top-k MoE: :func:`fft_features`, :func:`route`, :func:`moe_permute`,
  :func:`moe_dispatch`, :func:`grouped_mlp`, :func:`moe_combine`, :func:`moe_ffn`, :class:`MoEFFN`;
- family 3, batched weight merging: :func:`merge_tensors` (the module ``mmt_kernels.merge`` keeps its
  name), :func:`magnitude_threshold`, :func:`dare_keep_mask`.
"""

from ._backend import BackendUnavailableError, get_backend, set_backend
from .loss import cross_entropy_grad_, cross_entropy_lse, gather_loss_positions, linear_cross_entropy
from .merge import dare_keep_mask, magnitude_threshold
from .merge import merge as merge_tensors
from .moe import MoEFFN, fft_features, grouped_mlp, moe_combine, moe_dispatch, moe_ffn, moe_permute, route
from .optim import NeuronSparseAdamW
from .sparse_adamw import sparse_adamw_, sparse_adamw_multi_
from .sparse_grad import SparseWeightGrad, sparse_linear, sparse_weight_grad_
from .taylor import TaylorHook, taylor_accumulate_, token_weights

__all__ = [
    "BackendUnavailableError",
    "get_backend",
    "set_backend",
    "sparse_adamw_",
    "sparse_adamw_multi_",
    "NeuronSparseAdamW",
    "TaylorHook",
    "taylor_accumulate_",
    "token_weights",
    "MoEFFN",
    "fft_features",
    "grouped_mlp",
    "moe_combine",
    "moe_dispatch",
    "moe_ffn",
    "moe_permute",
    "route",
    "merge_tensors",
    "magnitude_threshold",
    "dare_keep_mask",
    "sparse_weight_grad_",
    "sparse_linear",
    "SparseWeightGrad",
    "linear_cross_entropy",
    "gather_loss_positions",
    "cross_entropy_lse",
    "cross_entropy_grad_",
]
__version__ = "0.1.0"

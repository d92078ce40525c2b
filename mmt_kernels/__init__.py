"""mmt_kernels: fused ops for multilingual LLM post-training, usable without the rest of mmt.

Each op has a PyTorch reference (``mmt_kernels.reference``), a C++ CPU kernel, and Triton and CUDA
kernels; ``MMT_KERNELS_BACKEND`` or :func:`set_backend` forces one (see ``python -m mmt_kernels.info``).
"""
from ._backend import BackendUnavailableError, get_backend, set_backend
from .sparse_adamw import sparse_adamw_, sparse_adamw_multi_
from .taylor import TaylorHook, taylor_accumulate_, token_weights
from .optim import NeuronSparseAdamW

__all__ = ["BackendUnavailableError", "get_backend", "set_backend", "sparse_adamw_", "sparse_adamw_multi_",
           "TaylorHook", "taylor_accumulate_", "token_weights", "NeuronSparseAdamW"]
from .merge import dare_keep_mask, magnitude_threshold, merge as merge_tensors; __all__ += ["merge_tensors", "magnitude_threshold", "dare_keep_mask"]  # noqa: E402,E702
from .moe import MoEFFN, fft_features, grouped_mlp, moe_combine, moe_dispatch, moe_ffn, moe_permute, route; __all__ += ["MoEFFN", "fft_features", "grouped_mlp", "moe_combine", "moe_dispatch", "moe_ffn", "moe_permute", "route"]  # noqa: E402,E702
__version__ = "0.1.0"

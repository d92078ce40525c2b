"""mmt_kernels: fused ops for multilingual LLM post-training, usable without the rest of mmt.

Each op has a PyTorch reference (``mmt_kernels.reference``), a C++ CPU kernel, and Triton and CUDA
kernels; ``MMT_KERNELS_BACKEND`` or :func:`set_backend` forces one (see ``python -m mmt_kernels.info``).
"""
from ._backend import BackendUnavailableError, get_backend, set_backend
from .sparse_adamw import sparse_adamw_

__all__ = ["BackendUnavailableError", "get_backend", "set_backend", "sparse_adamw_"]
__version__ = "0.1.0"

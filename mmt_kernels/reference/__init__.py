"""Pure-PyTorch ground truth for every mmt op: short, readable, the spec the kernels are tested against.

Family 2 (MoE) lives in :mod:`mmt_kernels.reference.moe` (a per-expert loop like Hugging Face's Mixtral block).
"""

from . import moe
from .merge import dare_keep_mask, magnitude_threshold
from .merge import merge as merge_tensors
from .sparse_adamw import sparse_adamw_, sparse_adamw_multi_
from .taylor import taylor_accumulate_, token_weights

__all__ = [
    "sparse_adamw_",
    "sparse_adamw_multi_",
    "taylor_accumulate_",
    "token_weights",
    "merge_tensors",
    "magnitude_threshold",
    "dare_keep_mask",
    "moe",
]

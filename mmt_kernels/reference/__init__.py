"""Pure-PyTorch ground truth for every mmt op: short, readable, the spec the kernels are tested against."""
from .sparse_adamw import sparse_adamw_, sparse_adamw_multi_
from .taylor import taylor_accumulate_, token_weights

__all__ = ["sparse_adamw_", "sparse_adamw_multi_", "taylor_accumulate_", "token_weights"]
from .merge import dare_keep_mask, magnitude_threshold, merge as merge_tensors; __all__ += ["merge_tensors", "magnitude_threshold", "dare_keep_mask"]  # noqa: E402,E702
from . import moe; __all__ += ["moe"]  # noqa: E402,E702  (family 2: mmt_kernels.reference.moe.*)

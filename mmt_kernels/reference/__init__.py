"""Pure-PyTorch ground truth for every mmt op: short, readable, the spec the kernels are tested against."""
from .sparse_adamw import sparse_adamw_

__all__ = ["sparse_adamw_"]

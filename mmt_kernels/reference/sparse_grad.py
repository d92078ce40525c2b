"""Reference for neuron-sparse weight gradients: the selected neurons' rows of dW, compact.

For ``y = x @ W.T`` (``W [O, I]``) the weight gradient is ``dW = dy.T @ x``. Its rows (``neuron_dim=0``) or
columns (``neuron_dim=1``) for neurons ``rows`` are, one neuron per row of a ``[K, C]`` buffer:

- rows:    ``dW[rows, :]   = dy[:, rows].T @ x``   (``a = dy, b = x``)
- columns: ``dW[:, rows].T = x[:, rows].T @ dy``   (``a = x, b = dy``)

so one op covers both: ``acc += a[:, rows].T @ b`` (fp32 accumulator).
"""

from __future__ import annotations


def sparse_weight_grad_(acc, a, rows, b) -> None:
    acc += a.to(acc.dtype)[:, rows].t() @ b.to(acc.dtype)

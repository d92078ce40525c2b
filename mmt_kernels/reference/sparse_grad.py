"""Reference for neuron-sparse weight gradients: the selected neurons' rows of dW, compact.

For ``y = x @ W.T`` (``W [O, I]``) the weight gradient is ``dW = dy.T @ x``. Its rows (``neuron_dim=0``) or
columns (``neuron_dim=1``) for neurons ``rows`` are, in the layout of the optimizer's compact state:

- rows:    ``dW[rows, :] = dy[:, rows].T @ x``, ``[K, C]``  (``a = dy, b = x``)
- columns: ``dW[:, rows] = dy.T @ x[:, rows]``, ``[C, K]``  (``a = x, b = dy``, ``transposed``)

so one op covers both: ``acc += a[:, rows].T @ b``, or ``acc += b.T @ a[:, rows]`` when ``transposed``
(fp32 accumulator).
"""

from __future__ import annotations


def sparse_weight_grad_(acc, a, rows, b, transposed=False) -> None:
    picked, b = a.to(acc.dtype)[:, rows], b.to(acc.dtype)
    acc += b.t() @ picked if transposed else picked.t() @ b

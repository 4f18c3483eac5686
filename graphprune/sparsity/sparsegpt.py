"""SparseGPT: one-shot pruning with optimal-brain-surgeon weight updates from the layer Hessian.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (2023).
For a layer ``Y = W X`` with Hessian ``H = X X^T``, the columns are processed left to right: pruning
weight ``w_rc`` costs ``w_rc^2 / [H^-1]_cc^2`` and its error is spread over the not-yet-processed
columns of the row through the Cholesky factor of ``H^-1``.  As in the paper:

- damping ``H += lambda I`` with ``lambda`` = 1% of the mean diagonal (a column no sample reaches has a
  zero diagonal; it gets ``lambda`` too, so its weights are the cheapest to prune);
- the mask is chosen block by block (128 columns): unstructured, the block's share of the layer's
  prune count over all its rows; N:M, per row in every M consecutive columns;
- lazy batch updates: inside a block the error is applied column by column, to the rest of the
  matrix once per block (one matrix product).

The kept weights change -- that is the point; pruned ones are exactly zero.  Computation in float32,
as in the reference implementation.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from graphprune.sparsity.wanda import n_m_prune, prune_smallest

__all__ = ["DAMPING", "BLOCK_SIZE", "inverse_hessian_factor", "sparsegpt_prune"]

DAMPING = 0.01
BLOCK_SIZE = 128


def inverse_hessian_factor(hessian: np.ndarray, damping: float = DAMPING) -> np.ndarray:
    """Upper Cholesky factor ``U`` of the dampened ``H^-1`` (``H^-1 = U^T U``), float32.

    With ``J`` the reversal permutation and ``L`` the lower Cholesky factor of ``J H J``,
    ``H^-1 = (J L^-1 J)^T (J L^-1 J)`` and ``J L^-1 J`` is upper triangular: one factorization and
    one triangular inverse instead of inverting ``H`` and factorizing the inverse (a third of the
    arithmetic), in float32 as the reference implementation does.
    """
    h = np.array(hessian[::-1, ::-1], dtype=np.float32)
    diag = np.einsum("ii->i", h)  # a view: writes go to h
    mean = float(diag.mean(dtype=np.float64)) if diag.size else 0.0
    diag += np.float32(damping * mean if mean > 0 else 1.0)
    for attempt in range(4):
        try:
            lower = np.linalg.cholesky(h)
            break
        except np.linalg.LinAlgError:
            # Rounding made the float32 sums slightly indefinite: dampen more, as the reference's users do.
            diag += np.float32((10 ** attempt) * damping * max(mean, 1e-12))
    else:
        raise np.linalg.LinAlgError("Hessian is not positive definite even after extra damping")
    return np.ascontiguousarray(_lower_inverse(lower)[::-1, ::-1])


def _lower_inverse(lower: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix by 2x2 blocks: [[A, 0], [C, D]]^-1 = [[A^-1, 0],
    [-D^-1 C A^-1, D^-1]] -- matrix products (BLAS 3) instead of a general solve."""
    n = lower.shape[0]
    if n <= 256:
        return np.linalg.inv(lower).astype(lower.dtype, copy=False)
    half = n // 2
    a_inv = _lower_inverse(lower[:half, :half])
    d_inv = _lower_inverse(lower[half:, half:])
    result = np.zeros_like(lower)
    result[:half, :half] = a_inv
    result[half:, half:] = d_inv
    result[half:, :half] = -(d_inv @ (lower[half:, :half] @ a_inv))
    return result


def sparsegpt_prune(
    matrix: np.ndarray,
    hessian: np.ndarray,
    count: Optional[int] = None,
    pattern: Optional[Tuple[int, int]] = None,
    block_size: int = BLOCK_SIZE,
    damping: float = DAMPING,
) -> np.ndarray:
    """The pruned and updated ``[rows, K]`` weight matrix (float32).

    Args:
        matrix: the weights, one output per row, columns in the Hessian's order.
        hessian: ``[K, K]`` sum of ``x x^T`` over the calibration rows.
        count: weights to prune in total (unstructured), spread over the blocks by their width.
        pattern: ``(n, m)``: keep ``n`` in every ``m`` consecutive columns of each row.
        block_size: columns per block (rounded down to a multiple of ``m``).
        damping: fraction of the mean diagonal added to it.
    """
    w = np.array(matrix, dtype=np.float32)
    rows, columns = w.shape
    u = inverse_hessian_factor(hessian, damping)
    if pattern is not None:
        block_size = max(pattern[1], block_size // pattern[1] * pattern[1])
    # Unstructured: block b prunes round(count * end_b / K) - round(count * start_b / K), exact in total.
    bounds = list(range(0, columns, block_size)) + [columns]
    for start, end in zip(bounds[:-1], bounds[1:]):
        block = w[:, start:end].copy()
        u_block = u[start:end, start:end]
        d = np.diag(u_block)
        if pattern is None:
            share = int(round(count * end / columns)) - int(round(count * start / columns))
            pruned = prune_smallest(np.square(block) / np.square(d)[None, :], share)
        else:
            pruned = np.zeros(block.shape, dtype=bool)
        errors = np.zeros_like(block)
        for i in range(end - start):
            if pattern is not None and i % pattern[1] == 0:
                m = pattern[1]
                cost = np.square(block[:, i:i + m]) / np.square(d[i:i + m])[None, :]
                pruned[:, i:i + m] = n_m_prune(cost, pattern[0], m)
            column = block[:, i]
            q = np.where(pruned[:, i], np.float32(0), column)
            err = (column - q) / d[i]
            # Spread the error over the rest of the block (columns i+1..), then fix column i.
            block[:, i + 1:] -= np.outer(err, u_block[i, i + 1:])
            block[:, i] = q
            errors[:, i] = err
        w[:, start:end] = block
        if end < columns:
            w[:, end:] -= errors @ u[start:end, end:]
    return w

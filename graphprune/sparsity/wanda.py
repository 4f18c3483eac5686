"""Wanda's selection: prune the smallest ``|W_ij| * ||X_j||``, compared within each output row.

Sun et al., "A Simple and Effective Pruning Approach for Large Language Models" (2023): the score of
weight ``W_ij`` is its magnitude times the L2 norm of input feature ``j`` over the calibration rows,
and the comparison group is the output row (each output neuron loses the same fraction of its
inputs).  Selection is a partial sort (``argpartition``), O(n) per row.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["COMPARISON_GROUPS", "wanda_scores", "wanda_prune", "row_counts", "prune_smallest_per_row", "prune_smallest", "n_m_prune"]

# "row": per output row (the paper); "layer": one threshold over the layer.
COMPARISON_GROUPS = ("row", "layer")


def wanda_scores(matrix: np.ndarray, column_norms: np.ndarray) -> np.ndarray:
    """``|W| * ||X||`` for a ``[groups, rows, K]`` weight matrix and ``[groups, K]`` column norms."""
    return np.abs(matrix, dtype=np.float32) * column_norms[:, None, :].astype(np.float32)


def row_counts(rows: int, total: int) -> np.ndarray:
    """How many to prune in each of ``rows`` rows so that they add up to ``total`` exactly (the
    remainder goes one each to the first rows)."""
    base, extra = divmod(int(total), rows)
    counts = np.full(rows, base, dtype=np.int64)
    counts[:extra] += 1
    return counts


def prune_smallest_per_row(scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Boolean ``[R, K]``: True where a row's ``counts[r]`` smallest scores are (pruned)."""
    rows, columns = scores.shape
    pruned = np.zeros(scores.shape, dtype=bool)
    low, high = int(counts.min()), int(counts.max())
    if high == 0:
        return pruned
    if low >= columns:
        pruned[:] = True
        return pruned
    # Counts differ by at most one (``row_counts``): one partition with both boundaries in place
    # gives every row's `low` smallest (order[:, :low]) and the next one (order[:, low]).
    kth = [k for k in (low - 1, low) if 0 <= k < columns and (k == low - 1 or high > low)]
    order = np.argpartition(scores, kth, axis=1)
    np.put_along_axis(pruned, order[:, :low], True, axis=1)
    if high > low:
        extra = np.flatnonzero(counts > low)
        pruned[extra, order[extra, low]] = True
    return pruned


def prune_smallest(scores: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask of the ``count`` smallest scores of the whole array."""
    from graphprune.sparsity.masks import _smallest

    return _smallest(scores.ravel(), int(count)).reshape(scores.shape)


def n_m_prune(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Boolean ``[..., K]``: in every M consecutive columns, the ``m - n`` smallest scores (pruned)."""
    groups = scores.reshape(-1, m)
    pruned = np.zeros(groups.shape, dtype=bool)
    if m - n:
        order = np.argpartition(groups, m - n - 1, axis=1)
        np.put_along_axis(pruned, order[:, : m - n], True, axis=1)
    return pruned.reshape(scores.shape)


# Rows scored and ranked at a time: argpartition's int64 order is twice the float32 scores, so an
# LLM's LM head (32000 x 1280) would otherwise hold ~0.5 GB of temporaries at once.
_CHUNK_ELEMENTS = 1 << 22


def wanda_prune(matrix: np.ndarray, column_norms: np.ndarray, count: Optional[int], pattern=None,
                group: str = "row") -> np.ndarray:
    """Boolean ``[groups, rows, K]`` of the weights Wanda prunes: ``count`` of them (unstructured), or
    ``pattern = (n, m)`` per M consecutive columns."""
    if group == "layer" and pattern is None:
        return prune_smallest(wanda_scores(matrix, column_norms), count)
    # Row-wise decisions (per row, or per M columns of a row): a block of rows at a time.
    groups, rows, columns = matrix.shape
    pruned = np.empty(matrix.shape, dtype=bool)
    counts = None if pattern is not None else row_counts(groups * rows, count).reshape(groups, rows)
    step = max(1, _CHUNK_ELEMENTS // max(columns, 1))
    for g in range(groups):
        for start in range(0, rows, step):
            block = slice(start, start + step)
            scores = wanda_scores(matrix[g:g + 1, block], column_norms[g:g + 1])[0]
            if pattern is not None:
                pruned[g, block] = n_m_prune(scores, *pattern)
            else:
                pruned[g, block] = prune_smallest_per_row(scores, counts[g, block])
    return pruned

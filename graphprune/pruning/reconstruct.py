"""Reconstruction after channel removal: refit each layer that lost input channels by ridge regression.

A layer ``y = W x + b`` (Conv via im2col, Gemm, MatMul with a constant weight) whose input lost
channels is refit so that, on calibration data, its output on the *pruned* model's activations
matches the *original* layer's output on the original activations (kept output channels only)::

    W' = argmin ||W' X_p - Y||^2 + lam ||W' - W_p||^2 = (Y X_p^T + lam W_p) (X_p X_p^T + lam I)^-1

with a ones row in ``X_p`` for the bias.  The ridge term pulls toward the pruned weights ``W_p``
(the original's kept entries), not toward zero: with few samples the fit stays near the trained
weights instead of shrinking them.  ``lam`` is ``damp`` times the mean diagonal of ``X_p X_p^T``
(scale-free, as in SparseGPT/OBC's dampening).  Only ``X X^T`` and ``Y X^T`` are kept, summed over
batches: memory is O(D^2) per layer, whatever the number of samples.  The objective never rises
on the calibration data (``W_p`` itself is a candidate), so a refit cannot make a layer worse there.

The matrix side lives here; ``graphprune.pruning.reconstruct_layers`` finds the layers and the
order, ``graphprune.passes.reconstruct`` runs them sequentially on ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from typing import List, Optional, Sequence, Tuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["DAMPS", "WIDE_DAMPS", "EIGH_MAX_DIM", "blas_threads", "conv_columns", "conv_chunks", "conv_pads", "RidgeStats", "choose_damp"]

# Inputs of a batch with more elements than this are multiplied in float32.
_FLOAT32_ABOVE = 1 << 18
# Candidate ridge strengths (relative to the mean diagonal) tried on the held-out samples.
DAMPS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
# Above this many columns a layer's candidates are direct solves of the formed X X^T (one per damp),
# not one eigendecomposition: eigh costs ~7x a solve (measured, D = 2,000, one BLAS thread), and a
# 3x3 conv over 1,024 channels has D = 9,217 (PP-OCRv3 recognizer: 66 s per eigh).
EIGH_MAX_DIM = 1024
# ...and only these candidates: the wide layers of the recognizer chose 1e-3 or 1e-2 among all nine.
WIDE_DAMPS = (1e-3, 1e-2, 1e-1)
# Buffered rows (inputs + targets elements) multiplied at once (float64: 32 MB).
_BUFFER_ELEMENTS = 4 << 20
# Elements of one im2col chunk (float64): bounds the temporary memory of a Conv's columns (~64 MB).
_CHUNK_ELEMENTS = 8 << 20


@functools.lru_cache(maxsize=None)
def _openblas_threads():
    """(set, get) of the OpenBLAS that numpy loaded, found in this process's mapped libraries; or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line})
    except OSError:  # not Linux: leave BLAS as it is
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                try:
                    return getattr(lib, f"{prefix}_set_num_threads{suffix}"), getattr(lib, f"{prefix}_get_num_threads{suffix}")
                except AttributeError:
                    continue
    return None


@contextlib.contextmanager
def blas_threads(count: int = 1):
    """Run the block with ``count`` OpenBLAS threads (restored after).

    Reconstruction does thousands of small products and solves: with BLAS threads they took 40-100x
    the time of one thread on a shared 2-core machine (measured: eigh of 200x200, 0.20 s CPU vs
    0.005 s), threads waiting on each other and on ONNX Runtime's.  No effect without OpenBLAS.
    """
    funcs = _openblas_threads()
    if funcs is None:
        yield
        return
    setter, getter = funcs
    before = int(getter())
    setter(int(count))
    try:
        yield
    finally:
        setter(before)


def conv_pads(spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
              pads: Sequence[int], auto_pad: str) -> List[int]:
    """Explicit ``[begin..., end...]`` pads of a Conv, ``auto_pad`` resolved for the input's spatial size."""
    nd = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            extent = (k - 1) * d + 1
            out = -(-size // s)
            total = max((out - 1) * s + extent - size, 0)
            small = total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
        return begin + end
    if auto_pad == "VALID":
        return [0] * (2 * nd)
    return list(pads) if pads else [0] * (2 * nd)


def conv_columns(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
                 pads: Sequence[int], groups: int, positions: Optional[np.ndarray] = None) -> np.ndarray:
    """im2col of a Conv input: ``(groups, N * out_positions, C/groups * prod(kernel))``, float64.

    Column order matches a weight ``(O, C/groups, *kernel)`` flattened per output row, so
    ``cols @ W.reshape(O, -1).T`` is the convolution.  A 1x1 stride-1 unpadded conv is a reshape.
    ``positions`` (flat indices into the output's spatial positions, the same for every sample):
    only those rows, gathered without forming the others.
    """
    nd = len(kernel)
    n, c = x.shape[:2]
    x = x.astype(np.float64, copy=False)
    if all(k == 1 for k in kernel) and all(s == 1 for s in strides) and not any(pads):
        flat = x.reshape(n, groups, c // groups, -1)
        if positions is not None:
            flat = flat[..., positions]
        cols = np.moveaxis(flat, 3, 2)  # (N, G, P, Cg)
        return np.ascontiguousarray(np.moveaxis(cols, 1, 0)).reshape(groups, -1, c // groups)
    if any(pads):
        x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    windows = sliding_window_view(x, extent, axis=tuple(range(2, 2 + nd)))  # (N, C, *positions, *extent)
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
    index += tuple(slice(None, None, d) for d in dilations)
    windows = windows[index]  # (N, C, *out, *kernel)
    if positions is not None:  # (N, C, S, *kernel): a gather copies the chosen windows only
        where = np.unravel_index(positions, windows.shape[2:2 + nd])
        windows = windows[(slice(None), slice(None)) + where]
        nd_out = 1
    else:
        nd_out = nd
    out = windows.shape[2:2 + nd_out]
    windows = windows.reshape((n, groups, c // groups) + out + tuple(kernel))
    # -> (G, N, *out, Cg, *kernel): one row per output position, the weight's column order
    order = (1, 0) + tuple(range(3, 3 + nd_out)) + (2,) + tuple(range(3 + nd_out, 3 + nd_out + nd))
    return np.ascontiguousarray(windows.transpose(order)).reshape(groups, -1, (c // groups) * int(np.prod(kernel)))


def conv_chunks(n: int, per_sample: int) -> List[Tuple[int, int]]:
    """Sample ranges whose im2col stays under ``_CHUNK_ELEMENTS`` (at least one sample each)."""
    step = max(1, _CHUNK_ELEMENTS // max(per_sample, 1))
    return [(start, min(start + step, n)) for start in range(0, n, step)]


class RidgeStats:
    """Streamed sums for one layer (per conv group): ``X X^T``, ``Y X^T``, ``Y Y^T``'s trace, rows.

    Args:
        groups: independent regressions (a grouped Conv's groups; 1 otherwise).
        inputs: columns per group (input features, without the bias column).
        outputs: output rows per group.
        bias: append a ones column (fit a bias).
    """

    def __init__(self, groups: int, inputs: int, outputs: int, bias: bool):
        self.bias = bias
        dim = inputs + int(bias)
        self.xx = np.zeros((groups, dim, dim))
        self.yx = np.zeros((groups, outputs, dim))
        self.yy = np.zeros(groups)
        self.rows = 0
        self._pending: List[Tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    def add(self, cols: np.ndarray, targets: np.ndarray) -> None:
        """``cols``: (G, R, D) inputs, ``targets``: (G, R, O) the original outputs of the same rows.

        Rows are buffered up to ``_BUFFER_ELEMENTS`` and multiplied together: many small BLAS calls
        cost far more wall time than one large one (thread hand-offs, worst on a loaded machine)."""
        self._pending.append((cols, targets))
        self._pending_size += cols.size + targets.size
        self.rows += cols.shape[1]
        if self._pending_size >= _BUFFER_ELEMENTS:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        cols = np.concatenate([c for c, _ in self._pending], axis=1)
        targets = np.concatenate([t for _, t in self._pending], axis=1)
        self._pending, self._pending_size = [], 0
        # Large products run in float32 (BLAS sgemm, twice as fast) and are summed in float64;
        # small ones (the exactness tests, depthwise groups) stay float64 throughout.
        dtype = np.float32 if cols.size > _FLOAT32_ABOVE else np.float64
        cols = cols.astype(dtype, copy=False)
        targets = targets.astype(dtype, copy=False)
        if self.bias:
            cols = np.concatenate([cols, np.ones(cols.shape[:2] + (1,), dtype=dtype)], axis=2)
        # one 2-D product per group: numpy's stacked matmul of a transposed view takes a slow
        # non-BLAS path (30x slower measured), while ``c.T @ c`` is a BLAS syrk
        for g in range(cols.shape[0]):
            self.xx[g] += cols[g].T @ cols[g]
            self.yx[g] += targets[g].T @ cols[g]
        self.yy += np.einsum("gro,gro->g", targets, targets, dtype=np.float64)

    def merged(self, other: "RidgeStats") -> "RidgeStats":
        """The sums of both sample sets."""
        self.flush()
        other.flush()
        out = RidgeStats(self.xx.shape[0], self.xx.shape[1] - int(self.bias), self.yx.shape[1], self.bias)
        out.xx, out.yx, out.yy = self.xx + other.xx, self.yx + other.yx, self.yy + other.yy
        out.rows = self.rows + other.rows
        return out

    def error(self, weights: np.ndarray) -> float:
        """Relative squared error ``||W X - Y||^2 / ||Y||^2`` of ``weights`` (G, O, D) on the samples seen."""
        self.flush()
        # tr(W XX W^T) - 2 tr(W YX^T) by BLAS products (a 3-operand einsum loops in C without BLAS)
        fit = sum(float(np.vdot(weights[g] @ self.xx[g], weights[g])) for g in range(len(weights)))
        fit -= 2.0 * float(np.vdot(weights, self.yx))
        total = float(self.yy.sum())
        return float(max(fit + total, 0.0) / total) if total > 0 else 0.0

    def _normalized(self):
        self.flush()
        xx = self.xx / max(self.rows, 1)
        yx = self.yx / max(self.rows, 1)
        diag = np.einsum("gii->gi", xx).mean(axis=1)
        # an input that never fires (all-zero column) still gets a positive diagonal
        return xx, yx, np.where(diag > 0, diag, 1.0)

    def candidates(self, prior: np.ndarray, damps: Sequence[float]) -> List[np.ndarray]:
        """The solutions for each of ``damps``, from one eigendecomposition of ``X X^T``:
        ``W(lam) = (Y X^T + lam P) V (S + lam)^-1 V^T``; above ``EIGH_MAX_DIM`` columns one solve each."""
        if self.xx.shape[1] > EIGH_MAX_DIM:
            return [self.solve(prior, damp) for damp in damps]
        xx, yx, scale = self._normalized()
        values, vectors = np.linalg.eigh(xx)
        values = np.maximum(values, 0.0)
        yxv, pv = np.matmul(yx, vectors), np.matmul(prior, vectors)
        vt = vectors.transpose(0, 2, 1)
        out = []
        for damp in damps:
            lam = (damp * scale)[:, None, None]
            out.append(np.matmul((yxv + lam * pv) / (values[:, None, :] + lam), vt))
        return out

    def solve(self, prior: np.ndarray, damp: float) -> np.ndarray:
        """The ridge solution (G, O, D) pulled toward ``prior`` with ``lam = damp * mean(diag(X X^T))``."""
        dim = self.xx.shape[1]
        xx, yx, diag = self._normalized()
        lam = damp * diag
        a = xx + lam[:, None, None] * np.eye(dim)
        b = yx + lam[:, None, None] * prior
        try:
            return np.linalg.solve(a, b.transpose(0, 2, 1)).transpose(0, 2, 1)
        except np.linalg.LinAlgError:  # singular despite the damping (damp 0): least squares instead
            return np.stack([np.linalg.lstsq(a[g], b[g].T, rcond=None)[0].T for g in range(len(a))])


def choose_damp(fit: RidgeStats, held: RidgeStats, prior: np.ndarray, damps: Optional[Sequence[float]] = None
                ) -> Tuple[Optional[float], float, float, np.ndarray]:
    """(the damp whose fit on ``fit`` has the lowest error on ``held``, or None when no refit beats
    ``prior`` there; the held-out error of ``prior``; of the chosen solution; the chosen solution,
    ``prior`` when None).  ``damps`` None: ``DAMPS``, or ``WIDE_DAMPS`` above ``EIGH_MAX_DIM`` columns."""
    if damps is None:
        damps = WIDE_DAMPS if fit.xx.shape[1] > EIGH_MAX_DIM else DAMPS
    before = held.error(prior)
    best, best_error, solution = None, before, prior
    for damp, candidate in zip(damps, fit.candidates(prior, damps)):
        if np.isfinite(candidate).all():
            error = held.error(candidate)
            if error < best_error:
                best, best_error, solution = damp, error, candidate
    return best, before, best_error, solution

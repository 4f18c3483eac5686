"""NumPy forward passes of the layers the fixture builders emit, used to calibrate synthetic weights.

``GraphBuilder`` pushes a small standard-normal batch through every layer as it writes it, so
that BatchNormalization running statistics are the statistics that really reach the layer (as
after training) and layers without a normalization can be scaled to unit output variance.  These
functions follow ONNX semantics for the attribute subsets the builders use; they are not a general
ONNX reference.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = [
    "conv2d",
    "conv_transpose2d",
    "max_pool2d",
    "global_avg_pool",
    "resize_nearest",
    "batch_norm",
    "gemm",
    "channel_stats",
    "ACTIVATIONS",
]


def _windows(x: np.ndarray, kernel: int, stride: int, pad: int, fill: float = 0.0) -> np.ndarray:
    """[N, C, Ho, Wo, k, k] views of the (padded) input."""
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    view = np.lib.stride_tricks.sliding_window_view(x, (kernel, kernel), axis=(2, 3))
    return view[:, :, ::stride, ::stride]


def conv2d(x: np.ndarray, w: np.ndarray, b=None, stride: int = 1, pad: int = 0, groups: int = 1) -> np.ndarray:
    """ONNX Conv with square kernel, symmetric padding, no dilation."""
    n, c = x.shape[:2]
    out, cin_g, k = w.shape[0], w.shape[1], w.shape[2]
    cols = _windows(x, k, stride, pad)
    ho, wo = cols.shape[2], cols.shape[3]
    if groups == 1:
        # [N*Ho*Wo, C*k*k] @ [C*k*k, O]: one BLAS call.
        flat = np.ascontiguousarray(cols.transpose(0, 2, 3, 1, 4, 5)).reshape(n * ho * wo, c * k * k)
        y = (flat @ w.reshape(out, -1).T).reshape(n, ho, wo, out).transpose(0, 3, 1, 2)
    else:
        # Batched over groups: [g, N*Ho*Wo, C/g*k*k] @ [g, C/g*k*k, O/g].
        grouped = cols.reshape(n, groups, cin_g, ho, wo, k, k).transpose(1, 0, 3, 4, 2, 5, 6)
        grouped = np.ascontiguousarray(grouped).reshape(groups, n * ho * wo, cin_g * k * k)
        wg = w.reshape(groups, out // groups, cin_g * k * k).transpose(0, 2, 1)
        y = np.matmul(grouped, wg).reshape(groups, n, ho, wo, out // groups)
        y = y.transpose(1, 0, 4, 2, 3).reshape(n, out, ho, wo)
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1)
    return np.ascontiguousarray(y, dtype=np.float32)


def conv_transpose2d(x: np.ndarray, w: np.ndarray, b=None, stride: int = 2) -> np.ndarray:
    """ONNX ConvTranspose with kernel == stride and no padding (each input pixel -> one k x k patch)."""
    n, c, h, wd = x.shape
    cout, k = w.shape[1], w.shape[2]
    if k != stride:
        raise NotImplementedError("calibration supports ConvTranspose with kernel == stride only")
    y = np.einsum("nchw,coij->nohiwj", x, w, optimize=True).reshape(n, cout, h * k, wd * k)
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1)
    return np.ascontiguousarray(y, dtype=np.float32)


def max_pool2d(x: np.ndarray, kernel: int, stride: int, pad: int = 0) -> np.ndarray:
    return _windows(x, kernel, stride, pad, fill=-np.inf).max(axis=(4, 5)).astype(np.float32)


def global_avg_pool(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=(2, 3), keepdims=True, dtype=np.float64).astype(np.float32)


def resize_nearest(x: np.ndarray, scale: int) -> np.ndarray:
    """Resize(mode=nearest, asymmetric, floor) by an integer factor: each pixel repeated."""
    return np.repeat(np.repeat(x, scale, axis=2), scale, axis=3)


def batch_norm(x: np.ndarray, gamma, beta, mean, var, eps: float = 1e-5) -> np.ndarray:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    a = (gamma / np.sqrt(var + eps)).reshape(shape)
    return (a * (x - mean.reshape(shape)) + beta.reshape(shape)).astype(np.float32)


def gemm(x: np.ndarray, w: np.ndarray, b=None) -> np.ndarray:
    """Gemm with transB=1: x [N, in] @ w[out, in]^T + b."""
    y = x @ w.T
    return (y if b is None else y + b).astype(np.float32)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


ACTIVATIONS = {
    "relu": lambda v: np.maximum(v, 0.0),
    "relu6": lambda v: np.clip(v, 0.0, 6.0),
    "hardswish": lambda v: v * np.clip(v / 6.0 + 0.5, 0.0, 1.0),
    "hardsigmoid": lambda v: np.clip(v / 6.0 + 0.5, 0.0, 1.0),
    "sigmoid": _sigmoid,
    "silu": lambda v: v * _sigmoid(v),
}


def channel_stats(x: np.ndarray, axes: Sequence[int] = None):
    """Per-channel (axis 1) mean and variance over every other axis, in float64."""
    axes = tuple(axes) if axes is not None else (0,) + tuple(range(2, x.ndim))
    return x.mean(axis=axes, dtype=np.float64), x.var(axis=axes, dtype=np.float64)

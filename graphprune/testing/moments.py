"""Per-channel estimates of activation statistics, used to give the light models' weights a realistic scale.

Random weights make a deep network's activations grow or shrink geometrically with depth, and a
softmax on top then saturates.  A trained network does not do that: its BatchNormalization running
statistics match what actually reaches each layer.  ``zoo`` gets the same property for onnx's
light models, whose op mix is arbitrary, without running them: it carries, for every tensor, a
``Moments`` estimate (per channel: mean and mean square over batch and positions, model inputs
taken as standard normal) and

* scales a weight so its layer's output has about unit variance (LSUV-style);
* sets a BatchNormalization's running mean and variance to the estimated statistics of its input,
  as training would have left them.

Statistics are kept per channel because channels differ a lot (kept trained BN parameters, group
convolutions that only mix a few channels): a single scalar would mis-set every BN after them.
Element-wise functions are exact for a Gaussian input (Gauss-Hermite quadrature); linear layers use
the independence of their inputs; a max pool is the max of independent draws.  The estimate drifts
by a few percent per layer (measured against ONNX Runtime: activations end within 5x of it in
ResNet-50, 11x in Inception-v2), which keeps outputs finite and far from saturation.  The
fixture builders, which know their ops, calibrate exactly instead (``npops``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "Moments",
    "make",
    "unit",
    "elementwise",
    "relu",
    "add",
    "mul",
    "concat",
    "channel_affine",
    "linear",
    "max_pool",
    "avg_pool",
    "global_avg_pool",
    "padding_fraction",
]

# Nodes and weights of 48-point Gauss-Hermite quadrature for E[f(X)], X ~ N(0, 1).
_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(48)
_WEIGHTS = _WEIGHTS / np.sqrt(2.0 * np.pi)

# Floor on variances so a dead channel never divides by zero downstream.
_TINY = 1e-12


@dataclasses.dataclass(frozen=True)
class Moments:
    """Per-channel mean and mean square of a tensor (1-D arrays, one entry per channel).

    A single entry stands for "every channel alike" and broadcasts against any channel count.
    """

    mean: np.ndarray
    meansq: np.ndarray

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.meansq - self.mean**2, _TINY)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    @property
    def channels(self) -> int:
        return len(self.mean)

    def rms(self) -> float:
        """Root mean square over all channels: the single number a layer's scale is set from."""
        return float(np.sqrt(np.mean(self.meansq)))

    def expand(self, channels: int) -> "Moments":
        """The same statistics for ``channels`` channels (broadcasting a shared entry)."""
        if self.channels == channels:
            return self
        if self.channels != 1:
            # Channel identity is lost (an unexpected reshape): fall back to the channel average.
            return Moments(np.full(channels, self.mean.mean()), np.full(channels, self.meansq.mean()))
        return Moments(np.repeat(self.mean, channels), np.repeat(self.meansq, channels))

    def averaged(self) -> "Moments":
        return Moments(np.array([self.mean.mean()]), np.array([self.meansq.mean()]))


def make(mean, var) -> Moments:
    mean = np.atleast_1d(np.asarray(mean, dtype=np.float64))
    var = np.atleast_1d(np.asarray(var, dtype=np.float64))
    mean, var = np.broadcast_arrays(mean, var)
    return Moments(mean.copy(), var + mean**2)


def unit(channels: int = 1) -> Moments:
    """Standard-normal data, which is what tests and benchmarks feed."""
    return make(np.zeros(channels), np.ones(channels))


def elementwise(m: Moments, fn: Callable[[np.ndarray], np.ndarray]) -> Moments:
    """Moments of ``fn(X)`` for X Gaussian with each channel's mean and variance."""
    values = fn(m.mean[:, None] + m.std[:, None] * _NODES[None, :])
    return Moments(values @ _WEIGHTS, (values * values) @ _WEIGHTS)


def relu(m: Moments) -> Moments:
    return elementwise(m, lambda x: np.maximum(x, 0.0))


def add(*parts: Moments) -> Moments:
    """Sum of independent tensors (a residual connection, a bias)."""
    mean = sum(p.mean for p in parts)
    var = sum(p.var for p in parts)
    return make(mean, var)


def mul(a: Moments, b: Moments) -> Moments:
    """Product of independent tensors (a gate, a squeeze-excitation scale)."""
    return Moments(a.mean * b.mean, a.meansq * b.meansq)


def concat(parts: Sequence[Moments], sizes: Sequence[int]) -> Moments:
    """Concatenation along channels; ``sizes`` says how many channels each part has."""
    expanded = [p.expand(n) for p, n in zip(parts, sizes)]
    return Moments(np.concatenate([p.mean for p in expanded]), np.concatenate([p.meansq for p in expanded]))


def channel_affine(m: Moments, scale: np.ndarray, shift: np.ndarray) -> Moments:
    """``scale[c] * x + shift[c]`` (BatchNormalization in inference form, a per-channel Mul/Add)."""
    scale = np.asarray(scale, dtype=np.float64).ravel()
    shift = np.asarray(shift, dtype=np.float64).ravel()
    m = m.expand(max(len(scale), len(shift)))
    return make(scale * m.mean + shift, scale**2 * m.var)


def linear(
    m: Moments,
    weight: np.ndarray,
    bias: Optional[np.ndarray] = None,
    groups: int = 1,
    tap_fraction: float = 1.0,
) -> Moments:
    """Moments of a Conv / Gemm output; ``weight`` is [out, in / groups, *kernel].

    Input elements are taken as independent (the variance of a sum of many weakly correlated
    terms).  ``tap_fraction`` is the share of kernel taps that see real data rather than zero
    padding, averaged over output positions: it matters on the small images tests use.
    """
    w = np.asarray(weight)
    out, cin_g = w.shape[0], w.shape[1]
    flat = w.reshape(groups, out // groups, cin_g, -1)
    m = m.expand(cin_g * groups)
    in_mean = m.mean.reshape(groups, cin_g).astype(w.dtype)
    # A padded tap contributes neither mean nor variance, but the mean it misses adds variance.
    in_var = (m.var + (1.0 - tap_fraction) * m.mean**2).reshape(groups, cin_g).astype(w.dtype)
    # Single-pass einsums: no squared or float64 copy of the weight (classifiers reach 400 MB).
    mean = tap_fraction * np.einsum("goik,gi->go", flat, in_mean).astype(np.float64).ravel()
    var = tap_fraction * np.einsum("goik,goik,gi->go", flat, flat, in_var).astype(np.float64).ravel()
    if bias is not None:
        mean = mean + np.asarray(bias, dtype=np.float64).ravel()
    return make(mean, var)


def padding_fraction(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, dilation: int = 1) -> float:
    """Share of (output position, tap) pairs along one axis that fall inside the input."""
    out = (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1
    if out <= 0 or kernel <= 0:
        return 1.0
    starts = np.arange(out) * stride - pad_begin
    taps = starts[:, None] + dilation * np.arange(kernel)[None, :]
    return float(np.mean((taps >= 0) & (taps < size)))


def max_pool(m: Moments, window: int) -> Moments:
    """MaxPool over ``window`` elements (kernel area): the max of ``window`` independent draws.

    Neighbouring activations are somewhat correlated, which makes this an upper bound; it is close
    for the early layers where pools sit.
    """
    if window <= 1:
        return m
    shift, narrow = _max_of_normals(window)
    return make(m.mean + shift * m.std, narrow * m.var)


@functools.lru_cache(maxsize=None)
def _max_of_normals(n: int) -> Tuple[float, float]:
    """Mean and variance of the largest of ``n`` independent standard normals."""
    x = np.linspace(-8.0, 8.0, 4001)
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    density = n * pdf * cdf ** (n - 1)
    dx = x[1] - x[0]
    mean = float(np.sum(x * density) * dx)
    return mean, float(np.sum((x - mean) ** 2 * density) * dx)


def avg_pool(m: Moments, window: int) -> Moments:
    """AveragePool: the mean is kept; correlated inputs shrink the spread by less than the window."""
    if window <= 1:
        return m
    return make(m.mean, m.var / min(float(window), 2.0))


def global_avg_pool(m: Moments) -> Moments:
    """GlobalAveragePool: the mean is kept; per-sample channel means vary far less than pixels."""
    return make(m.mean, m.var / 8.0)

"""ONNX Runtime's per-channel weight quantization, one numpy call per weight instead of one per channel.

``QDQQuantizer`` computes each per-channel weight's scales with a Python loop over its channels
(``compute_data_quant_params`` on every slice: ~50 numpy calls each) and quantizes it with a
second loop (``quantize_nparray`` per slice).  On a 20,000-node graph that is 480,000 channel
calls and about a minute of CPU.  ``vectorized_channels`` makes the quantizer do the same
arithmetic on whole weights: the same float32/float64 operations element by element (min, max,
the symmetric range, the scale in float64 stored as float32, the division, round-half-even, the
zero point, the clip), so scales, zero points and int8 values are bit-identical
(tests/test_quantize_channels.py compares them with ORT's loops).

Only the plain case is taken over: a float32 weight, per-channel (symmetric), no tensor
overrides, no ``min_real_range``, integer types, no blocks; everything else (and any weight
whose scale would come out NaN, which ORT refuses with its own assertion) goes to ORT's code.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["channel_params", "quantize_channels", "vectorized_channels", "fast_quantizer_class"]

_INT_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16)


def _quant_utils():
    return importlib.import_module("onnxruntime.quantization.quant_utils")


# Channels are quantized in slices of about this many float32 bytes: the temporaries stay small
# next to a large weight (ORT's loop held one channel's).
_SLICE_BYTES = 4 * 2**20


def channel_params(data: np.ndarray, axis: int, quant_type: int, reduce_range: bool = False
                   ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(zero points, scales) of symmetric per-channel quantization along ``axis``, as ORT's loop of
    ``compute_data_quant_params(data.take(i, axis).ravel(), quant_type, True, reduce_range)``
    stacks them; None when that loop must run instead (empty channels, non-float32, NaN scales)."""
    if data.dtype != np.float32 or data.ndim == 0 or data.shape[axis] == 0 or data.size == 0:
        return None
    qmin, qmax = _quant_utils().get_qmin_qmax_for_qType(quant_type, reduce_range, symmetric=True)
    others = tuple(i for i in range(data.ndim) if i != axis)  # reduced in place, no [channels, rest] copy
    # compute_scale_zp: the range widened to hold zero, then made symmetric (float32 throughout; the
    # order of the reduction only decides the sign of a zero bound, which abs() drops)
    rmin = np.minimum(data.min(axis=others), np.array(0, dtype=np.float32))
    rmax = np.maximum(data.max(axis=others), np.array(0, dtype=np.float32))
    absmax = np.maximum(np.abs(rmin), np.abs(rmax))
    # the scale in float64, from the float32 bounds, as ORT promotes before subtracting
    scale64 = ((+absmax).astype(np.float64) - (-absmax).astype(np.float64)) / (
        np.array(qmax, dtype=np.float64) - np.array(qmin, dtype=np.float64))
    if np.isnan(scale64).any():
        return None  # ORT's ``assert scale >= 0`` is the refusal
    tiny = np.finfo(np.float32).tiny
    degenerate = scale64 < tiny  # ORT: scale 1.0 and zero point 0 for an all-zero channel
    middle = np.array(np.round((qmin + qmax) / np.array(2.0, dtype=np.float64)), dtype=qmin.dtype)
    scales = np.where(degenerate, np.float32(1.0), scale64.astype(np.float32)).astype(np.float32)
    zero_points = np.where(degenerate, np.array(0, dtype=qmin.dtype), middle).astype(qmin.dtype)
    return zero_points, scales


def quantize_channels(data: np.ndarray, axis: int, quant_type: int, scale: np.ndarray, zero_point: np.ndarray
                      ) -> np.ndarray:
    """``data`` quantized channel by channel along ``axis`` as ORT's ``quantize_nparray`` does each
    slice: float32 division by the channel's scale, round half to even, plus its zero point, clipped
    to the full range of ``quant_type``, cast."""
    qmin, qmax = _quant_utils().get_qmin_qmax_for_qType(quant_type, reduce_range=False, symmetric=False)
    shape = [1] * data.ndim
    shape[axis] = data.shape[axis]
    scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    result = np.empty(data.shape, dtype=onnx.helper.tensor_dtype_to_np_dtype(quant_type))
    channel_bytes = max(1, data.size // max(1, data.shape[axis])) * 4
    step = max(1, _SLICE_BYTES // channel_bytes)
    for start in range(0, data.shape[axis], step):
        part = [slice(None)] * data.ndim
        part[axis] = slice(start, start + step)
        part = tuple(part)
        values = data[part].astype(np.float32)  # a copy, then worked in place
        np.divide(values, scale[part], out=values)
        np.round(values, out=values)
        np.add(values, zero_point[part], out=values)
        np.clip(values, qmin, qmax, out=values)
        result[part] = values
    return result


def _plain(quantizer, name: str, info) -> bool:
    """A weight ORT would quantize per channel with nothing but the defaults."""
    from onnxruntime.quantization.qdq_quantizer import QDQQuantTensorType

    return (info.tensor_type is QDQQuantTensorType.WEIGHT and info.axis is not None
            and quantizer.weight_qType in _INT_TYPES and not getattr(quantizer, "block_size", 0)
            and quantizer.min_real_range is None and name not in quantizer.tensor_quant_overrides)


def _calc_initializer_quant_params(self) -> Dict[str, object]:
    """``QDQQuantizer._calc_initializer_quant_params`` with the plain per-channel weights computed
    whole (``channel_params``); ORT's own method computes the others."""
    from onnxruntime.quantization.base_quantizer import QuantizationParams

    qdq = importlib.import_module("onnxruntime.quantization.qdq_quantizer")
    done: Dict[str, object] = {}
    for name, info in self.tensors_to_quantize.items():
        if not _plain(self, name, info):
            continue
        initializer = qdq.find_by_name(name, self.model.initializer())
        if not initializer:
            continue
        data = qdq.tensor_proto_to_array(initializer)
        valid, axis = qdq.normalize_axis(info.axis, data.ndim)
        found = channel_params(data, axis, self.weight_qType, self.reduce_range) if valid else None
        if found is not None:
            done[name] = QuantizationParams(zero_point=found[0], scale=found[1], quant_type=self.weight_qType, axis=axis)
    everything = self.tensors_to_quantize
    self.tensors_to_quantize = {n: i for n, i in everything.items() if n not in done}
    try:
        params = qdq.QDQQuantizer._calc_initializer_quant_params(self)
    finally:
        self.tensors_to_quantize = everything
    params.update(done)  # read by name only
    return params


@functools.lru_cache(maxsize=None)
def fast_quantizer_class() -> type:
    """``QDQQuantizer`` with ``_calc_initializer_quant_params`` computing plain per-channel weights whole."""
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    return type("ChannelQDQQuantizer", (QDQQuantizer,), {
        "_calc_initializer_quant_params": _calc_initializer_quant_params, "__module__": __name__})


@contextlib.contextmanager
def vectorized_channels() -> Iterator[None]:
    """While active, ORT's quantizer writes per-channel int8 weights with ``quantize_channels``
    (its ``quantize_onnx_initializer`` keeps every other case)."""
    qdq = importlib.import_module("onnxruntime.quantization.qdq_quantizer")
    original = qdq.quantize_onnx_initializer

    def quantize_onnx_initializer(weight, quant_type, zero_point, scale, axis=None, quant_weight_name=None,
                                  block_size=0):
        if axis is None or block_size > 0 or quant_type not in _INT_TYPES or np.ndim(scale) != 1:
            return original(weight, quant_type, zero_point, scale, axis, quant_weight_name, block_size=block_size)
        data = _quant_utils().tensor_proto_to_array(weight)  # looked up now: weights read from disk
        if data.dtype != np.float32 or np.asarray(scale).dtype != np.float32 or data.ndim == 0 \
                or data.shape[axis] != len(scale):
            return original(weight, quant_type, zero_point, scale, axis, quant_weight_name, block_size=block_size)
        values = quantize_channels(data, axis, quant_type, np.asarray(scale), np.asarray(zero_point))
        name = quant_weight_name if quant_weight_name else f"{weight.name}{_quant_utils().TENSOR_NAME_QUANT_SUFFIX}"
        return numpy_helper.from_array(values.reshape(weight.dims), name)

    qdq.quantize_onnx_initializer = quantize_onnx_initializer
    try:
        yield
    finally:
        qdq.quantize_onnx_initializer = original

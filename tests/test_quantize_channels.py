"""Per-channel weights quantized whole (quantization/channel_weights.py): the same bits as ORT's channel loops."""

from __future__ import annotations

import contextlib

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxruntime.quantization import quant_utils
from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

from graphprune.quantization import channel_weights, engine
from graphprune.quantization.calibration import calibrate, calibration_feeds
from graphprune.quantization.channel_weights import channel_params, quantize_channels
from graphprune.quantization.config import QuantConfig
from graphprune.quantization.engine import insert_qdq_nodes
from graphprune.quantization.prepare import prepare
from graphprune.quantization.rules import eligible_nodes
from graphprune.testing.fixtures import fixture_corpus
from tests.test_quantize_pass import dense_cnn, matmul_net

_INT8, _UINT8 = onnx.TensorProto.INT8, onnx.TensorProto.UINT8


def _weights():
    """Weights with the cases that take other branches in ORT: all-zero and subnormal channels,
    one-signed channels, huge and infinite values, ties at .5 after division."""
    rng = np.random.default_rng(0)
    conv = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    conv[2] = 0.0
    conv[5] = np.float32(1e-39)  # subnormal: scale below float32's tiny
    conv[7] = np.abs(conv[7])
    conv[8] = -np.abs(conv[8]) * 1e30
    dense = rng.standard_normal((24, 40)).astype(np.float32)
    dense[:, 3] = np.inf
    dense[:, 4] = np.arange(24, dtype=np.float32) * 0.5  # exact halves
    return [(conv, 0), (conv, 1), (dense, 1), (dense, 0), (dense[:, :1], 1), (rng.random((5, 4, 6)).astype(np.float32), 2)]


def _ort_loops(data, axis, qtype):
    zps, scales = [], []
    for i in range(data.shape[axis]):
        zp, scale = quant_utils.compute_data_quant_params(data.take(i, axis).ravel(), qtype, True)
        zps.append(zp)
        scales.append(scale)
    zps, scales = np.asarray(zps), np.asarray(scales)
    tensor = quant_utils.quantize_onnx_initializer(numpy_helper.from_array(data, "w"), qtype, zps, scales, axis)
    return zps, scales, numpy_helper.to_array(tensor)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the infinite channel: inf / inf, as in ORT
@pytest.mark.parametrize("qtype", [_INT8, _UINT8])
@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("slice_bytes", [100, 2**22])  # several channels per slice, or all at once
def test_channel_params_and_values_match_ort_loops(case, qtype, slice_bytes, monkeypatch):
    monkeypatch.setattr(channel_weights, "_SLICE_BYTES", slice_bytes)
    data, axis = _weights()[case]
    expected_zp, expected_scale, expected_q = _ort_loops(data, axis, qtype)
    zp, scale = channel_params(data, axis, qtype)
    assert zp.dtype == expected_zp.dtype and scale.dtype == expected_scale.dtype
    assert zp.tobytes() == expected_zp.tobytes() and scale.tobytes() == expected_scale.tobytes()
    values = quantize_channels(data, axis, qtype, scale, zp)
    assert values.dtype == expected_q.dtype and values.shape == expected_q.shape
    assert values.tobytes() == expected_q.tobytes()


def test_nan_and_empty_weights_are_left_to_ort():
    data = np.ones((4, 3), np.float32)
    data[1, 2] = np.nan
    assert channel_params(data, 0, _INT8) is None  # ORT asserts on the NaN scale itself
    assert channel_params(np.zeros((4, 0), np.float32), 0, _INT8) is None
    assert channel_params(np.ones((4, 3), np.float16), 0, _INT8) is None


def _quantize_both_ways(model, monkeypatch, config):
    prepared = prepare(model)
    feeds, _ = calibration_feeds(prepared, None, {}, config, 0)
    ranges = calibrate(prepared, feeds, config)
    nodes = [n for n, reason in eligible_nodes(prepared).items() if reason is None]
    fast = insert_qdq_nodes(prepared, ranges, nodes, config)
    with monkeypatch.context() as m:
        m.setattr(engine, "fast_quantizer_class", lambda: QDQQuantizer)
        m.setattr(engine, "vectorized_channels", contextlib.nullcontext)
        plain = insert_qdq_nodes(prepared, ranges, nodes, config)
    return fast, plain


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name,per_channel", [("dense_cnn", True), ("matmul_net", True), ("resnet18", True),
                                              ("mobilenet_v2", True), ("dense_cnn", False)])
def test_quantized_model_is_byte_identical(name, per_channel, monkeypatch):
    models = {"dense_cnn": dense_cnn, "matmul_net": matmul_net, **fixture_corpus()}
    config = QuantConfig("minmax", per_channel, "uint8", 8)
    fast, plain = _quantize_both_ways(models[name](), monkeypatch, config)
    assert any(n.op_type == "DequantizeLinear" for n in fast.graph.node)
    assert fast.SerializeToString(deterministic=True) == plain.SerializeToString(deterministic=True)

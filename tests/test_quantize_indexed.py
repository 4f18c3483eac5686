"""ORT's quantizer on an indexed ONNXModel (quantization/indexed_model.py): byte-identical output, linear time."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.quantization import engine
from graphprune.quantization.calibration import calibrate, calibration_feeds
from graphprune.quantization.config import QuantConfig
from graphprune.quantization.engine import insert_qdq_nodes
from graphprune.quantization.prepare import prepare
from graphprune.quantization.rules import eligible_nodes
from graphprune.testing.fixtures import fixture_corpus, transformer_corpus
from tests.test_quantize_pass import dense_cnn, depthwise_net, matmul_net, outlier_net

_MODELS = {
    "dense_cnn": dense_cnn,
    "depthwise_net": depthwise_net,
    "outlier_net": outlier_net,
    "matmul_net": matmul_net,
    **{k: fixture_corpus()[k] for k in ("resnet18", "mobilenet_v2", "yolov8_c2f_net", "unet", "mlp")},
    **{k: transformer_corpus()[k] for k in ("bert_encoder", "gpt_decoder_gqa_swiglu")},
}


def _quantize_both_ways(model: onnx.ModelProto, monkeypatch, config: QuantConfig):
    prepared = prepare(model)
    shapes = {"N": 1, "S": 8}
    feeds, _ = calibration_feeds(prepared, None, {}, config, 0) if not _dynamic(prepared) else \
        calibration_feeds(prepared, None, _concrete(prepared, shapes), config, 0)
    ranges = calibrate(prepared, feeds, config)
    nodes = [n for n, reason in eligible_nodes(prepared).items() if reason is None]
    indexed = insert_qdq_nodes(prepared, ranges, nodes, config)
    with monkeypatch.context() as m:
        m.setattr(engine, "indexed_quantizer", contextlib.nullcontext)
        plain = insert_qdq_nodes(prepared, ranges, nodes, config)
    return nodes, indexed, plain


def _dynamic(model):
    return any(d.dim_param or not d.HasField("dim_value") for vi in model.graph.input
               for d in vi.type.tensor_type.shape.dim)


def _concrete(model, sizes):
    return {vi.name: tuple(d.dim_value if d.HasField("dim_value") else sizes.get(d.dim_param, 8)
                           for d in vi.type.tensor_type.shape.dim) for vi in model.graph.input}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", sorted(_MODELS))
def test_indexed_quantizer_output_is_byte_identical(name, monkeypatch):
    config = QuantConfig("minmax", True, "uint8", 8)
    nodes, indexed, plain = _quantize_both_ways(_MODELS[name](), monkeypatch, config)
    assert nodes, "the model must have something to quantize"
    assert any(n.op_type == "QuantizeLinear" for n in indexed.graph.node)
    assert indexed.SerializeToString(deterministic=True) == plain.SerializeToString(deterministic=True)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_per_tensor_int8_activations_byte_identical(monkeypatch):
    config = QuantConfig("minmax", False, "int8", 8)
    _, indexed, plain = _quantize_both_ways(dense_cnn(), monkeypatch, config)
    assert indexed.SerializeToString(deterministic=True) == plain.SerializeToString(deterministic=True)


def _residual_mlp(blocks: int, width: int = 8) -> onnx.ModelProto:
    """MatMul -> Relu -> MatMul -> Add per block (the shape of bench_scale's many-node graph)."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(blocks):
        for j in (0, 1):
            inits.append(numpy_helper.from_array((0.1 * rng.standard_normal((width, width))).astype(np.float32), f"w{i}_{j}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}_0"], [f"a{i}"], name=f"mm{i}_0"),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("MatMul", [f"r{i}", f"w{i}_1"], [f"b{i}"], name=f"mm{i}_1"),
                  helper.make_node("Add", [x, f"b{i}"], [f"s{i}"], name=f"add{i}")]
        x = f"s{i}"
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, width]) for n in ("x", x)]
    graph = helper.make_graph(nodes, "g", io[:1], io[1:], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.slow
def test_quantizer_time_grows_linearly_with_the_node_count():
    """4x the nodes costs about 4x the time (ORT's own model: about 16x, quadratic)."""
    config = QuantConfig("minmax", True, "uint8", 4)
    elapsed = {}
    for blocks in (40, 160):
        prepared = prepare(_residual_mlp(blocks))
        feeds, _ = calibration_feeds(prepared, None, {}, config, 0)
        ranges = calibrate(prepared, feeds, config)
        nodes = [n.name for n in prepared.graph.node]
        start = time.process_time()
        result = insert_qdq_nodes(prepared, ranges, nodes, config)
        elapsed[blocks] = time.process_time() - start
        assert sum(n.op_type == "DequantizeLinear" for n in result.graph.node) >= 2 * blocks
    assert elapsed[160] < 8 * elapsed[40], elapsed

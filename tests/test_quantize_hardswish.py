"""quantize on hard-swish written out as elementwise ops (Paddle's x * clip(x + 3, 0, 6) / 6).

The quantizer canonicalizes first, so the pattern reaches placement as HardSwish (opset 14), which
ONNX Runtime's pre-processing inlines as its function body, HardSigmoid(x) * x: two ops instead of
four.  HardSigmoid has no int8 kernel and stays float between the int8 convs, and the result computes
what the float model does.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.data import InputSet
from graphprune.model_io import check_model
from graphprune.passes.insert_qdq import InsertQDQPass
from graphprune.quantization.prepare import prepare
from graphprune.runtime import make_session, run_samples
from graphprune.validate import compare_outputs

WIDTH = 64


def _paddle_hardswish_net(seed: int = 0) -> onnx.ModelProto:
    """x[N,16,16,16] -> conv -> hard-swish (Add/Clip/Mul/Div, scalars in Constant nodes) -> conv -> relu."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    for name, cin in (("c1", 16), ("c2", WIDTH)):
        w = rng.standard_normal((WIDTH, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))
        inits += [numpy_helper.from_array(w.astype(np.float32), f"{name}_w"),
                  numpy_helper.from_array((rng.standard_normal(WIDTH) * 0.5).astype(np.float32), f"{name}_b")]
    scalar = lambda name, v: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.float32)))  # noqa: E731
    nodes += [
        helper.make_node("Conv", ["x", "c1_w", "c1_b"], ["a"], name="c1", pads=[1] * 4),
        scalar("three", 3.0), scalar("zero", 0.0), scalar("six", 6.0), scalar("six_d", 6.0),
        helper.make_node("Add", ["a", "three"], ["a3"], name="hs_add"),
        helper.make_node("Clip", ["a3", "zero", "six"], ["ac"], name="hs_clip"),
        helper.make_node("Mul", ["a", "ac"], ["am"], name="hs_mul"),
        helper.make_node("Div", ["am", "six_d"], ["h"], name="hs_div"),
        helper.make_node("Conv", ["h", "c2_w", "c2_b"], ["b"], name="c2", pads=[1] * 4),
        helper.make_node("Relu", ["b"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 16, 16, 16])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", WIDTH, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 7
    return model


def _inputs(seed: int, n: int = 16) -> InputSet:
    return InputSet({"x": np.random.default_rng(seed).standard_normal((n, 16, 16, 16)).astype(np.float32)})


def test_prepare_fuses_the_pattern_into_hardswish_computing_the_same():
    model = _paddle_hardswish_net()
    prepared = prepare(model)
    ops = Counter(n.op_type for n in prepared.graph.node)
    assert not ops["Clip"] and not ops["Div"] and not ops["Add"], ops
    assert ops == Counter({"Conv": 2, "HardSigmoid": 1, "Mul": 1, "Relu": 1}), ops  # HardSwish inlined by ORT
    (gate,) = [n for n in prepared.graph.node if n.op_type == "HardSigmoid"]
    (mul,) = [n for n in prepared.graph.node if n.op_type == "Mul"]
    assert sorted(mul.input) == sorted([gate.input[0], gate.output[0]])
    assert max(o.version for o in prepared.opset_import if o.domain in ("", "ai.onnx")) >= 14
    data = _inputs(1)
    a, b = run_samples(make_session(model), data), run_samples(make_session(prepared), data)
    np.testing.assert_allclose(b["y"], a["y"], rtol=1e-5, atol=1e-5)


def test_quantized_hardswish_stays_float_between_int8_convs_and_outputs_match_float():
    model = _paddle_hardswish_net()
    result = InsertQDQPass(data=_inputs(2), measure=False)(model)
    quantized = result.model
    check_model(quantized)
    graph = quantized.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers = {i: n for n in graph.node for i in n.input}
    (gate,) = [n for n in graph.node if n.op_type == "HardSigmoid"]
    assert not [n for n in graph.node if n.op_type in ("Clip", "Div", "Add")], "the pattern was not fused"
    # Both convs run in int8 (their weights and inputs dequantized), the gate in float between them:
    # a DequantizeLinear feeds it and a QuantizeLinear reads it (never a float op on int8 values).
    assert producers[gate.input[0]].op_type == "DequantizeLinear"
    assert consumers[gate.output[0]].op_type == "QuantizeLinear"
    for conv in (n for n in graph.node if n.op_type == "Conv"):
        assert all(producers[name].op_type == "DequantizeLinear" for name in conv.input[:2]), conv.name
    assert result.stats["nodes_quantized"] >= 2
    held_out = _inputs(3)
    a, b = run_samples(make_session(model), held_out), run_samples(make_session(quantized), held_out)
    assert compare_outputs("y", a["y"], b["y"]).rel_l2 < 0.05

"""Placement rules, the cost model's min-cut placement, and the error-budget bisection (no timing)."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from graphprune.quantization.budget import fit_error_budget
from graphprune.quantization.cost import estimate_costs, place
from graphprune.quantization.prepare import is_quantized
from graphprune.quantization.rules import GraphView, eligible_nodes
from graphprune.shapes import concrete_shapes


def _chain(specs, size=16, cin=32):
    """x[1,cin,S,S] through ("conv", cout, k, group) / ("op", type) steps, named s0, s1..."""
    rng = np.random.default_rng(0)
    nodes, inits, x, c = [], [], "x", cin
    for i, spec in enumerate(specs):
        name = f"s{i}"
        if spec[0] == "conv":
            _, cout, k, group = spec
            inits.append(numpy_helper.from_array(rng.standard_normal((cout, c // group, k, k)).astype(np.float32), f"{name}_w"))
            nodes.append(helper.make_node("Conv", [x, f"{name}_w"], [name], name=name, pads=[k // 2] * 4, group=group))
            c = cout
        else:
            nodes.append(helper.make_node(spec[1], [x], [name], name=name))
        x = name
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, cin, size, size])],
                              [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None)], inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    return model


def _placement(model):
    view = GraphView.of(model)
    allowed = {n for n, reason in eligible_nodes(model, view).items() if reason is None}
    shapes = concrete_shapes(model)
    costs = estimate_costs(model, shapes, view.constants)
    return place(model, costs, allowed, shapes, view.constants), costs


def test_rules_give_reasons():
    model = _chain([("conv", 32, 3, 1), ("op", "HardSwish"), ("op", "Relu")])
    runtime_weight = helper.make_node("Conv", ["x", "x"], ["y"], name="dyn")
    model.graph.node.append(runtime_weight)
    reasons = eligible_nodes(model)
    assert reasons["s0"] is None and reasons["s2"] is None
    assert reasons["s1"] == "no int8 kernel for HardSwish in ONNX Runtime (CPU)"
    assert "computed at run time" in reasons["dyn"]


def test_depthwise_costs_more_in_int8_and_dense_less():
    model = _chain([("conv", 32, 3, 32), ("conv", 128, 3, 1)])
    _, costs = _placement(model)
    assert costs["s0"].int8_ns > costs["s0"].float_ns
    assert costs["s1"].int8_ns < costs["s1"].float_ns / 2


def test_dense_chain_goes_int8_through_flow_ops():
    model = _chain([("conv", 128, 3, 1), ("op", "Relu"), ("conv", 128, 3, 1), ("op", "Relu"), ("conv", 128, 3, 1)])
    placement, _ = _placement(model)
    assert placement.int8 == {"s0", "s1", "s2", "s3", "s4"}
    assert placement.estimated_saving_ns > 0 and not placement.float_reasons


def test_short_int8_islands_between_float_ops_stay_float():
    # 1x1 convs with few channels between HardSwish: the QDQ borders cost more than int8 saves
    model = _chain([("conv", 16, 1, 1), ("op", "HardSwish"), ("conv", 16, 1, 1), ("op", "HardSwish")], size=32, cin=16)
    placement, _ = _placement(model)
    assert placement.int8 == set()
    assert set(placement.float_reasons) == {"s0", "s2"}


def test_depthwise_between_int8_convs_stays_int8_when_borders_cost_more():
    # the depthwise int8 kernel is slower, but leaving int8 for it costs a DQ and a Q of its tensors
    model = _chain([("conv", 256, 1, 1), ("conv", 256, 3, 256), ("conv", 256, 1, 1)], size=14, cin=256)
    placement, costs = _placement(model)
    assert costs["s1"].int8_ns > costs["s1"].float_ns
    assert placement.int8 == {"s0", "s1", "s2"}


def test_is_quantized_finds_qdq():
    model = _chain([("conv", 8, 1, 1)])
    assert is_quantized(model) == ""
    model.graph.node.append(helper.make_node("DequantizeLinear", ["a", "b"], ["c"]))
    assert is_quantized(model) == "DequantizeLinear"
    for op in ("QLinearSigmoid", "ConvInteger", "MatMulIntegerToFloat"):
        other = _chain([("conv", 8, 1, 1)])
        other.graph.node.append(helper.make_node(op, ["a"], ["c"], domain="com.microsoft"))
        assert is_quantized(other) == op


def test_budget_bisection_finds_fewest_float_layers():
    ranked = [f"l{i}" for i in range(10)]
    contribution = {name: 0.1 / (i + 1) for i, name in enumerate(ranked)}

    def error_of(keep_float):
        return sum(v for k, v in contribution.items() if k not in keep_float)

    keep, error, evaluations = fit_error_budget(ranked, error_of, 0.08)
    assert error <= 0.08
    k = len(keep)
    assert keep == set(ranked[:k])
    assert error_of(set(ranked[: k - 1])) > 0.08  # one fewer would miss the budget
    assert evaluations <= 6


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=20), st.floats(min_value=1e-3, max_value=2.0))
def test_budget_property_prefix_and_minimal(values, budget):
    ranked = [f"l{i}" for i in range(len(values))]
    order = sorted(range(len(values)), key=lambda i: -values[i])
    ranked = [ranked[i] for i in order]
    weight = {ranked[j]: values[order[j]] for j in range(len(ranked))}

    def error_of(keep_float):
        return sum(w for k, w in weight.items() if k not in keep_float)

    keep, error, _ = fit_error_budget(ranked, error_of, budget)
    k = len(keep)
    assert keep == set(ranked[:k])
    assert error == error_of(keep) and error <= budget + 1e-12
    if k:
        assert error_of(set(ranked[: k - 1])) > budget


def test_conv_transpose_stays_float_on_ort_cpu():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 32, 2, 2)).astype(np.float32), "w")
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2, 2])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64, 28, 28])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [w])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert eligible_nodes(model)["up"] is None  # QDQ-able for runtimes that fuse it...
    placement, _ = _placement(model)
    assert placement.int8 == set()  # ...but ORT's CPU provider runs it in float between DQ and Q
    assert "int8 ConvTranspose (no fused int8 kernel on ORT CPU) slower" in placement.float_reasons["up"]


def test_choice_prefers_the_most_accurate_of_equally_fast_candidates(monkeypatch):
    # Two placements within timing noise of each other: the smaller output error decides, so that
    # noise does not flip the written model between runs.
    import importlib

    from graphprune.quantization.measure import Candidate

    # the package re-exports the function insert_qdq under the module's name: fetch the module
    insert_qdq_module = importlib.import_module("graphprune.passes.insert_qdq")

    fast_but_worse = Candidate("a", None, frozenset({"n1"}), error=0.20)
    almost_as_fast = Candidate("b", None, frozenset({"n1", "n2"}), error=0.10)
    slow_and_exact = Candidate("c", None, frozenset({"n2"}), error=0.01)
    timings = {"float": 10.0, "a": 5.0, "b": 5.1, "c": 7.0}
    monkeypatch.setattr(insert_qdq_module, "measure_latencies", lambda models, feed, threads, rounds, failures, source_dir=None: dict(timings))

    class _Planner:
        options = type("O", (), {"measure": True, "threads": 1, "source_dir": None})()
        model = None
        discarded = {}

        def _latency_feed(self):
            return {}

    chosen, latencies = insert_qdq_module._Planner.choose(_Planner(), [fast_but_worse, almost_as_fast, slow_and_exact])
    assert chosen is almost_as_fast and latencies == timings
    timings.update(a=9.8, b=9.9, c=9.9)  # nothing beats float by the required margin
    chosen, _ = insert_qdq_module._Planner.choose(_Planner(), [fast_but_worse, almost_as_fast, slow_and_exact])
    assert chosen is None

"""Latency measured as paired per-round CPU-time ratios: the per-group table and the latency budget."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.data import random_inputs
from graphprune.runtime import make_session
from graphprune.sensitivity import prune_to_budget
from graphprune.sensitivity.measure import cpu_latency_ratio, inner_runs

WIDTH, HIDDEN = 256, 2048


def _mlp(layers: int = 1, seed: int = 0) -> onnx.ModelProto:
    """x [1, WIDTH] -> (MatMul HIDDEN -> Relu -> MatMul WIDTH) x layers: one prunable hidden group per layer."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits += [numpy_helper.from_array((rng.standard_normal((WIDTH, HIDDEN)) * 0.05).astype(np.float32), f"w{i}a"),
                  numpy_helper.from_array((rng.standard_normal((HIDDEN, WIDTH)) * 0.05).astype(np.float32), f"w{i}b")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}a"], [f"h{i}"]), helper.make_node("Relu", [f"h{i}"], [f"r{i}"]),
                  helper.make_node("MatMul", [f"r{i}", f"w{i}b"], [f"y{i}"])]
        x = f"y{i}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, WIDTH])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feed():
    return {"x": np.random.default_rng(1).standard_normal((1, WIDTH)).astype(np.float32)}


def test_paired_ratio_sees_equal_models_as_equal_and_four_times_the_work_as_more():
    one, four = make_session(_mlp(1), threads=1), make_session(_mlp(4), threads=1)
    again = make_session(_mlp(1), threads=1)
    inner = inner_runs(one, _feed())
    assert inner >= 1
    same = cpu_latency_ratio(one, again, _feed(), rounds=9, inner=inner)
    more = cpu_latency_ratio(one, four, _feed(), rounds=9, inner=inner)
    assert 0.6 < same < 1.6  # loose: the machine is shared, but a 4x model must stand out clearly
    assert more > 2.0


@pytest.mark.slow
def test_latency_budget_is_met_as_measured():
    model = _mlp(2)
    data = random_inputs(model, samples=8, seed=0)
    result = prune_to_budget(model, data, "latency", 0.6, ratios=(0.25, 0.5, 0.75), jobs=1)
    allocation = result.allocation
    assert allocation.measured <= 0.6 + 0.03
    assert any(r > 0 for r in allocation.ratios.values())
    # an independent paired timing of what was written agrees that it is faster
    base, pruned = make_session(model, threads=1), make_session(result.model, threads=1)
    assert cpu_latency_ratio(base, pruned, _feed(), rounds=9, inner=inner_runs(base, _feed())) < 0.85

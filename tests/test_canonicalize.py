"""CanonicalizePass: never changes outputs; Constant nodes become initializers; old-style inputs dropped."""

import glob
import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphprune.data import random_inputs
from graphprune.ir import real_inputs
from graphprune.model_io import ort_limits
from graphprune.passes import CanonicalizePass, canonicalize
from graphprune.runtime import make_session, run
from tests.helpers import conv_model

LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
LIGHT_MODELS = sorted(glob.glob(os.path.join(LIGHT_DIR, "*.onnx")))


def _outputs(model, feeds):
    return run(make_session(model), feeds)


@pytest.mark.parametrize("path", LIGHT_MODELS, ids=lambda p: os.path.basename(p)[6:-5])
def test_round_trips_bundled_light_models_with_identical_outputs(path):
    model = onnx.load(path)
    result = CanonicalizePass()(model)
    assert result.modified
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    # the weights were ConstantOfShape nodes and initializer-inputs: both are gone or folded
    assert len(out.graph.node) < len(model.graph.node)
    assert [vi.name for vi in out.graph.input] == [vi.name for vi in real_inputs(model.graph)]
    feeds = random_inputs(model, seed=0).first_batch()
    before, after = _outputs(model, feeds), _outputs(out, feeds)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-6, atol=1e-7)


def test_constant_nodes_become_initializers():
    model = conv_model(constant_weights=True)
    result = CanonicalizePass()(model)
    assert result.modified and result.stats["constants_to_initializers"] == 3
    assert not [n for n in result.model.graph.node if n.op_type == "Constant"]
    assert {i.name for i in result.model.graph.initializer} == {"w", "b", "fc"}
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(_outputs(result.model, feeds)["y"], _outputs(model, feeds)["y"])


def test_already_canonical_model_is_a_no_op():
    model = canonicalize(conv_model())
    result = CanonicalizePass()(model)
    assert not result.modified
    assert result.model is model


def test_folding_respects_the_size_cap_and_dynamic_shapes():
    # y = x + Expand(c, [64, 64]) where the Expand result (16 KiB) is over a 1 KiB cap;
    # Shape(x) of a dynamic input must stay computed.
    c = numpy_helper.from_array(np.ones((1, 1), np.float32), "c")
    shape = numpy_helper.from_array(np.array([64, 64], np.int64), "shape")
    graph = helper.make_graph(
        [
            helper.make_node("Expand", ["c", "shape"], ["big"]),
            helper.make_node("Add", ["x", "big"], ["s"]),
            helper.make_node("Shape", ["x"], ["xs"]),
            helper.make_node("Cast", ["xs"], ["xf"], to=onnx.TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["xf"], ["n"], keepdims=0),
            helper.make_node("Mul", ["s", "n"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64, 64])],
        [c, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    capped = canonicalize(model, fold_limit=1024)
    assert "Expand" in [n.op_type for n in capped.graph.node]
    assert "Shape" in [n.op_type for n in capped.graph.node]
    unfolded = canonicalize(model, fold_limit=1 << 20)
    assert "Expand" not in [n.op_type for n in unfolded.graph.node]
    feeds = {"x": np.ones((64, 64), np.float32)}
    np.testing.assert_array_equal(_outputs(capped, feeds)["y"], _outputs(model, feeds)["y"])
    np.testing.assert_array_equal(_outputs(unfolded, feeds)["y"], _outputs(model, feeds)["y"])


def _expand_model(extra_nodes=(), opset_imports=(("", 17),)):
    """y = x + Expand(c, [64, 64]): the Expand is foldable (16 KiB)."""
    c = numpy_helper.from_array(np.ones((1, 1), np.float32), "c")
    shape = numpy_helper.from_array(np.array([64, 64], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Expand", ["c", "shape"], ["big"]), helper.make_node("Add", ["x", "big"], ["y"]), *extra_nodes],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [64, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64, 64])],
        [c, shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opset_imports])


def test_folding_runs_on_models_labelled_newer_than_the_runtime():
    # graphsurgeon opens its own ORT session: an IR label the runtime refuses used to skip folding silently
    model = _expand_model()
    model.ir_version = ort_limits().ir_version + 1
    result = CanonicalizePass(fold_limit=1 << 20)(model)
    assert result.stats["fold_failure"] is None
    assert [n.op_type for n in result.model.graph.node] == ["Add"]
    assert result.model.ir_version == ort_limits().ir_version


def test_a_folding_failure_is_reported_and_the_rest_still_folds():
    # a custom op on constants is foldable for graphsurgeon, but ORT has no kernel for it
    custom = helper.make_node("Double", ["c"], ["c2"], domain="test.graphprune")
    model = _expand_model([custom, helper.make_node("Mul", ["y", "c2"], ["y2"])], [("", 17), ("test.graphprune", 1)])
    model.graph.output.append(helper.make_tensor_value_info("y2", onnx.TensorProto.FLOAT, [64, 64]))
    with pytest.warns(UserWarning, match=r"constant folding failed \(.*Double"):
        result = CanonicalizePass(fold_limit=1 << 20)(model)
    assert "Double" in result.stats["fold_failure"]
    ops = [n.op_type for n in result.model.graph.node]
    assert "Double" in ops and "Expand" not in ops  # folded node by node around the op ORT lacks


def test_folding_is_skipped_with_the_reason_when_the_runtime_lacks_the_opset():
    model = _expand_model(opset_imports=[("", ort_limits().opset + 1)])
    with pytest.warns(UserWarning, match="constant folding skipped"):
        result = CanonicalizePass(fold_limit=1 << 20)(model)
    assert f"opset <= {ort_limits().opset}" in result.stats["fold_failure"]
    assert "Expand" in [n.op_type for n in result.model.graph.node]


def test_graphprune_run_prints_the_folding_failure_once(tmp_path, capsys):
    from graphprune.cli import main

    custom = helper.make_node("Double", ["c"], ["c2"], domain="test.graphprune")
    model = _expand_model([custom, helper.make_node("Mul", ["y", "c2"], ["y2"])], [("", 17), ("test.graphprune", 1)])
    model.graph.output.append(helper.make_tensor_value_info("y2", onnx.TensorProto.FLOAT, [64, 64]))
    src = str(tmp_path / "custom.onnx")
    onnx.save_model(model, src)
    assert main(["run", src, "-o", str(tmp_path / "out.onnx"), "--pass", "canonicalize", "--pass", "canonicalize"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warned) == 1 and warned[0].startswith("graphprune run: warning: constant folding failed (")

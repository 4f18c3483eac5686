"""Quantization's pre-processing of large models: BatchNormalization folded without ORT's copies."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphprune import ir
from graphprune.quantization.prepare import fold_batchnorms, prepare
from graphprune.runtime import make_session


def _conv_bn(shared_weight: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    c = 8
    inits = [numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "b"),
             numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "scale"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "var")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "beta", "mean", "var"], ["n"], epsilon=1e-3),
             helper.make_node("Relu", ["n"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 6, 6])]
    if shared_weight:  # a second reader of w: its values must stay
        nodes.append(helper.make_node("Conv", ["x", "w"], ["y2"], pads=[1, 1, 1, 1]))
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, c, 6, 6]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _outputs(model):
    x = {"x": np.random.default_rng(1).standard_normal((1, 3, 6, 6)).astype(np.float32)}
    return make_session(model).run(None, x)


def test_batchnorm_folds_into_its_conv_with_the_same_outputs():
    model = _conv_bn()
    before = model.SerializeToString()
    folded = fold_batchnorms(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"]
    assert {i.name for i in folded.graph.initializer} == {"w", "n_folded_bias"}
    np.testing.assert_allclose(_outputs(folded)[0], _outputs(model)[0], rtol=1e-5, atol=1e-5)
    assert model.SerializeToString() == before  # the input is not modified


def test_a_shared_weight_is_not_folded_and_nothing_folds_without_a_copy():
    model = _conv_bn(shared_weight=True)
    assert [n.op_type for n in fold_batchnorms(model).graph.node] == ["Conv", "BatchNormalization", "Relu", "Conv"]
    assert fold_batchnorms(model, copy=False) is model


def test_prepare_of_a_large_model_folds_names_and_infers_without_ort_preprocessing(monkeypatch):
    import onnxruntime.quantization.shape_inference as ort_prep

    monkeypatch.setattr(ir, "LARGE_MODEL_BYTES", 64)  # this model counts as large
    monkeypatch.setattr(ort_prep, "quant_pre_process", None)  # ORT's path must not run
    model = _conv_bn()
    before = model.SerializeToString()
    prepared = prepare(model)
    assert [n.op_type for n in prepared.graph.node] == ["Conv", "Relu"]
    assert all(n.name for n in prepared.graph.node)
    assert {vi.name for vi in prepared.graph.value_info} >= {"n"}
    np.testing.assert_allclose(_outputs(prepared)[0], _outputs(model)[0], rtol=1e-5, atol=1e-5)
    assert model.SerializeToString() == before

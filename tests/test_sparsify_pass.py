"""SparsifyWeightsPass: exact sparsity, N:M along the reduction axis, exclusions, skips, no-op, mask record."""

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from graphprune.errors import UserError
from graphprune.passes.sparsify_weights import SparsifyWeightsPass, sparsify_weights
from graphprune.recipes import build_pass, parse_pass_spec
from graphprune.runtime import make_session, run
from graphprune.sparsity.masks import MASKS_KEY, read_mask_record, read_weight_masks

# Weight name -> (op type, reduction axis) in small_net.
LAYERS = {"stem_w": ("Conv", 1), "conv_w": ("Conv", 1), "fc_w": ("Gemm", 1), "proj_w": ("MatMul", 0)}


def small_net(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(3->8) -> Relu -> Conv(8->16) -> Relu -> GAP -> Flatten -> Gemm(transB) -> Relu -> MatMul -> Add.

    The stem's 3 input channels do not fit 2:4 groups; every other weight does.
    """
    rng = np.random.default_rng(seed)
    arrays = {
        "stem_w": rng.standard_normal((8, 3, 3, 3)),
        "conv_w": rng.standard_normal((16, 8, 3, 3)),
        "conv_b": rng.standard_normal(16),
        "fc_w": rng.standard_normal((32, 16)),     # transB=1: [N, K]
        "fc_b": rng.standard_normal(32),
        "proj_w": rng.standard_normal((32, 12)),   # MatMul B: [K, N]
        "proj_b": rng.standard_normal(12),
    }
    nodes = [
        helper.make_node("Conv", ["x", "stem_w"], ["s"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["s"], ["s_r"], name="stem_relu"),
        helper.make_node("Conv", ["s_r", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["c_r"], name="conv_relu"),
        helper.make_node("GlobalAveragePool", ["c_r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["h"], name="fc", transB=1),
        helper.make_node("Relu", ["h"], ["h_r"], name="fc_relu"),
        helper.make_node("MatMul", ["h_r", "proj_w"], ["m"], name="proj"),
        helper.make_node("Add", ["m", "proj_b"], ["y"], name="proj_bias"),
    ]
    graph = helper.make_graph(
        nodes, "small_net",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 12])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def weights(model: onnx.ModelProto) -> dict:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def outputs(model: onnx.ModelProto, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((4, 3, 8, 8)).astype(np.float32)
    return run(make_session(model), {"x": x})["y"]


@pytest.mark.parametrize("sparsity", [0.3, 0.75, 0.9])
def test_layer_scope_reaches_the_sparsity_within_one_weight_per_layer(sparsity):
    result = SparsifyWeightsPass(sparsity=sparsity, scope="layer")(small_net())
    assert result.modified
    after = weights(result.model)
    for name in LAYERS:
        zeros = int(np.sum(after[name] == 0))
        assert abs(zeros - sparsity * after[name].size) <= 1, name
    assert {r["weight"] for r in result.stats["layers"]} == set(LAYERS)
    assert abs(result.stats["overall_sparsity"] - sparsity) < 0.01
    np.testing.assert_array_equal(after["conv_b"], weights(small_net())["conv_b"])  # biases untouched
    outputs(result.model)  # loads and runs in ORT


def test_global_scope_uses_one_threshold_and_hits_the_total():
    model = small_net()
    before = weights(model)
    result = SparsifyWeightsPass(sparsity=0.8)(model)
    after = weights(result.model)
    total = sum(before[n].size for n in LAYERS)
    zeros = sum(int(np.sum(after[n] == 0)) for n in LAYERS)
    assert zeros == round(0.8 * total)
    # One threshold: every pruned magnitude is at most every kept one, across layers.
    pruned = np.concatenate([np.abs(before[n])[after[n] == 0] for n in LAYERS])
    kept = np.concatenate([np.abs(before[n])[after[n] != 0] for n in LAYERS])
    assert pruned.max() <= kept.min()


def test_global_scope_cap_keeps_a_small_magnitude_layer_alive():
    model = small_net()
    init = next(i for i in model.graph.initializer if i.name == "stem_w")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1e-4, "stem_w"))
    result = SparsifyWeightsPass(sparsity=0.5, max_layer_sparsity=0.9)(model)
    stem = weights(result.model)["stem_w"]
    assert np.sum(stem == 0) == int(0.9 * stem.size)  # capped, not emptied
    total = sum(w.size for n, w in weights(model).items() if n in LAYERS)
    assert sum(int(np.sum(weights(result.model)[n] == 0)) for n in LAYERS) == round(0.5 * total)


def _groups(weight: np.ndarray, axis: int, m: int) -> np.ndarray:
    return np.moveaxis(weight, axis, -1).reshape(-1, m)


@pytest.mark.parametrize("pattern, n, m", [("2:4", 2, 4), ("1:4", 1, 4), ("4:8", 4, 8)])
def test_n_m_runs_along_the_reduction_axis_and_skips_unfitting_layers(pattern, n, m):
    result = SparsifyWeightsPass(pattern=pattern)(small_net())
    after = weights(result.model)
    for name in ("conv_w", "fc_w", "proj_w"):
        _, axis = LAYERS[name]
        assert (np.count_nonzero(_groups(after[name], axis, m), axis=1) <= n).all(), name
    np.testing.assert_array_equal(after["stem_w"], weights(small_net())["stem_w"])
    skipped = result.stats["skipped"]
    assert [(s["node"], s["op_type"]) for s in skipped] == [("stem", "Conv")]
    assert "reduction axis 1 has length 3, not divisible by M=" in skipped[0]["reason"]
    assert result.stats["requested_sparsity"] == 1 - n / m


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_groups_honour_trans_b(trans_b):
    rng = np.random.default_rng(3)
    k_by_n = rng.standard_normal((8, 4)).astype(np.float32)  # K=8, N=4
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["a", "w"], ["y"], name="g", transB=trans_b)], "gemm",
        [helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(k_by_n.T.copy() if trans_b else k_by_n, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = SparsifyWeightsPass(pattern="2:4")(model)
    stored = weights(result.model)["w"]
    as_k_by_n = stored.T if trans_b else stored
    assert as_k_by_n.shape == (8, 4)
    # Along K (rows of the [K, N] view), every group of 4 holds exactly 2 non-zeros.
    assert (np.count_nonzero(as_k_by_n.reshape(2, 4, 4), axis=1) == 2).all()


def test_excluded_nodes_and_weights_are_untouched():
    model = small_net()
    result = SparsifyWeightsPass(sparsity=0.9, exclude=["conv", "proj_w"])(model)
    before, after = weights(model), weights(result.model)
    np.testing.assert_array_equal(after["conv_w"], before["conv_w"])
    np.testing.assert_array_equal(after["proj_w"], before["proj_w"])
    assert {r["weight"] for r in result.stats["layers"]} == {"stem_w", "fc_w"}
    assert set(read_mask_record(result.model)) == {"stem_w", "fc_w"}


def test_op_types_select_the_layers():
    result = SparsifyWeightsPass(sparsity=0.5, op_types="Gemm,MatMul")(small_net())
    assert {r["weight"] for r in result.stats["layers"]} == {"fc_w", "proj_w"}


def test_sparsity_zero_is_a_no_op_with_identical_outputs():
    model = small_net()
    for storage in ("dense", "sparse"):
        result = SparsifyWeightsPass(sparsity=0.0, storage=storage)(model)
        assert not result.modified and result.model is model
        np.testing.assert_array_equal(outputs(result.model), outputs(model))


def test_mask_record_and_read_weight_masks():
    result = SparsifyWeightsPass(sparsity=0.6)(small_net())
    record = read_mask_record(result.model)
    assert record == {n: {"pattern": "unstructured", "sparsity": 0.6} for n in LAYERS}
    masks = read_weight_masks(result.model)
    after = weights(result.model)
    assert set(masks) == set(LAYERS)
    for name, mask in masks.items():
        assert mask.dtype == bool and mask.shape == after[name].shape
        np.testing.assert_array_equal(mask, after[name] != 0)
    # A second run records the new pattern over the old one and keeps the JSON format.
    again = SparsifyWeightsPass(pattern="2:4", op_types="Gemm")(result.model)
    assert read_mask_record(again.model)["fc_w"]["pattern"] == "2:4"
    assert [p.key for p in again.model.metadata_props].count(MASKS_KEY) == 1


def test_shared_computed_and_quantized_weights_are_skipped_with_reasons():
    model = small_net()
    graph = model.graph
    # conv_w also feeds an Identity output: zeroing it would change that output.
    graph.node.append(helper.make_node("Identity", ["conv_w"], ["w_copy"], name="leak"))
    graph.output.append(helper.make_tensor_value_info("w_copy", onnx.TensorProto.FLOAT, [16, 8, 3, 3]))
    # fc_w is quantized: int8 -> DequantizeLinear -> Gemm.
    fc = next(i for i in graph.initializer if i.name == "fc_w")
    graph.initializer.remove(fc)
    graph.initializer.extend([
        numpy_helper.from_array(np.ones((32, 16), np.int8), "fc_q"),
        numpy_helper.from_array(np.array(0.1, np.float32), "fc_scale"),
    ])
    graph.node.insert(0, helper.make_node("DequantizeLinear", ["fc_q", "fc_scale"], ["fc_w"], name="fc_dq"))
    result = SparsifyWeightsPass(sparsity=0.5)(model)
    reasons = {s["node"]: s["reason"] for s in result.stats["skipped"]}
    assert reasons == {
        "conv": "weight also feeds Identity node 'leak'",
        "fc": "weight is already quantized (sparsify before quantizing)",
    }
    assert {r["weight"] for r in result.stats["layers"]} == {"stem_w", "proj_w"}


def test_functional_wrapper_and_recipe_spec():
    model = small_net()
    out = sparsify_weights(model, sparsity=0.5, scope="layer")
    assert np.sum(weights(out)["conv_w"] == 0) == 576
    # YAML reads an unquoted 2:4 as the base-60 number 124; the pass reads it back as 2:4.
    name, kwargs = parse_pass_spec("sparsify:pattern=2:4,op_types=[Conv]")
    sparsify = build_pass(name, kwargs)
    assert sparsify.pattern == (2, 4) and sparsify.op_types == ("Conv",)


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsity": 1.0}, r"sparsity 1.0 is outside \[0, 1\)"),
    ({"sparsity": -0.1}, "outside"),
    ({}, "sparsity is required"),
    ({"sparsity": "lots"}, "not a number"),
    ({"pattern": "4:4"}, "1 <= N < M"),
    ({"pattern": "2:4", "sparsity": 0.9}, "fixes sparsity at 0.5"),
    ({"sparsity": 0.5, "op_types": "Conv,Relu"}, "op type 'Relu' cannot be sparsified"),
    ({"sparsity": 0.5, "scope": "model"}, "scope 'model'"),
    ({"sparsity": 0.5, "storage": "zip"}, "storage 'zip'"),
    ({"sparsity": 0.9, "max_layer_sparsity": 0.5}, "max_layer_sparsity 0.5"),
])
def test_bad_arguments_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        SparsifyWeightsPass(**kwargs)


def test_unknown_exclude_name_is_a_user_error():
    with pytest.raises(UserError, match="--exclude 'nope': no node or weight"):
        SparsifyWeightsPass(sparsity=0.5, exclude="nope")(small_net())


def test_conv_transpose_groups_run_along_its_input_channels():
    w = np.random.default_rng(5).standard_normal((8, 2, 3, 3)).astype(np.float32)  # [C_in, C_out, k, k]
    graph = helper.make_graph(
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2, 2])], "up",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 9, 9])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = SparsifyWeightsPass(pattern="2:4", op_types="ConvTranspose")(model)
    stored = weights(result.model)["w"]
    assert (np.count_nonzero(stored.reshape(2, 4, 2, 3, 3), axis=1) == 2).all()


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), sparsity=st.floats(0.05, 0.95), scope=st.sampled_from(["global", "layer"]))
def test_property_sparsified_models_check_run_and_keep_output_shapes(seed, sparsity, scope):
    model = small_net(seed)
    result = SparsifyWeightsPass(sparsity=sparsity, scope=scope, storage="sparse")(model)
    onnx.checker.check_model(result.model, full_check=True)
    assert outputs(result.model).shape == outputs(model).shape == (4, 12)
    rows = {r["weight"]: r for r in result.stats["layers"]}
    if scope == "layer":
        assert all(abs(r["zeros"] - sparsity * r["params"]) <= 1 for r in rows.values())
    else:
        total = sum(r["params"] for r in rows.values())
        assert sum(r["zeros"] for r in rows.values()) == round(sparsity * total)


def test_fine_tuning_keeps_the_recorded_zeros():
    """The mask contract end to end: the fine-tuning pass reads the record and leaves pruned weights at 0."""
    from graphprune.data import InputSet
    from graphprune.passes.finetune import FineTunePass

    sparse = SparsifyWeightsPass(sparsity=0.7)(small_net()).model
    rng = np.random.default_rng(0)
    data = InputSet({"x": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)})
    tuned = FineTunePass(data=data, labels=rng.integers(0, 12, 16), epochs=1, batch_size=8, lr=1e-2)(sparse).model
    before, after = weights(sparse), weights(tuned)
    assert any(not np.array_equal(after[n], before[n]) for n in LAYERS)  # training did move weights
    for name, mask in read_weight_masks(sparse).items():
        assert np.all(after[name][~mask] == 0), name

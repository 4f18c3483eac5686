"""weight_storage.compact: packed int8 weights and float16 constants, default attributes, duplicates, short names."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphprune.model_io import check_model
from graphprune.quantization.weight_storage import compact, short_name


def _storage_model(bias_values=None, opset=13):
    """x -> Conv(w1) -> Clip -> Conv(w2) -> Clip -> y; int8 weights as Cast + Mul (the fallback's form),
    float32 scales and biases, two equal Clip scalars."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    for name, shape in (("w1", (4, 4, 3, 3)), ("w2", (32, 4, 3, 3))):
        bias = rng.standard_normal(shape[0]).astype(np.float32)
        inits += [numpy_helper.from_array(rng.integers(-127, 128, shape).astype(np.int8), f"{name}_q8"),
                  numpy_helper.from_array((rng.random((shape[0], 1, 1, 1)) / 100 + 1e-3).astype(np.float32), f"{name}_scale"),
                  numpy_helper.from_array(bias if bias_values is None else bias_values[: shape[0]], f"{name}_bias")]
        nodes += [helper.make_node("Cast", [f"{name}_q8"], [f"{name}_q8f"], name=f"{name}_Cast", to=TensorProto.FLOAT),
                  helper.make_node("Mul", [f"{name}_q8f", f"{name}_scale"], [name], name=f"{name}_Dequantize")]
    inits += [numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(0), "lo_again"),
              numpy_helper.from_array(np.float32(6), "hi")]
    nodes += [helper.make_node("Conv", ["x", "w1", "w1_bias"], ["c1"], name="conv1", kernel_shape=[3, 3], strides=[1, 1],
                               dilations=[1, 1], group=1, pads=[1, 1, 1, 1]),
              helper.make_node("Clip", ["c1", "lo", "hi"], ["r"], name="clip"),
              helper.make_node("Conv", ["r", "w2", "w2_bias"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
              helper.make_node("Clip", ["c2", "lo_again", "hi"], ["y"], name="clip2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _session(model, optimized=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _structure(model):
    return [(n.op_type, n.name, list(n.input), list(n.output), {a.name: list(a.ints) or a.i for a in n.attribute})
            for n in model.graph.node]


@pytest.mark.parametrize("opset", [13, 11])
def test_compact_packs_weights_and_constants_and_shortens_names(tmp_path, opset):
    before = _storage_model(opset=opset)
    after = onnx.ModelProto()
    after.CopyFrom(before)
    stats = compact(after)
    check_model(after, full=True)
    assert stats == {"default_attributes": 5, "packed_weights": 2, "packed_constants": 2, "float16_constants": 3,
                     "merged_constants": 1 + (opset >= 13), "renamed_tensors": 17 - (opset < 13), "unnamed_nodes": 4}
    inits = {t.name: t for t in after.graph.initializer}
    # Opset 13: the two equal Split sizes are one tensor, stored as varints.  Then the int8 weights
    # in one tensor, the biases and the scales in float16, one tensor each.
    sizes = [] if opset < 13 else ["3"]
    q8, biases, scales = (("2", "4", "5") if opset >= 13 else ("2", "3", "4"))
    assert sorted(inits) == sorted(["0", "1", q8, biases, scales] + sizes)
    assert (inits[q8].data_type, list(inits[q8].dims)) == (TensorProto.INT8, [36, 4, 3, 3])
    assert (inits[biases].data_type, list(inits[biases].dims)) == (TensorProto.FLOAT16, [36])
    assert (inits[scales].data_type, list(inits[scales].dims)) == (TensorProto.FLOAT16, [36, 1, 1, 1])
    if sizes:
        assert list(inits["3"].int64_data) == [4, 32] and not inits["3"].raw_data
    n = [short_name(i) for i in range(len(inits), len(inits) + 8)]  # the transient tensors, in graph order
    split = {} if sizes else {"split": [4, 32]}
    expected = [("Cast", "", [biases], [n[0]], {"to": TensorProto.FLOAT}),
                ("Split", "", [n[0]] + sizes, [n[1], n[2]], {"axis": 0, **split}),
                ("Cast", "", [scales], [n[3]], {"to": TensorProto.FLOAT}),
                ("Cast", "", [q8], [n[4]], {"to": TensorProto.FLOAT}),
                ("Mul", "", [n[4], n[3]], [n[5]], {}),
                ("Split", "", [n[5]] + sizes, [n[6], n[7]], {"axis": 0, **split}),
                ("Conv", "", ["x", n[6], n[1]], [short_name(len(inits) + 8)], {"pads": [1, 1, 1, 1]}),
                ("Clip", "", [short_name(len(inits) + 8), "0", "1"], [short_name(len(inits) + 9)], {}),
                ("Conv", "", [short_name(len(inits) + 9), n[7], n[2]], [short_name(len(inits) + 10)], {"pads": [1, 1, 1, 1]}),
                ("Clip", "", [short_name(len(inits) + 10), "0", "1"], ["y"], {})]
    assert _structure(after) == expected  # strides, dilations, group, kernel_shape: defaults dropped
    x = {"x": np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    want, got = _session(before).run(None, x)[0], _session(after).run(None, x)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max())  # float16 rounding: 2^-11
    assert not np.array_equal(got, want)
    # ORT folds every Cast, Mul and Split at load: it runs the graph it ran before
    paths = [str(tmp_path / f"{k}.opt.onnx") for k in ("before", "after")]
    _session(before, paths[0]), _session(after, paths[1])
    ops = [[n.op_type for n in onnx.load(p).graph.node] for p in paths]
    assert ops[0] == ops[1] and not {"Cast", "Split", "Mul"} & set(ops[1])


def test_short_names_count_in_base_62():
    assert [short_name(i) for i in (0, 9, 10, 35, 36, 61, 62, 62 * 62)] == ["0", "9", "a", "z", "A", "Z", "10", "100"]


def test_compact_leaves_a_model_with_nothing_to_trim_unchanged():
    """Short names already, one float weight too small to pay for a Cast: nothing to do."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "0")  # 8 values: a Cast costs more than float16 saves
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "0"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    before = model.SerializeToString()
    assert set(compact(model).values()) == {0}
    assert model.SerializeToString() == before


@pytest.mark.parametrize("values, why", [
    (np.full(32, 1e6, np.float32), "overflows float16"),
    (np.linspace(1e-7, 3e-7, 32).astype(np.float32), "subnormal float16: steps of 6e-8"),
])
def test_float16_refused_where_it_rounds_too_much(values, why):
    """The biases stay float32, packed into one tensor all the same (one Split, no Cast)."""
    model = _storage_model(bias_values=values)
    compact(model)
    check_model(model, full=True)
    packed = [t for t in model.graph.initializer if list(t.dims) == [36]]
    assert len(packed) == 1 and packed[0].data_type == TensorProto.FLOAT, why
    assert np.array_equal(numpy_helper.to_array(packed[0]), np.concatenate([values[:4], values]))
    split = next(n for n in model.graph.node if n.input[0] == packed[0].name)
    assert split.op_type == "Split"


def test_graph_inputs_and_outputs_keep_their_tensors():
    model = _storage_model()
    model.graph.input.append(helper.make_tensor_value_info("w2_bias", TensorProto.FLOAT, [32]))  # overridable bias
    compact(model)
    check_model(model, full=True)
    bias = next(t for t in model.graph.initializer if t.name == "w2_bias")
    conv2 = [n for n in model.graph.node if n.op_type == "Conv"][1]
    assert bias.data_type == TensorProto.FLOAT and conv2.input[2] == "w2_bias"
    assert model.graph.node[-1].output[0] == "y" and [n for n in model.graph.node if n.op_type == "Conv"][0].input[0] == "x"


def test_a_graph_with_subgraphs_keeps_its_tensors_and_names():
    """An If branch reads the bias by name: retyping or renaming it would break the branch."""
    model = _storage_model()
    branch = helper.make_graph([helper.make_node("Identity", ["w2_bias"], ["bo"])], "branch", [],
                               [helper.make_tensor_value_info("bo", TensorProto.FLOAT, [32])])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node.append(helper.make_node("If", ["cond"], ["b_out"], then_branch=branch, else_branch=branch))
    model.graph.output.append(helper.make_tensor_value_info("b_out", TensorProto.FLOAT, [32]))
    before = {t.name: t.SerializeToString() for t in model.graph.initializer}
    names = [n.name for n in model.graph.node]
    stats = compact(model)
    assert stats["default_attributes"] == 5 and sum(stats.values()) == 5
    assert {t.name: t.SerializeToString() for t in model.graph.initializer} == before
    assert [n.name for n in model.graph.node] == names
    check_model(model, full=True)


def test_a_graph_whose_annotations_name_tensors_keeps_them():
    model = _storage_model()
    note = model.graph.quantization_annotation.add()
    note.tensor_name = "w2_bias"
    before = {t.name: t.SerializeToString() for t in model.graph.initializer}
    stats = compact(model)
    assert sum(stats.values()) == stats["default_attributes"] == 5
    assert {t.name: t.SerializeToString() for t in model.graph.initializer} == before


@settings(max_examples=12, deadline=None)
@given(channels=st.integers(4, 40), inputs=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_compact_keeps_outputs_and_the_runtime_graph(channels, inputs, seed):
    """Random widths and bias magnitudes: the checker passes, the model does not grow, outputs agree
    within float16 rounding (the graph ORT runs is compared in the first test)."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, (channels, inputs, 3, 3)).astype(np.int8)
    scale = (rng.random((channels, 1, 1, 1)) / 50 + 1e-4).astype(np.float32)
    bias = (rng.standard_normal(channels) * 10 ** rng.uniform(-3, 2)).astype(np.float32)
    nodes = [helper.make_node("Cast", ["q"], ["qf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Mul", ["qf", "s"], ["w"], name="dq"),
             helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=1, pads=[1, 1, 1, 1])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, inputs, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 6, 6])],
        [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s"), numpy_helper.from_array(bias, "b")])
    before = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    after = onnx.ModelProto()
    after.CopyFrom(before)
    compact(after)
    check_model(after, full=True)
    assert after.ByteSize() <= before.ByteSize()
    x = {"x": rng.standard_normal((1, inputs, 6, 6)).astype(np.float32)}
    want, got = _session(before).run(None, x)[0], _session(after).run(None, x)[0]
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_records_that_name_weights_follow_the_short_names():
    """The mask and removal records finetune reads back name weights: after renaming they must name the
    same tensors, and the reconstruction mark must still match the removal record it copied."""
    import json

    from graphprune.pruning.apply import PRUNED_CHANNELS_KEY, REMOVED_CHANNELS_KEY, pruned_channels
    from graphprune.training.batchnorm import mark_reconstructed, statistics_follow_reconstruction
    from graphprune.training.masks import WEIGHT_MASKS_KEY

    model = _storage_model()
    model.metadata_props.add(key=PRUNED_CHANNELS_KEY, value=json.dumps({"w2_bias": {"0": [1, 3]}}))
    model.metadata_props.add(key=REMOVED_CHANNELS_KEY, value=json.dumps({"w1": {"0": [2]}}, sort_keys=True))
    model.metadata_props.add(key=WEIGHT_MASKS_KEY, value=json.dumps({"version": 1, "weights": {"w1": {"sparsity": 0.5}}}))
    mark_reconstructed(model)

    compact(model)
    names = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    props = {p.key: json.loads(p.value) for p in model.metadata_props if p.key != "graphprune.reconstructed_after"}
    (bias_name,) = props[PRUNED_CHANNELS_KEY]
    (removed_name,) = props[REMOVED_CHANNELS_KEY]
    (masked_name,) = props[WEIGHT_MASKS_KEY]["weights"]
    assert {bias_name, removed_name, masked_name} <= names and "w1" not in names
    assert removed_name == masked_name
    conv1, conv2 = [n for n in model.graph.node if n.op_type == "Conv"]
    assert conv1.input[1] == removed_name and conv2.input[2] == bias_name  # the same tensors as before
    assert props[PRUNED_CHANNELS_KEY][bias_name] == {"0": [1, 3]}
    assert statistics_follow_reconstruction(model)
    assert pruned_channels(model) == {bias_name: {"0": [1, 3]}}

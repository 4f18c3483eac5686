"""InsertQDQPass on small inline models: fused int8 kernels in ORT, error bounds, overrides, budget, refusals."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphprune.data import InputSet, load_inputs
from graphprune.errors import UserError
from graphprune.model_io import check_model, load
from graphprune.passes.insert_qdq import InsertQDQPass, insert_qdq
from graphprune.runtime import make_session, run_samples
from graphprune.validate import compare_outputs

DIGITS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
# Fused int8 kernels ORT's optimizer makes out of QDQ groups on the CPU.
INT8_KERNELS = {"QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "ConvInteger", "QLinearAdd",
                "QLinearGlobalAveragePool", "NhwcMaxPool", "QLinearConcat"}


def _conv(nodes, inits, rng, x, cin, cout, k=3, group=1, name=None, scale=1.0):
    w = rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / (cin // group * k * k)) * scale
    inits += [numpy_helper.from_array(w.astype(np.float32), f"{name}_w"),
              numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32), f"{name}_b")]
    nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [name], name=name, pads=[k // 2] * 4, group=group))
    return name


def _model(nodes, inits, x_shape, out, out_shape, opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def dense_cnn(width: int = 64, size: int = 16, seed: int = 0) -> onnx.ModelProto:
    """x[1,16,S,S] -> conv-relu -> conv-relu -> maxpool -> conv + skip -> relu -> gap -> flatten -> gemm(10)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    a = _conv(nodes, inits, rng, "x", 16, width, name="c1")
    nodes.append(helper.make_node("Relu", [a], ["r1"], name="r1"))
    b = _conv(nodes, inits, rng, "r1", width, width, name="c2")
    nodes.append(helper.make_node("Relu", [b], ["r2"], name="r2"))
    nodes.append(helper.make_node("MaxPool", ["r2"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
    c = _conv(nodes, inits, rng, "p", width, width, name="c3")
    nodes += [helper.make_node("Add", [c, "p"], ["s"], name="add"), helper.make_node("Relu", ["s"], ["r3"], name="r3"),
              helper.make_node("GlobalAveragePool", ["r3"], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flatten")]
    inits.append(numpy_helper.from_array((rng.standard_normal((10, width)) * 0.2).astype(np.float32), "fc_w"))
    nodes.append(helper.make_node("Gemm", ["f", "fc_w"], ["y"], name="fc", transB=1))
    return _model(nodes, inits, [1, 16, size, size], "y", [1, 10])


def depthwise_net(seed: int = 0) -> onnx.ModelProto:
    """Only depthwise convs between HardSwish activations: int8 cannot pay anywhere."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(3):
        x = _conv(nodes, inits, rng, x, 32, 32, group=32, name=f"dw{i}")
        nodes.append(helper.make_node("HardSwish", [x], [f"h{i}"], name=f"h{i}"))
        x = f"h{i}"
    return _model(nodes, inits, [1, 32, 16, 16], x, [1, 32, 16, 16])


def outlier_net(seed: int = 0) -> onnx.ModelProto:
    """Dense convs whose middle layer has a few huge weights: per-tensor int8 loses the small ones."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(4):
        x = _conv(nodes, inits, rng, x, 16 if i == 0 else 48, 48, name=f"c{i}")
        if i == 2:
            w = numpy_helper.to_array(inits[-2]).copy()
            w.reshape(-1)[:4] *= 200.0
            inits[-2] = numpy_helper.from_array(w, inits[-2].name)
    return _model(nodes, inits, [1, 16, 12, 12], x, [1, 48, 12, 12])


def matmul_net(seed: int = 0) -> onnx.ModelProto:
    """x[1,32,64] -> MatMul(64x128) -> Relu -> MatMul(128x64): a transformer MLP block."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((64, 128)) * 0.125).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((128, 64)) * 0.09).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    return _model(nodes, inits, [1, 32, 64], "y", [1, 32, 64])


def samples(model: onnx.ModelProto, n: int = 8, seed: int = 1) -> InputSet:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(seed).standard_normal((n * shape[0],) + tuple(shape[1:])).astype(np.float32)
    return InputSet({"x": x}, fixed_batch=shape[0])


def rel_error(original, candidate, data: InputSet) -> float:
    a = run_samples(make_session(original), data)
    b = run_samples(make_session(candidate), data)
    return max(compare_outputs(k, a[k], b[k]).rel_l2 for k in a)


def optimized_ops(model: onnx.ModelProto, tmp_path) -> Counter:
    """Op types of the graph ORT actually runs (after its QDQ fusions)."""
    path = str(tmp_path / "optimized.onnx")
    make_session(model, optimized_model_path=path)
    return Counter(n.op_type for n in onnx.load(path).graph.node)


def test_dense_cnn_runs_int8_kernels_with_small_error(tmp_path):
    model, data = dense_cnn(), samples(dense_cnn())
    result = InsertQDQPass(data=data, measure=False)(model)
    assert result.modified
    check_model(result.model, full=True)
    ops = optimized_ops(result.model, tmp_path)
    assert ops["QLinearConv"] == 3, ops
    assert ops["QGemm"] == 1 and ops["QLinearAdd"] == 1, ops
    assert "Conv" not in ops  # no float convolution left
    assert rel_error(model, result.model, data) < 0.03
    assert result.stats["nodes_quantized"] >= 6
    assert result.stats["quantized_ops"]["Conv"] == 3


def test_weights_int8_per_channel_bias_int32_activations_uint8():
    model = dense_cnn()
    q = insert_qdq(model, data=samples(model), measure=False)
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    weight_dq = [n for n in dq if inits[n.input[0]].ndim == 4]
    assert weight_dq and all(inits[n.input[0]].dtype == np.int8 for n in weight_dq)
    assert all(inits[n.input[1]].shape == (64,) for n in weight_dq if inits[n.input[0]].shape[0] == 64)
    assert all(not inits[n.input[2]].any() for n in weight_dq)  # symmetric: zero points 0
    assert any(inits[n.input[0]].dtype == np.int32 for n in dq)  # biases
    act_q = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert act_q and all(inits[n.input[2]].dtype == np.uint8 for n in act_q)


def test_per_tensor_and_int8_activations():
    model = dense_cnn()
    q = insert_qdq(model, data=samples(model), measure=False, per_channel=False, activation_type="int8")
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    weight_dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].ndim == 4]
    assert weight_dq and all(inits[n.input[1]].size == 1 for n in weight_dq)
    act_q = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert act_q and all(inits[n.input[2]].dtype == np.int8 for n in act_q)


def test_matmul_block_fuses_into_int8_matmul(tmp_path):
    model = matmul_net()
    data = samples(model)
    q = insert_qdq(model, data=data, measure=False)
    ops = optimized_ops(q, tmp_path)
    assert ops["QLinearMatMul"] + ops["MatMulIntegerToFloat"] == 2, ops
    assert rel_error(model, q, data) < 0.03


def test_calibration_methods_and_iterable_data():
    model = dense_cnn()
    data = samples(model)
    feeds = [{"x": data.arrays["x"][i : i + 1]} for i in range(len(data))]
    for method in ("percentile", "entropy"):
        q = insert_qdq(model, data=feeds, method=method, measure=False)
        assert rel_error(model, q, data) < 0.08, method


def test_digits_cnn_keeps_accuracy(tmp_path):
    model = load(os.path.join(DIGITS, "digits_cnn.onnx"))
    train, _ = load_inputs(os.path.join(DIGITS, "digits_train.npz"), model)
    test, extras = load_inputs(os.path.join(DIGITS, "digits_test.npz"), model, extra_keys=["labels"])
    q = insert_qdq(model, data=train, measure=False, calibration_samples=128)
    assert optimized_ops(q, tmp_path)["QLinearConv"] >= 2
    ref = run_samples(make_session(model), test)["logits"]
    out = run_samples(make_session(q), test)["logits"]
    labels = extras["labels"]
    acc_ref = np.mean(ref.argmax(1) == labels)
    acc_q = np.mean(out.argmax(1) == labels)
    assert acc_q >= acc_ref - 0.01
    assert compare_outputs("logits", ref, out).rel_l2 < 0.05


def test_exclude_and_op_types_keep_nodes_float(tmp_path):
    model = dense_cnn()
    data = samples(model)
    result = InsertQDQPass(data=data, measure=False, exclude=["c3"])(model)
    assert "c3" in result.stats["float_layers"] and "--exclude" in result.stats["float_layers"]["c3"]
    assert optimized_ops(result.model, tmp_path)["QLinearConv"] == 2
    convs_only = InsertQDQPass(data=data, measure=False, op_types=["Conv", "Relu", "MaxPool"])(model)
    assert "Gemm" not in convs_only.stats["quantized_ops"]
    assert "op types" in convs_only.stats["float_layers"]["fc"]


def _default_session_graph(model: onnx.ModelProto, tmp_path) -> onnx.GraphProto:
    """The graph plain onnxruntime runs for ``model`` with default session options (every optimizer on)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "default_options.onnx")
    onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath).graph


def _float_weighted(graph: onnx.GraphProto, op_type: str):
    """(node, weight array) of the ``op_type`` nodes (any domain: ORT's NCHWc Conv too) with a float32 initializer weight."""
    inits = {i.name: i for i in graph.initializer}
    return [(n, numpy_helper.to_array(inits[n.input[1]])) for n in graph.node
            if n.op_type == op_type and n.input[1] in inits and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT]


def test_excluded_conv_stays_float_on_default_session_options(tmp_path, monkeypatch):
    # ORT >= 1.21's WeightBiasQuantization would quantize c3's weights: its input comes from the int8 MaxPool
    import onnxruntime

    from graphprune.quantization import engine

    model, data = dense_cnn(), samples(dense_cnn())
    result = InsertQDQPass(data=data, measure=False, exclude=["c3"])(model)
    graph = _default_session_graph(result.model, tmp_path)
    assert Counter(n.op_type for n in graph.node)["QLinearConv"] == 2
    (conv, weight), = _float_weighted(graph, "Conv")
    original = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "c3_w")
    # the very weights of c3 (ORT may reorder them into its NCHWc blocked layout)
    np.testing.assert_array_equal(np.sort(weight.ravel()), np.sort(original.ravel()))
    # what the user's default session computes is what graphprune measured
    feed = {"x": data.arrays["x"][:1]}
    default = onnxruntime.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    measured = make_session(result.model).run(None, feed)[0]
    np.testing.assert_allclose(default.run(None, feed)[0], measured, rtol=1e-6, atol=1e-6)

    # control: with the per-tensor DequantizeLinear the quantizer writes, ORT makes c3 int8 too
    if tuple(int(v) for v in onnxruntime.__version__.split(".")[:2]) >= (1, 21):
        monkeypatch.setattr(engine, "keep_float_layers_float", lambda model, shapes: [])
        exposed = InsertQDQPass(data=data, measure=False, exclude=["c3"])(model)
        exposed_graph = _default_session_graph(exposed.model, tmp_path)
        assert Counter(n.op_type for n in exposed_graph.node)["QLinearConv"] == 3


def test_float_layers_read_a_per_axis_dequantize_with_the_same_values():
    from graphprune.quantization.float_layers import keep_float_layers_float

    rng = np.random.default_rng(0)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.uint8(128), "zp"),
             numpy_helper.from_array(f32(4, 3, 3, 3), "wa"), numpy_helper.from_array(f32(4, 3, 1, 1), "wb"),
             numpy_helper.from_array(f32(5, 4), "wg"), numpy_helper.from_array(f32(5), "bg")]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq"),  # read by two float convs
        helper.make_node("Conv", ["xd", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["xd", "wb"], ["b"], name="conv_b"),
        helper.make_node("Add", ["a", "b"], ["s1"], name="add"),
        helper.make_node("ReduceMean", ["s1"], ["m"], name="mean", axes=[2, 3], keepdims=0),
        helper.make_node("QuantizeLinear", ["m", "s", "zp"], ["mq"], name="q2"),
        helper.make_node("DequantizeLinear", ["mq", "s", "zp"], ["md"], name="dq2"),  # read by the Gemm alone
        helper.make_node("Gemm", ["md", "wg", "bg"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    protected = onnx.ModelProto.FromString(before)
    assert keep_float_layers_float(protected, {}) == []
    check_model(protected, full=True)

    by_name = {n.name: n for n in protected.graph.node}
    values = {i.name: numpy_helper.to_array(i) for i in protected.graph.initializer}
    # each conv gets its own DequantizeLinear, spread over its 3 channels; the shared one, unread, goes
    assert "dq" not in by_name
    for conv in ("conv_a", "conv_b"):
        own = next(n for n in protected.graph.node if n.output[0] == by_name[conv].input[0])
        assert own.op_type == "DequantizeLinear" and own.input[0] == "xq" and own.name == f"dq/for_{conv}"
        assert [a.i for a in own.attribute if a.name == "axis"] == [1]
        np.testing.assert_array_equal(values[own.input[1]], np.full(3, np.float32(0.05)))
        np.testing.assert_array_equal(values[own.input[2]], np.full(3, np.uint8(128)))
    # the Gemm's DequantizeLinear has no other reader: spread in place over K = 4 (axis 1 of A)
    assert by_name["fc"].input[0] == "md" and [a.i for a in by_name["dq2"].attribute] == [1]
    assert values[by_name["dq2"].input[1]].shape == (4,)
    feed = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    np.testing.assert_array_equal(make_session(protected).run(None, feed)[0],
                                  make_session(onnx.ModelProto.FromString(before)).run(None, feed)[0])
    assert keep_float_layers_float(protected, {}) == []  # a second run finds nothing per-tensor left
    assert len(protected.graph.node) == len(nodes) + 1


def test_cost_model_keeps_depthwise_net_float():
    model = depthwise_net()
    result = InsertQDQPass(data=samples(model), measure=False)(model)
    assert not result.modified
    assert result.model is model
    reasons = result.stats["float_layers"]
    assert set(reasons) == {"dw0", "dw1", "dw2"}
    assert all("cost model" in r for r in reasons.values())


def test_no_quantizable_op_is_a_no_op():
    graph = helper.make_graph([helper.make_node("HardSwish", ["x"], ["y"], name="hs")], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = InsertQDQPass(data=[{"x": np.ones((1, 8), np.float32)}])(model)
    assert not result.modified and result.model is model
    assert result.stats["nodes_quantized"] == 0


def test_measured_choice_reports_candidates_and_never_loses_to_float():
    model = dense_cnn(width=32, size=8)
    result = InsertQDQPass(data=samples(model))(model)
    stats = result.stats
    assert stats["threads"] == 1 and stats["float_latency_ms"] > 0
    assert stats["candidates"] and all(c["latency_ms"] > 0 for c in stats["candidates"].values())
    if result.modified:
        chosen = stats["candidates"][stats["chosen"]]
        assert chosen["latency_ms"] < stats["float_latency_ms"]
    else:
        assert stats["chosen"] == "float" and result.model is model


def test_error_budget_holds_where_full_quantization_does_not():
    model = outlier_net()
    data = samples(model, n=6)
    full = insert_qdq(model, data=data, measure=False, per_channel=False)
    full_error = rel_error(model, full, data)
    budget = full_error / 3
    result = InsertQDQPass(data=data, measure=False, per_channel=False, max_error=budget)(model)
    assert full_error > budget
    assert result.modified
    assert rel_error(model, result.model, data) <= budget
    budget_reasons = [r for r in result.stats["float_layers"].values() if r.startswith("error budget")]
    assert budget_reasons and "c2" in result.stats["float_layers"]
    assert result.stats["nodes_quantized"] > 0


def test_without_data_warns_and_uses_random_inputs():
    model = dense_cnn()
    with pytest.warns(UserWarning, match="without calibration data"):
        result = InsertQDQPass(measure=False)(model)
    assert result.modified and result.stats["calibration"]["from_data"] is False


def test_refuses_already_quantized_model():
    model = dense_cnn()
    q = insert_qdq(model, data=samples(model), measure=False)
    with pytest.raises(UserError, match="already quantized .it contains (De)?[Qq]uantizeLinear"):
        InsertQDQPass(measure=False)(q)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "kl"}, "unknown calibration method 'kl'"),
        ({"activation_type": "fp8"}, "unknown activation type"),
        ({"max_error": 0}, "max_error must be > 0"),
        ({"max_error": -0.1}, "max_error must be > 0"),
        ({"op_types": ["HardSwish"]}, "cannot be quantized"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        InsertQDQPass(**kwargs)


def test_bad_data_and_exclude_are_user_errors():
    model = dense_cnn()
    with pytest.raises(UserError, match="not in the model"):
        InsertQDQPass(exclude=["nope"], measure=False)(model)
    with pytest.raises(UserError, match="no array for model input 'x'"):
        InsertQDQPass(data=[{"images": np.zeros((1, 16, 16, 16), np.float32)}], measure=False)(model)
    with pytest.raises(UserError, match="rank"):
        InsertQDQPass(data=[{"x": np.zeros((16, 16, 16), np.float32)}], measure=False)(model)


def test_transformer_encoder_matmuls_fuse_with_dynamic_dims(tmp_path, monkeypatch):
    from graphprune.data import random_inputs
    from graphprune.testing.fixtures import bert_encoder

    model = bert_encoder(hidden=256, ffn=1024, heads=4)  # inputs [N, S]: shapes come from the data
    data = random_inputs(model, {"input_ids": (1, 64)}, samples=4, seed=1)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    result = InsertQDQPass(data=data, measure=False)(model)
    # ORT's symbolic shape inference gives up on this graph and dumps files into the working directory
    assert os.listdir(workdir) == []
    assert result.modified
    assert result.stats["quantized_ops"]["MatMul"] >= 12  # the projections and the FFN of both layers
    ops = optimized_ops(result.model, tmp_path)
    assert ops["QLinearMatMul"] + ops["MatMulIntegerToFloat"] >= 12, ops
    assert rel_error(model, result.model, data) < 0.1

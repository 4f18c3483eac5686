"""Weight-only quantization: int4 / int8 numerics against dequantized float twins, formats, data-aware choices."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphprune.data import InputSet
from graphprune.errors import UserError
from graphprune.model_io import check_model
from graphprune.passes.quantize_weights import QuantizeWeightsPass, quantize_weights
from graphprune.quantization import weight_only as wo
from graphprune.quantization.weight_nodes import find_targets
from graphprune.runtime import make_session
from graphprune.testing.fixtures_small import digits_cnn_like, mlp
from graphprune.testing.fixtures_transformer import bert_encoder
from tests.helpers import conv_model


def _bert():
    return bert_encoder(layers=1, hidden=64, heads=4, ffn=128, vocab=100)


def _ids(n=2, seq=12, seed=0):
    return np.random.default_rng(seed).integers(0, 100, (n, seq)).astype(np.int64)


def _run(model, feed, optimization="all"):
    return make_session(model, optimization=optimization).run(None, feed)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _dequantized_twin(model, bits, block_size=32, embeddings=True):
    """The float model whose weights are replaced by what their quantized form dequantizes to."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    targets, _ = find_targets(model, bits, block_size, embeddings)
    for init in twin.graph.initializer:
        t = targets.get(init.name)
        if t is None:
            continue
        w = numpy_helper.to_array(init)
        if t.bits == 8:
            axis = 0 if t.kind in ("conv", "embedding") or t.transposed else 1
            q, s = wo.int8_per_channel(w, axis)
            shape = [1] * w.ndim
            shape[axis] = -1
            d = q.astype(np.float32) * s.reshape(shape)
        elif t.kind == "embedding":
            q, s = wo.int4_blocks_rtn(w.T, block_size)
            d = wo.dequantize_int4(q, s, block_size).T
        else:
            wk = w.T if t.transposed else w
            q, s = wo.int4_blocks_rtn(wk, block_size)
            d = wo.dequantize_int4(q, s, block_size)
            d = d.T if t.transposed else d
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(d, dtype=np.float32), init.name))
    return twin


def test_nbits_packing_matches_onnxruntimes_kernel():
    w = np.random.default_rng(0).standard_normal((70, 9)).astype(np.float32)  # K not a multiple of the block
    q, scale = wo.int4_blocks_rtn(w, 32)
    packed, scales = wo.ort_rtn_nbits(w, 32)
    np.testing.assert_array_equal(wo.pack_nbits(q, 32), packed)
    np.testing.assert_allclose(scale.T, scales, rtol=0, atol=0)
    assert q.min() >= -8 and q.max() <= 7 and (q == -8).any()  # the full range is used


@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_int4_matmulnbits_equals_dequantized_twin(block_size):
    model = _bert()
    feed = {"input_ids": _ids()}
    result = QuantizeWeightsPass(bits=4, block_size=block_size, accuracy_level=0, int4_kernel="matmulnbits")(model)
    ops = {n.op_type for n in result.model.graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops and "MatMul" in ops  # attention's MatMuls stay
    check_model(result.model, full=True)
    twin = _dequantized_twin(model, 4, block_size)
    for got, want in zip(_run(result.model, feed), _run(twin, feed)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert result.stats["formats"] == {"embedding int4": 2, "gemm int4": 2, "matmul int4": 6}  # the 64 x 2 head too
    assert result.stats["float_bytes"] / result.stats["quantized_bytes"] > (6.0 if block_size >= 32 else 5.0)


def test_int8_equals_dequantized_twin_on_matmul_gemm_conv_and_embeddings():
    for model, feed in [(_bert(), {"input_ids": _ids()}),
                        (digits_cnn_like(), {"input": np.random.default_rng(0).standard_normal((2, 1, 8, 8), np.float32)})]:
        feed = {model.graph.input[0].name: feed[next(iter(feed))]}
        result = quantize_weights(model, bits=8, kernel="matmulnbits")  # the int8 kernel's: test_kernel_choice
        check_model(result, full=True)
        assert any(n.op_type == "DequantizeLinear" for n in result.graph.node)
        # basic: at "extended" ORT turns DequantizeLinear -> MatMul into 8-bit MatMulNBits, which
        # quantizes activations too (its accuracy_level 4), so only the unfused graph is exact
        twin = _dequantized_twin(model, 8)
        for got, want in zip(_run(result, feed, "basic"), _run(twin, feed, "basic")):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        for got, want in zip(_run(result, feed), _run(model, feed)):
            assert _rel(got, want) < 0.03


def test_qdq_int4_when_the_runtime_has_no_matmulnbits(monkeypatch):
    real = wo.runtime_has
    monkeypatch.setattr(wo, "runtime_has", lambda kind: False if kind == "MatMulNBits" else real(kind))
    model = mlp(in_features=64, hidden=(96,), classes=10)  # opset < 21: the model is converted
    feed = {"input": np.random.default_rng(0).standard_normal((3, 64), np.float32)}
    result = quantize_weights(model, bits=4, int4_kernel="matmulnbits")  # (auto: the int8 form, no probe)
    check_model(result, full=True)
    assert next(i.version for i in result.opset_import if i.domain == "") == 21
    dq = [n for n in result.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(any(a.name == "block_size" and a.i == 32 for a in n.attribute) for n in dq)
    assert not any(n.op_type == "MatMulNBits" for n in result.graph.node)
    twin = _dequantized_twin(model, 4)  # unfused ("basic"): ORT fuses blocked DQ -> MatMul to MatMulNBits
    for got, want in zip(_run(result, feed, "basic"), _run(twin, feed, "basic")):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_gptq_and_awq_lower_the_layer_error_of_rtn():
    rng = np.random.default_rng(0)
    # correlated inputs of uneven scale, as activations are: what GPTQ and AWQ exploit
    x = rng.standard_normal((256, 24)) @ rng.standard_normal((24, 96)) + 0.1 * rng.standard_normal((256, 96))
    x = (x * rng.uniform(0.1, 3.0, 96)).astype(np.float32)
    w = rng.standard_normal((96, 40)).astype(np.float32)

    def err(d):
        return float(np.square(x @ (d - w)).sum())

    q, s = wo.int4_blocks_rtn(w, 32)
    rtn = err(wo.dequantize_int4(q, s, 32))
    q, s = wo.int4_blocks_gptq(w, x.T @ x, 32)
    assert err(wo.dequantize_int4(q, s, 32)) < 0.8 * rtn
    scale = wo.awq_scale([w], x, np.abs(x).mean(axis=0), 32)
    q, s = wo.int4_blocks_rtn(w * scale[:, None], 32)
    assert err(wo.dequantize_int4(q, s, 32) / scale[:, None]) <= rtn


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)


@pytest.mark.parametrize("algorithm", ["awq", "gptq"])
def test_data_aware_int4_runs_and_is_no_worse_than_rtn(algorithm):
    model = _bert()
    data = InputSet({"input_ids": _ids(16, 12, seed=1)})
    feed = {"input_ids": _ids(4, 12, seed=2)}
    reference = _run(model, feed)[0]
    rtn = _rel(_run(quantize_weights(model, bits=4), feed)[0], reference)
    result = QuantizeWeightsPass(bits=4, algorithm=algorithm, data=data)(model)
    check_model(result.model, full=True)
    if algorithm == "awq":
        # in the main graph, or in both branches of the dispatch form (which ``auto`` may choose)
        assert any(n.name.endswith("_awq_scaled_Mul") for n in _all_nodes(result.model.graph))
    assert _rel(_run(result.model, feed)[0], reference) < rtn * 1.05


def test_refusals():
    with pytest.raises(UserError, match="no MatMul/Gemm weight"):
        QuantizeWeightsPass(bits=4)(conv_model(width=4))  # the conv weight alone (fc too small to pay): no int4 kernel
    with pytest.raises(UserError, match="block-size 48"):
        QuantizeWeightsPass(bits=4, block_size=48)
    with pytest.raises(UserError, match="needs calibration data"):
        QuantizeWeightsPass(bits=4, algorithm="gptq")
    with pytest.raises(UserError, match="int8 per channel"):
        QuantizeWeightsPass(bits=8, algorithm="awq", data=[])


def test_embedding_width_not_a_multiple_of_the_block_is_int8_per_row():
    result = QuantizeWeightsPass(bits=4, block_size=128)(_bert())  # hidden 64 < block 128
    assert result.stats["formats"]["embedding int8"] == 2
    assert "not a multiple of block 128" in result.stats["skipped"]["embeddings.word_embeddings.weight"]


def test_no_weights_is_a_no_op_and_shared_roles_stay_float():
    from onnx import helper, TensorProto

    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32), "t")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["t", "ids"], ["e"]), helper.make_node("Add", ["t", "t"], ["doubled"])],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("doubled", TensorProto.FLOAT, None)], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = QuantizeWeightsPass(bits=8)(model)
    assert result.modified is False and "t" in result.stats["skipped"]


def test_weights_held_by_constant_nodes():
    """Paddle exports (PP-OCR) hold every weight in a Constant node, at opset 11 (no per-axis DQ yet)."""
    model = conv_model(constant_weights=True, width=32)
    model.opset_import[0].version = 11
    feed = {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    result = QuantizeWeightsPass(bits=8, kernel="matmulnbits")(model)
    assert result.stats["formats"] == {"conv int8": 1, "gemm int8": 1}
    check_model(result.model, full=True)
    constants = [n for n in result.model.graph.node if n.op_type == "Constant"]
    assert [c.output[0] for c in constants] == ["b"]  # the bias stays float: int8 would not be smaller
    ops = [n.op_type for n in result.model.graph.node]
    assert "DequantizeLinear" not in ops and ops.count("Cast") == ops.count("Mul") == 2  # opset 11: Cast and Mul
    np.testing.assert_allclose(_run(result.model, feed, "basic")[0], _run(model, feed, "basic")[0], rtol=0.02, atol=0.02)


@pytest.mark.parametrize("bits, bound", [(4, 0.2), (8, 0.02)])
def test_float16_weights_keep_float16_scales(bits, bound):
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["t", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 32])],
        [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float16), "w"),
         numpy_helper.from_array(rng.standard_normal((300, 64)).astype(np.float16), "t")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feed = {"ids": np.array([1, 5, 299], np.int64)}
    result = QuantizeWeightsPass(bits=bits)(model)
    check_model(result.model, full=True)
    assert result.stats["formats"] == {f"embedding int{bits}": 1, f"matmul int{bits}": 1}
    got, want = _run(result.model, feed)[0], _run(model, feed)[0]
    assert got.dtype == np.float16 and _rel(got.astype(np.float32), want.astype(np.float32)) < bound


@pytest.mark.parametrize("folded", [False, True])
def test_conv_weights_are_dequantized_at_load_and_matmuls_unless_folded(folded):
    """Conv weights are Cast + Mul (ONNX Runtime folds them at load; a DequantizeLinear would run at
    every inference, outside the NCHWc Conv); MatMul/Gemm weights take DequantizeLinear (fused into
    8-bit MatMulNBits) unless ``folded`` asks for float speed and math everywhere."""
    model = conv_model(width=32)  # opset 17: per-axis DequantizeLinear exists
    result = QuantizeWeightsPass(bits=8, folded=folded, kernel="matmulnbits")(model)
    check_model(result.model, full=True)
    producers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    assert producers["w"] == "Mul" and producers["fc"] == ("Mul" if folded else "DequantizeLinear")
    assert result.stats["formats"] == {"conv int8": 1, "gemm int8": 1}  # the 32-value bias stays float
    feed = {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    twin = _dequantized_twin(model, 8)
    np.testing.assert_allclose(_run(result.model, feed, "basic")[0], _run(twin, feed, "basic")[0], rtol=1e-5, atol=1e-5)


def test_int4_with_block_multipliers_round_trip_and_error():
    """The stored form (4-bit q, integer block multipliers r, column scales u) gives q * r within int8
    and the error of int4 blocks with float scales, up to the rounding of r."""
    from graphprune.quantization import weight_int8_kernel as ik

    w = np.random.default_rng(0).standard_normal((256, 48)).astype(np.float32)
    q, mult, unit = ik.int4_with_multipliers(w, 32)
    assert q.shape == (8, 32, 48) and mult.shape == (8, 48) and unit.shape == (48,)
    assert q.min() == -8 and q.max() <= 7
    packed = ik.nibbles(q)  # the uint8 form: a block's first half in the low nibbles, its second in the high
    assert packed.shape == (8, 16, 48)
    np.testing.assert_array_equal(np.concatenate([packed % 16, packed >> 4], axis=1).astype(np.int8) - 8, q)
    assert np.abs(mult).min() >= 1 and (np.abs(mult).max(axis=0) == 15).all()  # each column's widest block: 15
    d = ik.dequantize(q, mult, unit)
    assert np.abs(np.rint(d / unit)).max() <= 120  # q * r is an exact int8
    q, s = wo.int4_blocks_rtn(w, 32)
    float_scales = _rel(wo.dequantize_int4(q, s, 32), w)
    assert _rel(d, w) < 1.06 * float_scales  # 0.0897 against 0.0863


def _stored_q(inits, name):
    """The int8-kernel form's 4-bit values [K / block, block, N]: an INT4 tensor, or uint8 nibbles."""
    if f"{name}_q4" in inits:
        return inits[f"{name}_q4"].astype(np.int8)
    packed = inits[f"{name}_q4_packed"]
    return np.concatenate([packed % 16, packed >> 4], axis=1).astype(np.int8) - 8


@pytest.mark.parametrize("algorithm, int4_cast", [("rtn", True), ("awq", True), ("rtn", False)])
def test_int4_for_the_int8_kernel_equals_its_dequantized_twin(algorithm, int4_cast, monkeypatch):
    """--int4-kernel int8: the expansion is folded at load, only DynamicQuantizeMatMul runs, and the outputs
    match the float model whose weights are the stored form's values (activations quantized per run)."""
    from graphprune.quantization import weight_int8_kernel as ik

    real = wo.runtime_has
    monkeypatch.setattr(wo, "runtime_has", lambda kind: (int4_cast if kind == "CastInt4" else real(kind)))
    model = mlp(in_features=64, hidden=(96,), classes=10)  # MatMul 64 x 96, Gemm/MatMul 96 x 10
    feed = {"input": np.random.default_rng(0).standard_normal((4, 64), np.float32)}
    data = InputSet({"input": np.random.default_rng(1).standard_normal((16, 64), np.float32)})
    result = QuantizeWeightsPass(bits=4, kernel="int8", algorithm=algorithm, data=data if algorithm == "awq" else None)(model)
    check_model(result.model, full=True)
    assert result.stats["kernel"] == result.stats["int4_kernel"] == "int8"
    opset = next(i.version for i in result.model.opset_import if i.domain == "")
    assert (opset, {t.data_type for t in result.model.graph.initializer} >= {onnx.TensorProto.INT4}) == (
        (21, True) if int4_cast else (opset, False))  # INT4 values: the model raised to opset 21
    session = make_session(result.model)
    got = session.run(None, feed)[0]
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    quantized = [n for n in result.model.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    assert len(quantized) == sum(1 for n in model.graph.node if n.op_type in ("MatMul", "Gemm"))
    for node in quantized:
        name = node.input[1][: -len("_int8")]
        d = ik.dequantize(_stored_q(inits, name), inits[f"{name}_q4_multipliers"][:, 0, :], inits[node.input[2]])
        if node.input[0].endswith("_awq_scaled"):  # AWQ: the input is divided by s, the weight took the product
            d = d * inits[node.input[0][: -len("_scaled")] + "_inverse_scale"][:, None]
        for init in twin.graph.initializer:
            if init.name == name:
                init.CopyFrom(numpy_helper.from_array(d if tuple(init.dims) == d.shape else d.T.copy(), name))
    want = _run(twin, feed)[0]
    assert _rel(got, want) < 0.02  # DynamicQuantizeMatMul's per-tensor uint8 activations
    assert _rel(got, _run(model, feed)[0]) < 0.3


def test_int4_for_the_int8_kernel_is_folded_at_load(tmp_path):
    import onnxruntime as ort

    model = mlp(in_features=64, hidden=(96,), classes=10)
    path = str(tmp_path / "q.onnx")
    onnx.save(QuantizeWeightsPass(bits=4, kernel="int8")(model).model, path)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
    assert "DynamicQuantizeMatMul" in ops and not ops & {"Mod", "BitShift", "Concat", "Cast", "Reshape"}


def test_kernel_refusals():
    with pytest.raises(UserError, match="--kernel 'int2'"):
        QuantizeWeightsPass(bits=4, kernel="int2")
    with pytest.raises(UserError, match="--kernel 'int2'"):
        QuantizeWeightsPass(bits=4, int4_kernel="int2")  # the old spelling, the same check
    with pytest.raises(UserError, match="applies to --weights-only int4"):
        QuantizeWeightsPass(bits=8, int4_kernel="int8")
    with pytest.raises(UserError, match="disagree"):
        QuantizeWeightsPass(bits=4, kernel="int8", int4_kernel="matmulnbits")
    with pytest.raises(UserError, match="gptq"):
        QuantizeWeightsPass(bits=4, kernel="int8", algorithm="gptq", data=[])
    assert QuantizeWeightsPass(bits=4, kernel="int8", int4_kernel="int8").kernel == "int8"  # agreeing: fine

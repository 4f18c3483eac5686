"""--weights-only int4 --kernel dispatch: one If on the row count, MatMulNBits for one row, the int8 kernel for more."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.cli import main
from graphprune.errors import UserError
from graphprune.model_io import check_model
from graphprune.passes.quantize_weights import QuantizeWeightsPass
from graphprune.quantization import kernel_choice
from graphprune.quantization import weight_only as wo
from graphprune.runtime import make_session
from graphprune.testing.fixtures_transformer import gpt_decoder

pytestmark = pytest.mark.skipif(
    not all(wo.runtime_has(k) for k in ("MatMulNBits", "DynamicQuantizeMatMul", "CastInt4")),
    reason="the runtime lacks one of the dispatch form's kernels")


def _decoder() -> onnx.ModelProto:
    """A SwiGLU decoder with GQA (hidden 64: two blocks of 32 per row of every weight)."""
    return gpt_decoder(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, gated=True, vocab=100)


def _nbits_twin(int8_form: onnx.ModelProto) -> onnx.ModelProto:
    """The int8 kernel's form with each DynamicQuantizeMatMul replaced by a MatMulNBits on the same
    int4 values and block scales (multiplier x column scale), packed by numpy (``wo.pack_nbits``):
    what the dispatch form's then-branch must compute, built without its derivations."""
    model = onnx.ModelProto()
    model.CopyFrom(int8_form)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "DynamicQuantizeMatMul":
            continue
        name = node.input[1][: -len("_int8")]
        q = inits[f"{name}_q4"].astype(np.int8)  # [K / b, b, N]
        blocks, block, n = q.shape
        scales = (inits[f"{name}_q4_multipliers"].reshape(blocks, n) * inits[f"{name}_scale"]).T.astype(np.float32)
        b_name, s_name = f"{name}_twin_b", f"{name}_twin_s"
        model.graph.initializer.extend([numpy_helper.from_array(wo.pack_nbits(q.reshape(-1, n), block), b_name),
                                        numpy_helper.from_array(np.ascontiguousarray(scales), s_name)])
        node.op_type = "MatMulNBits"
        node.input[1:] = [b_name, s_name]
        node.attribute.extend([helper.make_attribute(k, v) for k, v in
                               dict(K=blocks * block, N=n, bits=4, block_size=block, accuracy_level=4).items()])
    return model


def _ops(graph: onnx.GraphProto):
    return [n.op_type for n in graph.node]


def test_one_row_runs_matmulnbits_and_more_rows_the_int8_kernel_on_the_same_weights():
    model = _decoder()
    result = QuantizeWeightsPass(bits=4, kernel="dispatch")(model)
    int8_form = QuantizeWeightsPass(bits=4, kernel="int8")(model).model
    check_model(result.model, full=True)
    assert result.stats["kernel"] == "dispatch" and result.stats["formats"] == {"embedding int4": 2, "matmul int4": 15}
    dispatch = make_session(result.model)
    twin, int8 = make_session(_nbits_twin(int8_form)), make_session(int8_form)
    for rows in (1, 7):
        feed = {"input_ids": np.random.default_rng(rows).integers(0, 100, (1, rows)).astype(np.int64)}
        got = dispatch.run(None, feed)[0]
        want, other = (twin, int8) if rows == 1 else (int8, twin)
        np.testing.assert_allclose(got, want.run(None, feed)[0], rtol=1e-5, atol=1e-5)
        assert np.abs(got - other.run(None, feed)[0]).max() > 1e-3  # the other kernel really differs


def test_the_form_one_if_both_kernels_one_stored_copy_and_everything_folded_at_load(tmp_path):
    model = _decoder()
    dispatch = QuantizeWeightsPass(bits=4, kernel="dispatch")(model).model
    int8_form = QuantizeWeightsPass(bits=4, kernel="int8")(model).model
    graph = dispatch.graph
    assert _ops(graph)[-4:] == ["Shape", "ReduceProd", "Equal", "If"] and _ops(graph).count("If") == 1
    branch = {a.name: a.g for a in graph.node[-1].attribute}
    then_ops, else_ops = _ops(branch["then_branch"]), _ops(branch["else_branch"])
    assert then_ops.count("MatMulNBits") == 15 and "DynamicQuantizeMatMul" not in then_ops
    assert else_ops.count("DynamicQuantizeMatMul") == 15 and "MatMulNBits" not in else_ops
    assert not branch["then_branch"].initializer and not branch["else_branch"].initializer
    # the opset was raised on a weightless copy: every tensor written is the real one
    assert not any(t.external_data for t in graph.initializer)
    floats = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 1}
    assert floats and all(t.raw_data or t.float_data for t in graph.initializer if t.name in floats)
    assert "DequantizeLinear" not in _ops(branch["then_branch"]) + _ops(branch["else_branch"])
    stored = sum(len(t.raw_data) for t in graph.initializer)  # the int8 kernel's form's bytes, plus per weight
    assert 0 <= stored - sum(len(t.raw_data) for t in int8_form.graph.initializer) <= 15 * 16 + 16  # a 2-d shape
    # ONNX Runtime folds every derivation in the main graph: only the row test and the If are left
    path = str(tmp_path / "optimized.onnx")
    make_session(dispatch, optimized_model_path=path)
    assert _ops(onnx.load(path).graph) == ["Shape", "ReduceProd", "Equal", "If"]


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_a_float_input_counts_rows_over_all_dims_but_the_last(op):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((96, 64) if op == "Gemm" else (64, 96)) / 8).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    if op == "Gemm":
        inits.append(numpy_helper.from_array(rng.standard_normal(96).astype(np.float32), "c"))
        node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1)
    else:
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 96])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    dispatch = QuantizeWeightsPass(bits=4, kernel="dispatch")(model).model
    int8_form = QuantizeWeightsPass(bits=4, kernel="int8")(model).model
    check_model(dispatch, full=True)
    for rows, want in ((1, _nbits_twin(int8_form)), (5, int8_form)):
        feed = {"x": rng.standard_normal((rows, 64)).astype(np.float32)}
        np.testing.assert_allclose(make_session(dispatch).run(None, feed)[0], make_session(want).run(None, feed)[0],
                                   rtol=1e-5, atol=1e-5)


def test_rows_are_counted_on_a_fed_input_not_on_an_initializer_listed_as_input():
    """Before IR 4 the graph's inputs list its initializers too: an int64 one listed first is no row source."""
    model = _decoder()
    graph = model.graph
    positions = next(t for t in graph.initializer if t.name == "model.position_ids")  # int64 [1, 128]
    graph.input.insert(0, helper.make_tensor_value_info(positions.name, positions.data_type, list(positions.dims)))
    dispatch = QuantizeWeightsPass(bits=4, kernel="dispatch")(model).model
    shape = next(n for n in dispatch.graph.node if n.op_type == "Shape")
    assert shape.input[0] == "input_ids" and not shape.attribute  # token ids: every dim counts


def test_auto_dispatches_only_when_the_kernels_trade_places(monkeypatch):
    def timed(nbits_ms, int8_ms):
        monkeypatch.setattr(kernel_choice, "_timed", lambda *a: {"matmulnbits": dict(zip(kernel_choice.ROWS, nbits_ms)),
                                                                  "int8": dict(zip(kernel_choice.ROWS, int8_ms))})
    timed((0.2, 12.0), (0.3, 1.2))  # MatMulNBits 1.5x faster at 1 row, the int8 kernel 10x at 128
    kernel, detail = kernel_choice.choose_kernel(4, 1280, 3456, dispatch=True)
    assert kernel == "dispatch" and "dispatched by rows" in detail["reason"]
    assert kernel_choice.choose_kernel(4, 1280, 3456, dispatch=False)[0] == "int8"  # the model cannot take it
    assert kernel_choice.choose_kernel(8, 1280, 3456, dispatch=True)[0] == "int8"  # int4 only
    timed((0.3, 12.0), (0.2, 1.2))  # the int8 kernel wins both: nothing to dispatch
    assert kernel_choice.choose_kernel(4, 1280, 3456, dispatch=True)[0] == "int8"
    timed((0.2, 12.0), (0.21, 1.2))  # MatMulNBits ahead at 1 row by less than the margin
    assert kernel_choice.choose_kernel(4, 1280, 3456, dispatch=True)[0] == "int8"


def test_gptq_and_int8_with_dispatch_are_refused(tmp_path, capsys):
    with pytest.raises(UserError, match="gptq"):
        QuantizeWeightsPass(bits=4, kernel="dispatch", algorithm="gptq", data=[{}])
    src, out = str(tmp_path / "m.onnx"), str(tmp_path / "out.onnx")
    onnx.save(_decoder(), src)
    assert main(["quantize", src, "-o", out, "--weights-only", "int8", "--kernel", "dispatch"]) == 2
    assert "dispatch applies to --weights-only int4" in capsys.readouterr().err and not os.path.exists(out)


def test_a_runtime_without_int4_casts_refuses_dispatch_and_auto_does_not_choose_it(monkeypatch):
    real = wo.runtime_has
    monkeypatch.setattr(wo, "runtime_has", lambda kind: kind != "CastInt4" and real(kind))
    monkeypatch.setattr(kernel_choice, "_timed", lambda *a: {"matmulnbits": {1: 0.2, 128: 12.0},
                                                             "int8": {1: 0.3, 128: 1.2}})  # they trade places
    with pytest.raises(UserError, match="needs the runtime to run CastInt4"):
        QuantizeWeightsPass(bits=4, kernel="dispatch")(_decoder())
    assert QuantizeWeightsPass(bits=4)(_decoder()).stats["kernel"] == "int8"


def test_the_cli_writes_a_model_that_loads(tmp_path):
    src, out = str(tmp_path / "m.onnx"), str(tmp_path / "out.onnx")
    onnx.save(_decoder(), src)
    assert main(["quantize", src, "-o", out, "--weights-only", "int4", "--kernel", "dispatch"]) == 0
    written = onnx.load(out)
    check_model(written, full=True)
    logits = make_session(written).run(None, {"input_ids": np.zeros((1, 3), np.int64)})[0]
    assert logits.shape == (1, 3, 100) and np.all(np.isfinite(logits))

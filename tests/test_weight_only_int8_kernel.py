"""--weights-only int8 --kernel int8: DynamicQuantizeMatMul on the int8 weights against the dequantized form, and bad option pairs."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.cli import main
from graphprune.model_io import check_model
from graphprune.passes.quantize_weights import QuantizeWeightsPass
from graphprune.quantization import weight_only as wo
from graphprune.runtime import make_session
from graphprune.testing.fixtures_small import mlp


def _layer(op: str, k: int = 96, n: int = 40, seed: int = 0) -> onnx.ModelProto:
    """x [M, k] times one weight: MatMul [k, n], or Gemm with transB (weight [n, k]) and a bias."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k) if op == "Gemm" else (k, n)) / np.sqrt(k)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    if op == "Gemm":
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "c"))
        node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1)
    else:
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
@pytest.mark.parametrize("rows", [1, 128])
def test_int8_kernel_within_the_activation_rounding_bound_of_the_dequantized_form(op, rows):
    """Both forms hold the same int8 weights W (one scale per column); the int8 kernel's form also
    rounds x to uint8 per tensor at run time (step s = range(x, 0) / 255; the zero point's rounding
    can add one more half step), so each output may move by at most s * sum_k |W[k, n]| from x @ W:
    the documented bound.  The dequantized form, run unfused ("basic"), is x @ W itself."""
    model = _layer(op)
    x = np.random.default_rng(rows).standard_normal((rows, 96)).astype(np.float32)
    fast = QuantizeWeightsPass(bits=8, kernel="int8")(model)
    exact = QuantizeWeightsPass(bits=8, kernel="matmulnbits")(model)
    check_model(fast.model, full=True)
    assert [n.op_type for n in fast.model.graph.node] == ["DynamicQuantizeMatMul"] + (["Add"] if op == "Gemm" else [])
    inits = {t.name: numpy_helper.to_array(t) for t in fast.model.graph.initializer}
    w = inits["w_q8"].astype(np.float32) * inits["w_scale"]  # [K, N]: the Gemm's weight transposed
    w_exact = numpy_helper.to_array(next(t for t in exact.model.graph.initializer if t.name == "w_q8"))
    np.testing.assert_array_equal(inits["w_q8"], w_exact.T if op == "Gemm" else w_exact)  # the same int8 values
    got = make_session(fast.model).run(None, {"x": x})[0]
    want = make_session(exact.model, optimization="basic").run(None, {"x": x})[0]
    bias = inits.get("c", 0)
    np.testing.assert_allclose(want, x @ w + bias, rtol=1e-5, atol=1e-5)
    step = (max(float(x.max()), 0.0) - min(float(x.min()), 0.0)) / 255
    bound = step * np.abs(w).sum(axis=0)  # per output column
    assert np.all(np.abs(got - want) <= bound + 1e-5)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want - bias)
    assert 0 < rel < 0.02  # activations really rounded, by little (0.0126 at M = 128 on the LLM's FFN shape)


def test_int8_kernel_on_a_whole_model_close_to_the_dequantized_form():
    model = mlp(in_features=64, hidden=(96,), classes=10)
    feed = {"input": np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)}
    fast = QuantizeWeightsPass(bits=8, kernel="int8")(model)
    assert fast.stats["kernel"] == "int8" and fast.stats["formats"] == {"gemm int8": 2}
    exact = QuantizeWeightsPass(bits=8, kernel="matmulnbits")(model)
    got = make_session(fast.model).run(None, feed)[0]
    want = make_session(exact.model, optimization="basic").run(None, feed)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.03


def test_float16_weights_and_gemm_with_alpha_keep_the_dequantized_form():
    """DynamicQuantizeMatMul takes float32 activations and computes A @ B: others stay DequantizeLinear."""
    model = _layer("Gemm")
    model.graph.node[0].attribute.append(helper.make_attribute("alpha", 0.5))
    ops = [n.op_type for n in QuantizeWeightsPass(bits=8, kernel="int8")(model).model.graph.node]
    assert "DynamicQuantizeMatMul" not in ops and "DequantizeLinear" in ops


def test_a_runtime_without_dynamic_quantize_matmul_keeps_the_dequantized_form(monkeypatch):
    real = wo.runtime_has
    monkeypatch.setattr(wo, "runtime_has", lambda kind: kind != "DynamicQuantizeMatMul" and real(kind))
    ops = [n.op_type for n in QuantizeWeightsPass(bits=8, kernel="int8")(_layer("MatMul")).model.graph.node]
    assert ops == ["DequantizeLinear", "MatMul"]


@pytest.mark.parametrize("args, message", [
    (["--kernel", "int8"], "--kernel applies to --weights-only"),  # static int8 places its own kernels
    (["--weights-only", "int4", "--kernel", "int8", "--int4-kernel", "matmulnbits"], "disagree"),
    (["--weights-only", "int8", "--int4-kernel", "int8"], "use --kernel for int8"),
    (["--weights-only", "int4", "--kernel", "int8", "--algorithm", "gptq", "--data", "{data}"], "float block scales"),
])
def test_option_pairs_that_make_no_sense_exit_2_and_write_nothing(tmp_path, capsys, args, message):
    src, out, data = str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), str(tmp_path / "d.npz")
    onnx.save(_layer("MatMul"), src)
    np.savez(data, x=np.zeros((2, 96), np.float32))
    assert main(["quantize", src, "-o", out, *[a.replace("{data}", data) for a in args]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not os.path.exists(out)


def test_old_spelling_still_works(tmp_path, capsys):
    src, out = str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx")
    onnx.save(_layer("MatMul", k=64), src)
    assert main(["quantize", src, "-o", out, "--weights-only", "int4", "--int4-kernel", "int8"]) == 0
    assert "int8 kernel" in capsys.readouterr().out
    assert "DynamicQuantizeMatMul" in {n.op_type for n in onnx.load(out).graph.node}

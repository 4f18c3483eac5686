"""--kernel auto (int4 and int8): the probe's shape, the decision rule, and the written form follows the decision."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from graphprune.cli import main
from graphprune.model_io import check_model
from graphprune.passes.quantize_weights import QuantizeWeightsPass
from graphprune.quantization import kernel_choice as choice
from graphprune.quantization import weight_only as wo
from graphprune.testing.fixtures_small import mlp

_OPS = {"int8": "DynamicQuantizeMatMul", "matmulnbits": "MatMulNBits"}
# What each kernel's form of an int8 weight is in the written graph (DequantizeLinear: fused at load).
_OPS8 = {"int8": "DynamicQuantizeMatMul", "matmulnbits": "DequantizeLinear"}


def _fake_timing(monkeypatch, nbits, int8):
    """CPU ms per run at (1, 128) rows for each form, instead of timing them."""
    monkeypatch.setattr(choice, "_timed", lambda *args: {"matmulnbits": dict(zip(choice.ROWS, nbits)),
                                                         "int8": dict(zip(choice.ROWS, int8))})


def test_probe_shape_is_the_shape_holding_most_int4_values():
    shapes = [(1280, 3456)] * 2 + [(3456, 1280)] + [(1280, 1280)] * 8
    assert choice.probe_shape(shapes, 32) == (1280, 1280)  # 8 x 1.6M values beat 2 x 4.4M
    assert choice.probe_shape([(1280, 32000), (1280, 3456)], 32) == (1280, 4096)  # the LM head, N capped
    assert choice.probe_shape([(70, 8), (64, 8)], 32) == (64, 8)  # K = 70: not whole blocks, never the int8 form
    assert choice.probe_shape([(8192, 64)], 128) == (4096, 64)
    assert choice.probe_shape([], 32) == (1024, 1024)
    assert choice.probe_shape([(70, 8), (64, 8)]) == (70, 8)  # int8 (block 1): any K


@pytest.mark.parametrize("nbits, int8, expected", [
    ((0.19, 10.3), (0.27, 1.19), "int8"),  # this Xeon: 0.72x at 1 row, 8.6x at 128
    ((0.19, 1.20), (0.27, 1.19), "matmulnbits"),  # a CPU whose MatMulNBits keeps up with many rows
])
@pytest.mark.parametrize("bits", [4, 8])
def test_the_form_faster_on_the_geometric_mean_of_both_row_counts_wins(monkeypatch, nbits, int8, expected, bits):
    _fake_timing(monkeypatch, nbits, int8)
    kernel, detail = choice.choose_kernel(bits, 1280, 3456, 32)
    assert kernel == expected and "geometric mean" in detail["reason"] and detail["shape"] == [1280, 3456]
    assert choice.KERNEL_NAMES[bits] in detail["reason"]


def test_a_runtime_without_one_kernel_gets_the_other_untimed(monkeypatch):
    monkeypatch.setattr(choice, "_timed", lambda *args: pytest.fail("timed although one kernel is missing"))
    real = wo.runtime_has
    monkeypatch.setattr(wo, "runtime_has", lambda kind: kind != "DynamicQuantizeMatMul" and real(kind))
    assert choice.choose_kernel(4, 64, 64, 32)[0] == choice.choose_kernel(8, 64, 64)[0] == "matmulnbits"
    monkeypatch.setattr(wo, "runtime_has", lambda kind: kind != "MatMulNBits" and real(kind))
    assert choice.choose_kernel(4, 64, 64, 32)[0] == "int8"


@pytest.mark.parametrize("timing, kernel", [(((0.19, 10.3), (0.27, 1.19)), "dispatch"),  # this Xeon: they trade places
                                            (((0.29, 10.3), (0.27, 1.19)), "int8"),
                                            (((0.19, 1.20), (0.27, 1.19)), "matmulnbits")])
def test_the_pass_writes_the_form_auto_chose(monkeypatch, timing, kernel):
    _fake_timing(monkeypatch, *timing)
    model = mlp(in_features=64, hidden=(96,), classes=10)
    result = QuantizeWeightsPass(bits=4)(model)  # auto is the default
    check_model(result.model, full=True)
    ops = [n.op_type for n in result.model.graph.node]
    assert result.stats["kernel"] == result.stats["int4_kernel"] == kernel and "reason" in result.stats["kernel_choice"]
    if kernel == "dispatch":  # one If: MatMulNBits for one row, the int8 kernel for more
        branches = {a.name: [n.op_type for n in a.g.node] for a in result.model.graph.node[-1].attribute}
        assert ops[-1] == "If" and _OPS["matmulnbits"] in branches["then_branch"] and _OPS["int8"] in branches["else_branch"]
        return
    assert _OPS[kernel] in ops and not set(_OPS.values()) - {_OPS[kernel]} & set(ops)


def test_gptq_takes_matmulnbits_without_timing(monkeypatch):
    monkeypatch.setattr(choice, "_timed", lambda *args: pytest.fail("GPTQ needs no timing"))
    model = mlp(in_features=64, hidden=(96,), classes=10)
    data = [{"input": x} for x in np.random.default_rng(0).standard_normal((4, 8, 64)).astype(np.float32)]
    result = QuantizeWeightsPass(bits=4, algorithm="gptq", data=data)(model)
    assert result.stats["int4_kernel"] == "matmulnbits" and "GPTQ" in result.stats["int4_kernel_choice"]["reason"]


def test_the_probe_really_times_both_forms():
    """Unpatched, on a small layer: both forms built by the pass, run, and a positive CPU time each."""
    for bits in (4, 8):
        kernel, detail = choice.choose_kernel(bits, 128, 64, 32)
        assert kernel in _OPS and set(detail["cpu_ms"]) == {"int8", "matmulnbits"}
        assert all(t > 0 for by_rows in detail["cpu_ms"].values() for t in by_rows.values())


def test_cli_default_says_which_kernel_and_why(tmp_path, capsys, monkeypatch):
    _fake_timing(monkeypatch, (0.19, 10.3), (0.27, 1.19))
    src, out = str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx")
    onnx.save(mlp(in_features=64, hidden=(96,), classes=10), src)
    assert main(["quantize", src, "-o", out, "--weights-only", "int4"]) == 0
    printed = capsys.readouterr().out
    assert "(block 32, rtn, dispatch kernel)" in printed and "kernel dispatch (--kernel auto): timed" in printed
    assert os.path.exists(out)


def test_no_weight_in_whole_blocks_takes_matmulnbits_untimed(monkeypatch):
    """K = 70 is no whole number of blocks of 32: the int8 kernel's form could hold none of them."""
    monkeypatch.setattr(choice, "_timed", lambda *args: pytest.fail("timed although no weight fits the int8 form"))
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((70, 16)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 70])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], [w])
    result = QuantizeWeightsPass(bits=4)(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert result.stats["int4_kernel"] == "matmulnbits" and "whole number of blocks" in result.stats["int4_kernel_choice"]["reason"]


@pytest.mark.parametrize("timing, kernel", [(((0.19, 10.3), (0.27, 1.19)), "int8"),
                                            (((0.19, 1.20), (0.27, 1.19)), "matmulnbits")])
def test_int8_auto_writes_the_form_it_chose_and_records_why(monkeypatch, timing, kernel):
    _fake_timing(monkeypatch, *timing)
    model = mlp(in_features=64, hidden=(96,), classes=10)
    result = QuantizeWeightsPass(bits=8)(model)  # auto is the default for int8 too
    check_model(result.model, full=True)
    ops = [n.op_type for n in result.model.graph.node]
    assert result.stats["kernel"] == kernel and "int4_kernel" not in result.stats
    assert result.stats["kernel_choice"]["reason"].startswith("timed on one [64, 96] layer: int8 form")
    assert ops.count(_OPS8[kernel]) == 2 and _OPS8["int8" if kernel == "matmulnbits" else "matmulnbits"] not in ops


def test_int8_without_matmul_weights_or_folded_is_not_timed(monkeypatch):
    """A Conv-only model has nothing either kernel reads; the static fallback (folded) dequantizes at load."""
    from tests.helpers import conv_model

    monkeypatch.setattr(choice, "_timed", lambda *args: pytest.fail("timed although no kernel reads a weight"))
    result = QuantizeWeightsPass(bits=8)(conv_model(width=4))  # fc too small to pay: the conv weight alone
    assert result.stats["kernel"] == "matmulnbits" and "kernel_choice" not in result.stats
    folded = QuantizeWeightsPass(bits=8, folded=True)(mlp(in_features=64, hidden=(96,), classes=10))
    assert folded.stats["kernel"] is None and "DynamicQuantizeMatMul" not in {n.op_type for n in folded.model.graph.node}


def test_cli_int8_default_says_which_kernel_and_why(tmp_path, capsys, monkeypatch):
    _fake_timing(monkeypatch, (0.19, 10.3), (0.27, 1.19))
    src, out = str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx")
    onnx.save(mlp(in_features=64, hidden=(96,), classes=10), src)
    assert main(["quantize", src, "-o", out, "--weights-only", "int8", "--report", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "(per channel, int8 kernel)" in printed and "kernel int8 (--kernel auto): timed" in printed
    import json

    report = json.load(open(tmp_path / "r.json"))
    assert report["kernel"] == "int8" and "DequantizeLinear" in report["kernel_choice"]["reason"]

"""``graphprune quantize --weights-only``: external data, the int8 fallback of static quantization, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

from graphprune.cli import main
from graphprune.model_io import check_model
from graphprune.runtime import make_session
from graphprune.testing.fixtures_transformer import bert_encoder
from tests.helpers import conv_model


def _code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's usage errors
        return int(exc.code)


def _bert():
    return bert_encoder(layers=1, hidden=64, heads=4, ffn=128, vocab=100)


def _ids(n=2, seq=10, seed=0):
    return np.random.default_rng(seed).integers(0, 100, (n, seq)).astype(np.int64)


def _outputs(path, feed):
    return make_session(onnx.load(path)).run(None, feed)


def test_int4_from_external_data_matches_the_inline_run(tmp_path, capsys):
    model = _bert()
    inline = str(tmp_path / "inline.onnx")
    onnx.save(model, inline)
    external = str(tmp_path / "ext" / "model.onnx")
    os.makedirs(os.path.dirname(external))
    onnx.save_model(model, external, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=256)
    data_before = open(external + ".data", "rb").read()
    out_a, out_b, report = (str(tmp_path / n) for n in ("a.onnx", "b.onnx", "r.json"))
    pinned = ["--int4-kernel", "matmulnbits"]  # the default, auto, times both kernels (test_int4_kernel_choice)
    assert main(["quantize", inline, "-o", out_a, "--weights-only", "int4", *pinned]) == 0
    assert main(["quantize", external, "-o", out_b, "--weights-only", "int4", "--block-size", "32",
                 "--report", report, *pinned]) == 0
    printed = capsys.readouterr().out
    assert "weight-only int4 (block 32, rtn, matmulnbits kernel)" in printed and "wrote" in printed
    feed = {"input_ids": _ids()}
    for a, b in zip(_outputs(out_a, feed), _outputs(out_b, feed)):
        np.testing.assert_array_equal(a, b)
    check_model(onnx.load(out_b), full=True)
    assert open(external + ".data", "rb").read() == data_before  # the input is never touched
    # weights on disk in, weights on disk out (the runtime maps them); inline in, inline out
    assert os.path.exists(out_b + ".data") and not os.path.exists(out_a + ".data")
    assert os.path.getsize(out_b) + os.path.getsize(out_b + ".data") < 0.25 * os.path.getsize(inline)
    stats = json.load(open(report))
    assert stats["bits"] == 4 and stats["formats"]["matmul int4"] == 6


def test_int8_weights_only_cli(tmp_path):
    src = str(tmp_path / "m.onnx")
    onnx.save(_bert(), src)
    out = str(tmp_path / "q.onnx")
    assert main(["quantize", src, "-o", out, "--weights-only", "int8"]) == 0
    assert os.path.getsize(out) < 0.4 * os.path.getsize(src)  # biases and norms stay float
    feed = {"input_ids": _ids()}
    for got, want in zip(_outputs(out, feed), _outputs(src, feed)):
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05  # ORT runs it with int8 activations (fused)


@pytest.mark.parametrize("algorithm, external", [("awq", False), ("gptq", True)])
def test_data_aware_cli(tmp_path, monkeypatch, algorithm, external):
    src, data, out = str(tmp_path / "m.onnx"), str(tmp_path / "d.npz"), str(tmp_path / "q.onnx")
    if external:  # the runtime reads the weights left on disk from the model's folder, not the cwd
        onnx.save_model(_bert(), src, save_as_external_data=True, location="m.onnx.data", size_threshold=256)
        monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    else:
        onnx.save(_bert(), src)
    np.savez(data, input_ids=_ids(8, 10, seed=3))
    assert main(["quantize", src, "-o", out, "--weights-only", "int4", "--algorithm", algorithm, "--data", data]) == 0
    check_model(onnx.load(out), full=True)


def _paddle_like_cnn(seed=0):
    """x[1,3,16,16] -> Conv 3x3 (32) -> BN -> Relu -> depthwise Conv 3x3 -> BN -> Relu -> Conv 1x1 (64)
    -> BN -> Relu -> GlobalAveragePool -> Flatten -> MatMul (10), every weight a Constant node, opset 11:
    the form of PP-OCR's Paddle exports."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    arrays, nodes, x = {}, [], "x"
    for i, (shape, group) in enumerate([((32, 3, 3, 3), 1), ((32, 1, 3, 3), 32), ((64, 32, 1, 1), 1)]):
        c = shape[0]
        arrays[f"w{i}"] = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
        for name, value in [("scale", rng.uniform(0.5, 1.5, c)), ("beta", rng.normal(0, 0.1, c)),
                            ("mean", rng.normal(0, 0.1, c)), ("var", rng.uniform(0.5, 1.5, c))]:
            arrays[f"bn{i}_{name}"] = value.astype(np.float32)
        pads = [1, 1, 1, 1] if shape[-1] == 3 else [0, 0, 0, 0]
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], group=group, pads=pads),
                  helper.make_node("BatchNormalization", [f"c{i}"] + [f"bn{i}_{n}" for n in ("scale", "beta", "mean", "var")],
                                   [f"n{i}"]),
                  helper.make_node("Relu", [f"n{i}"], [f"r{i}"])]
        x = f"r{i}"
    arrays["fc"] = (rng.standard_normal((64, 10)) / 8).astype(np.float32)
    nodes += [helper.make_node("GlobalAveragePool", [x], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("MatMul", ["f", "fc"], ["y"])]
    consts = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k)) for k, v in arrays.items()]
    graph = helper.make_graph(consts + nodes, "paddle_like",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    return model


def _optimized_ops(path, tmp_path):
    """The op types of the graph ONNX Runtime runs (its optimized model), in order."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / (os.path.basename(path) + ".optimized.onnx"))
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return [(n.domain, n.op_type) for n in onnx.load(options.optimized_model_filepath).graph.node]


def test_static_quantize_falls_back_to_int8_weight_storage(tmp_path, capsys, monkeypatch):
    """Forces 'int8 pays nowhere' (the planner chooses no placement): BatchNormalization is folded,
    every weight stored in int8 (Constant nodes included), the file ~4x smaller, and ONNX Runtime
    folds the dequantization at load, so it runs the float model's graph."""
    import importlib

    insert_qdq = importlib.import_module("graphprune.passes.insert_qdq")  # the module, not the function
    monkeypatch.setattr(insert_qdq._Planner, "choose", lambda self, candidates: (None, {}))
    src, out, report = str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), str(tmp_path / "r.json")
    onnx.save(_paddle_like_cnn(), src)
    assert main(["quantize", src, "-o", out, "--no-measure", "--report", report]) == 0
    printed = capsys.readouterr().out
    assert "int8 does not make this model faster" in printed
    assert "falling back to int8 weight-only storage" in printed and "float model's speed" in printed
    assert "3 BatchNormalization folded" in printed
    written = onnx.load(out)
    check_model(written, full=True)
    ops = {n.op_type for n in written.graph.node}
    assert not ops & {"BatchNormalization", "Constant", "QuantizeLinear", "DequantizeLinear"}
    assert os.path.getsize(out) < 0.28 * os.path.getsize(src)  # 18.8 KB -> 5.2 KB: 3,840 weights, 138 scales, 128 biases
    # the 3 conv scales and the 3 biases packed by shape into two float16 tensors, a Cast and a Split each
    halves = [t for t in written.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert sorted(list(t.dims) for t in halves) == [[128], [128, 1, 1, 1]]
    assert sum(n.op_type == "Cast" for n in written.graph.node) == 4 + 2
    assert sum(n.op_type == "Split" for n in written.graph.node) == 2
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    got, want = _outputs(out, x)[0], _outputs(src, x)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02
    fallback = json.load(open(report))["fallback"]
    assert fallback["formats"] == {"conv int8": 3, "matmul int8": 1} and fallback["batchnorms_folded"] == 3
    assert fallback["compacted"]["float16_constants"] == 6 and fallback["compacted"]["default_attributes"] == 3
    assert fallback["compacted"]["packed_constants"] == 6
    assert _optimized_ops(out, tmp_path) == _optimized_ops(src, tmp_path)  # Cast and Mul folded at load


@pytest.mark.parametrize("args, message", [
    (["--weights-only", "int4"], "no MatMul/Gemm weight"),
    (["--weights-only", "int4", "--block-size", "48"], "--block-size 48"),
    (["--weights-only", "int4", "--block-size", "512"], "--block-size 512"),
    (["--weights-only", "int8", "--block-size", "64"], "applies to --weights-only int4"),
    (["--weights-only", "int4", "--algorithm", "gptq"], "needs calibration data"),
    (["--weights-only", "int8", "--max-error", "0.1"], "applies to static int8"),
    (["--algorithm", "awq"], "applies to --weights-only int4"),
    (["--int4-kernel", "int8"], "applies to --weights-only int4"),
    (["--weights-only", "int8", "--int4-kernel", "int8"], "applies to --weights-only int4"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    src, out = str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx")
    onnx.save(conv_model(width=4), src)  # fc too small to pay: no MatMul/Gemm weight for int4
    assert _code(["quantize", src, "-o", out, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_calibration_data_not_matching_the_inputs(tmp_path, capsys):
    src, data, out = str(tmp_path / "m.onnx"), str(tmp_path / "d.npz"), str(tmp_path / "q.onnx")
    onnx.save(_bert(), src)
    np.savez(data, tokens=_ids())  # wrong name
    assert _code(["quantize", src, "-o", out, "--weights-only", "int4", "--algorithm", "gptq", "--data", data]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "input_ids" in err[0]
    np.savez(data, input_ids=np.zeros((4, 3, 2), np.int64))  # wrong rank
    assert _code(["quantize", src, "-o", out, "--weights-only", "int4", "--algorithm", "awq", "--data", data]) == 2
    assert not os.path.exists(out)


def test_int4_for_the_int8_kernel_cli(tmp_path, capsys):
    src, out = str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx")
    onnx.save(_bert(), src)
    assert main(["quantize", src, "-o", out, "--weights-only", "int4", "--int4-kernel", "int8"]) == 0
    assert "(block 32, rtn, int8 kernel)" in capsys.readouterr().out
    written = onnx.load(out)
    check_model(written, full=True)
    assert sum(n.op_type == "DynamicQuantizeMatMul" for n in written.graph.node) == 8  # 6 MatMuls, 2 Gemms
    got, want = _outputs(out, {"input_ids": _ids()})[0], _outputs(src, {"input_ids": _ids()})[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.6  # int4 on seeded random weights

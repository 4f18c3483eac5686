"""``graphprune quantize`` and the quantize recipes: success, report, and every bad input -> exit 2, no output."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from graphprune.cli import main
from graphprune.model_io import check_model
from graphprune.passes.base import registered_passes
from graphprune.passes.insert_qdq import insert_qdq
from tests.test_quantize_pass import dense_cnn, samples


def _exit_code(argv) -> int:
    """``main``'s return code, or argparse's exit code for usage errors (it exits before main returns)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


@pytest.fixture
def files(tmp_path):
    model = dense_cnn()
    model_path = str(tmp_path / "m.onnx")
    onnx.save(model, model_path)
    data_path = str(tmp_path / "d.npz")
    np.savez(data_path, x=samples(model).arrays["x"])
    return model, model_path, data_path, tmp_path


def test_quantize_writes_checked_model_and_report(files, capsys):
    _, model_path, data_path, tmp = files
    out, report = str(tmp / "q.onnx"), str(tmp / "r.json")
    code = main(["quantize", model_path, "-o", out, "--data", data_path, "--no-measure", "--exclude", "c3",
                 "--report", report])
    assert code == 0
    q = onnx.load(out)
    check_model(q, full=True)
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    printed = capsys.readouterr().out
    assert "chosen: cost-model" in printed and "layers kept float" in printed and "c3" in printed
    stats = json.load(open(report))
    assert "c3" in stats["float_layers"] and stats["calibration"]["from_data"] is True


def test_quantize_measures_against_float(files, capsys):
    _, model_path, data_path, tmp = files
    out = str(tmp / "q.onnx")
    assert main(["quantize", model_path, "-o", out, "--data", data_path, "--max-error", "0.05"]) == 0
    printed = capsys.readouterr().out
    assert "CPU time per run (1 thread, median of interleaved runs): float" in printed
    check_model(onnx.load(out), full=True)


def test_run_recipe_quantize(files, capsys):
    _, model_path, data_path, tmp = files
    out = str(tmp / "q.onnx")
    assert main(["run", model_path, "-o", out, "--recipe", "quantize", "--data", data_path]) == 0
    check_model(onnx.load(out), full=True)


@pytest.mark.skipif("prune" not in registered_passes(), reason="the prune pass has not landed")
def test_run_recipe_prune_quantize(files, capsys):
    _, model_path, data_path, tmp = files
    out = str(tmp / "pq.onnx")
    assert main(["run", model_path, "-o", out, "--recipe", "prune-quantize", "--data", data_path]) == 0
    check_model(onnx.load(out), full=True)


def _bad_data(tmp, name, **arrays):
    path = str(tmp / f"{name}.npz")
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-error", "0"], "max_error must be > 0"),
        (["--max-error", "-1"], "max_error must be > 0"),
        (["--max-error", "abc"], "is not a number"),
        (["--method", "kl"], "invalid choice: 'kl'"),
        (["--activation-type", "fp16"], "invalid choice: 'fp16'"),
        (["--exclude", "no_such_node"], "'no_such_node' is not in the model"),
        (["--op-types", "Softmax"], "cannot be quantized"),
        (["--calibration-samples", "0"], "calibration_samples must be at least 1"),
    ],
)
def test_bad_arguments_exit_2_without_output(files, capsys, extra, message):
    _, model_path, data_path, tmp = files
    out = tmp / "q.onnx"
    code = _exit_code(["quantize", model_path, "-o", str(out), "--data", data_path, "--no-measure"] + extra)
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_data_exit_2_without_output(files, capsys):
    _, model_path, _, tmp = files
    out = tmp / "q.onnx"
    cases = [
        (_bad_data(tmp, "names", images=np.zeros((2, 16, 16, 16), np.float32)), "no array for model input 'x'"),
        (_bad_data(tmp, "shape", x=np.zeros((2, 16, 8, 8), np.float32)), "the model expects [1, 16, 16, 16]"),
        (_bad_data(tmp, "rank", x=np.zeros((16, 16, 16), np.float32)), "rank 3"),
    ]
    for path, message in cases:
        assert main(["quantize", model_path, "-o", str(out), "--data", path, "--no-measure"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not out.exists()


def test_max_error_without_data_and_quantized_input_exit_2(files, capsys):
    model, model_path, data_path, tmp = files
    out = tmp / "q.onnx"
    assert main(["quantize", model_path, "-o", str(out), "--max-error", "0.1"]) == 2
    assert "--max-error needs --data" in capsys.readouterr().err
    quantized = str(tmp / "already.onnx")
    onnx.save(insert_qdq(model, data=samples(model), measure=False), quantized)
    assert main(["quantize", quantized, "-o", str(out), "--data", data_path]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert not out.exists()


def test_refuses_to_overwrite_input(files, capsys):
    _, model_path, data_path, _ = files
    before = open(model_path, "rb").read()
    assert main(["quantize", model_path, "-o", model_path, "--data", data_path, "--no-measure"]) == 2
    assert "refusing to overwrite the input model" in capsys.readouterr().err
    assert open(model_path, "rb").read() == before


def test_dynamic_input_needs_input_shape_without_data(tmp_path, capsys):
    from tests.test_quantize_pass import matmul_net

    model = matmul_net()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "seq"
    path, out = str(tmp_path / "mm.onnx"), tmp_path / "q.onnx"
    onnx.save(model, path)
    assert main(["quantize", path, "-o", str(out), "--no-measure"]) == 2
    assert "dynamic dims" in capsys.readouterr().err and not out.exists()
    assert main(["quantize", path, "-o", str(out), "--no-measure", "--input-shape", "x=1x16x64"]) == 0
    captured = capsys.readouterr()
    assert "warning: quantizing without calibration data" in captured.err
    check_model(onnx.load(str(out)), full=True)

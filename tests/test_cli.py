"""The command line: inspect, validate, run; exit codes and one-line errors; nothing half-written."""

import json
import os

import numpy as np
import pytest

from graphprune.cli import main
from graphprune.model_io import load
from tests.helpers import conv_model, save_model


@pytest.fixture
def model_path(tmp_path):
    return save_model(conv_model(), tmp_path / "m.onnx")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line naming the problem
    return err[0]


def test_inspect_prints_ops_params_and_macs(model_path, capsys):
    assert main(["inspect", model_path, "--input-shape", "x=1x3x8x8"]) == 0
    out = capsys.readouterr().out
    assert "params: 132" in out and "MACs: 6,932" in out and "Conv 1" in out
    assert main(["inspect", model_path, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["inputs"] == {"x": ["N", 3, 8, 8]} and stats["macs"] is None


def test_validate_writes_a_json_report(model_path, tmp_path, capsys):
    report = tmp_path / "r.json"
    code = main(["validate", model_path, model_path, "--input-shape", "x=2x3x8x8", "--runs", "3", "--report", str(report)])
    assert code == 0
    assert "max abs diff" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["outputs"][0]["rel_l2"] == 0.0 and data["before"]["params"] == 132


def test_validate_with_data_and_labels(model_path, tmp_path, capsys):
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.ones((4, 3, 8, 8), np.float32), labels=np.zeros(4, np.int64))
    assert main(["validate", model_path, model_path, "--data", str(npz), "--labels", "labels", "--runs", "2"]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_run_with_recipe_and_pass_options(tmp_path, capsys):
    src = save_model(conv_model(constant_weights=True), tmp_path / "c.onnx")
    out = tmp_path / "out.onnx"
    recipe = os.path.join(os.path.dirname(__file__), "..", "passes", "canonicalize.yaml")
    assert main(["run", src, "-o", str(out), "--recipe", recipe, "--pass", "canonicalize:fold=false"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert not [n for n in load(out).graph.node if n.op_type == "Constant"]
    assert main(["run", src, "-o", str(tmp_path / "o2.onnx"), "--recipe", "canonicalize"]) == 0


def _bad(tmp_path, model_path):
    notonnx = tmp_path / "text.onnx"
    notonnx.write_text("hello")
    data = conv_model().SerializeToString()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) - 40])
    invalid_model = conv_model()
    invalid_model.graph.node[0].op_type = "NoSuchOp"
    invalid = save_model(invalid_model, tmp_path / "invalid.onnx")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.ones((2, 4, 8, 8), np.float32))
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("passes: nope\n")
    out = str(tmp_path / "out.onnx")
    return [
        (["inspect", str(tmp_path / "missing.onnx")], "missing.onnx: no such file"),
        (["inspect", str(notonnx)], "not an ONNX model"),
        (["inspect", str(cut)], "cut.onnx"),
        (["inspect", invalid], "invalid ONNX graph"),
        (["validate", model_path, model_path], "dynamic dims"),
        (["validate", model_path, model_path, "--data", str(wrong)], "the model expects"),
        (["validate", model_path, model_path, "--input-shape", "x=1xAx8"], "--input-shape"),
        (["validate", model_path, model_path, "--report", str(tmp_path / "no" / "r.json")], "output directory does not exist"),
        (["validate", model_path, model_path, "--report", model_path], "same file as the original"),
        (["run", model_path, "-o", out], "nothing to run"),
        (["run", model_path, "-o", out, "--pass", "nope"], "unknown pass 'nope'"),
        (["run", model_path, "-o", out, "--pass", "canonicalize:bogus=1"], "no argument 'bogus'"),
        (["run", model_path, "-o", out, "--recipe", str(recipe)], "non-empty 'passes:' list"),
        (["run", model_path, "-o", model_path, "--pass", "canonicalize"], "refusing to overwrite the input"),
        (["run", str(notonnx), "-o", out, "--pass", "canonicalize"], "not an ONNX model"),
        (["run", model_path, "-o", str(tmp_path / "no" / "dir.onnx"), "--pass", "canonicalize"], "output directory does not exist"),
    ]


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, model_path, capsys):
    before = open(model_path, "rb").read()
    for argv, message in _bad(tmp_path, model_path):
        listing = sorted(os.listdir(tmp_path))
        assert main(argv) == 2, argv
        line = _error_line(capsys)
        assert message in line, (argv, line)
        assert sorted(os.listdir(tmp_path)) == listing, argv
    assert open(model_path, "rb").read() == before


def test_usage_errors_exit_2_on_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["validate"])
    assert exc.value.code == 2
    assert "the following arguments are required" in _error_line(capsys)


def test_internal_errors_exit_1(model_path, monkeypatch, capsys):
    import graphprune.cli.inspect_cmd as inspect_cmd

    def broken(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(inspect_cmd, "model_stats", broken)
    assert main(["inspect", model_path]) == 1
    assert "internal error: RuntimeError: bug" in _error_line(capsys)


def test_every_command_has_help(capsys):
    from graphprune.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"inspect", "validate", "run", "demo"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert "usage: graphprune " + name in capsys.readouterr().out

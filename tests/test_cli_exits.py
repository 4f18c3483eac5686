"""How commands end when they cannot do what was asked: a closed output pipe ends quietly, and a
prune that was asked for a ratio but can prune nothing exits 2 with the reasons and writes nothing."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import onnx
import pytest
from onnx import helper

from graphprune.cli import main
from tests.test_dependency import make_model, w

DIGITS = "models/digits_cnn.onnx"


class _ClosedPipe(io.StringIO):
    """A stdout whose reader has gone: every write raises as a closed pipe does."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("argv", [
    ["inspect", DIGITS],
    ["inspect", DIGITS, "--groups"],
    ["validate", DIGITS, DIGITS, "--input-shape", "images=1x1x8x8"],
])
def test_a_closed_stdout_ends_quietly_with_141(argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(argv) == 141
    assert capsys.readouterr().err == ""


def test_inspect_piped_into_a_reader_that_left_ends_quietly():
    # the reader closes before the command writes: what `graphprune inspect M | head -1` does to long output
    script = "from graphprune.cli import entry_point; entry_point()"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", script, "inspect", DIGITS, "--groups"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 141
    assert err == ""


@pytest.fixture
def unprunable(tmp_path):
    """A single Conv between the graph input and output: both of its groups are blocked."""
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], [("x", [1, 3, 4, 4])],
                       [("y", [1, 2, 2, 2])], {"w": w(2, 3, 3, 3)})
    path = tmp_path / "in.onnx"
    onnx.save(model, str(path))
    return str(path)


@pytest.mark.parametrize("ratio", [["--ratio", "0.5"], ["--heads-ratio", "0.5"], ["--ffn-ratio", "0.3"]])
def test_prune_with_nothing_prunable_exits_2_naming_blocked_kinds(unprunable, ratio, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["prune", unprunable, "-o", str(out), *ratio]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("graphprune prune: error: nothing pruned (graphprune inspect MODEL --groups lists why):")
    assert "blocked: channels x2 (first: graph output y)" in err
    assert not out.exists() and "wrote" not in captured.out


def test_prune_heads_ratio_on_a_cnn_exits_2_saying_the_kind_is_missing(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["prune", DIGITS, "-o", str(out), "--heads-ratio", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "no prunable group of the kinds asked for (prunable: channels x3)" in err
    assert "heads ratio 0.5 unused: the model has no prunable heads groups" in err
    assert not out.exists()


def test_prune_ratio_that_rounds_to_no_channel_exits_2(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["prune", DIGITS, "-o", str(out), "--ratio", "0.01"]) == 2
    assert "the ratio rounds to no channel in any group" in capsys.readouterr().err
    assert not out.exists()


def test_prune_ratio_0_still_writes_the_model_unchanged(unprunable, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["prune", unprunable, "-o", str(out), "--ratio", "0"]) == 0
    assert "ratio 0: nothing to prune" in capsys.readouterr().out
    assert onnx.load(str(out)).graph == onnx.load(unprunable).graph


def test_prune_that_prunes_something_still_exits_0(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["prune", DIGITS, "-o", str(out), "--ratio", "0.5"]) == 0
    assert out.exists() and "channels removed" in capsys.readouterr().out

"""``graphprune finetune``: success path, every bad input (exit 2, one line, nothing written), gradual pruning."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from graphprune.cli import main
from graphprune.passes.base import registered_passes
from graphprune.recipes import RECIPE_DIR, load_recipe
from graphprune.runtime import make_session
from graphprune.training.gradual import gradual_prune_specs, round_ratios
from tests.test_finetune_support import DIGITS, MODELS, no_weight_model


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """200 training digits with good labels and several bad label arrays."""
    with np.load(os.path.join(MODELS, "digits_train.npz")) as npz:
        images, labels = npz["images"][:200], npz["labels"][:200]
    path = tmp_path_factory.mktemp("data") / "train.npz"
    np.savez(path, images=images, labels=labels, short=labels[:150], flags=labels > 4,
             big=labels + 10, onehot=np.eye(10, dtype=np.float32)[labels][:, :7])
    return str(path)


def _fails(capsys, argv, message, output):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0], err
    assert not os.path.exists(output)


def test_finetune_writes_a_checked_model_and_leaves_the_input_alone(tmp_path, data_file, capsys):
    out = tmp_path / "ft.onnx"
    before = open(DIGITS, "rb").read()
    code = main(["finetune", DIGITS, "-o", str(out), "--data", data_file, "--labels", "labels",
                 "--teacher", DIGITS, "--epochs", "2", "--batch-size", "16", "--lr", "2e-3", "--val-split", "0.2",
                 "--providers", "CPUExecutionProvider"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "0.5 x ce on labels + 0.5 x kl distillation, T=2" in printed and f"wrote {out}" in printed
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    make_session(model).run(None, {"images": np.zeros((3, 1, 8, 8), np.float32)})
    assert open(DIGITS, "rb").read() == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--labels", "short"], "labels: 150 labels for 200 samples"),
        (["--labels", "flags"], "labels have dtype bool"),
        (["--labels", "big"], "labels range over [10, 19]"),
        (["--labels", "onehot"], "float targets of shape [200, 7] do not fit output 'logits'"),
        (["--labels", "nothere"], "no array named 'nothere'"),
        (["--labels", "labels", "--optimizer", "sgd", "--lr", "1e30"], "fine-tuning stopped: the loss became"),
        (["--labels", "labels", "--epochs", "-1"], "--epochs must be >= 0"),
        (["--labels", "labels", "--lr", "0"], "--lr must be positive"),
        (["--labels", "labels", "--val-split", "1"], "--val-split 1.0 is outside"),
        (["--labels", "labels", "--distill-weight", "2"], "--distill-weight 2.0 is outside"),
        (["--labels", "labels", "--steps", "2"], "--steps needs --prune-ratio"),
        (["--teacher", DIGITS, "--distill-loss", "bce"], "does not come from a Sigmoid"),
        (["--labels", "labels", "--providers", "NoSuchExecutionProvider"], "--providers: NoSuchExecutionProvider not in"),
        ([], "give --labels KEY, --teacher ORIGINAL.onnx, or both"),
    ],
)
def test_bad_arguments_exit_2_without_output(tmp_path, data_file, capsys, extra, message):
    out = str(tmp_path / "out.onnx")
    _fails(capsys, ["finetune", DIGITS, "-o", out, "--data", data_file, *extra], message, out)


def test_data_that_does_not_match_the_inputs(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((10, 1, 7, 7), np.float32), labels=np.zeros(10, np.int64))
    out = str(tmp_path / "out.onnx")
    _fails(capsys, ["finetune", DIGITS, "-o", out, "--data", str(bad), "--labels", "labels"],
           "input 'images' has shape [10, 1, 7, 7]", out)


def test_model_without_trainable_weights(tmp_path, capsys):
    model_path = tmp_path / "plain.onnx"
    onnx.save(no_weight_model(), str(model_path))
    data = tmp_path / "x.npz"
    np.savez(data, x=np.ones((16, 4), np.float32), labels=np.zeros(16, np.int64))
    out = str(tmp_path / "out.onnx")
    _fails(capsys, ["finetune", str(model_path), "-o", out, "--data", str(data), "--labels", "labels"],
           "no trainable weights", out)


def test_teacher_with_other_inputs_and_output_over_input(tmp_path, data_file, capsys):
    other = tmp_path / "other.onnx"
    onnx.save(no_weight_model(), str(other))
    out = str(tmp_path / "out.onnx")
    _fails(capsys, ["finetune", DIGITS, "-o", out, "--data", data_file, "--teacher", str(other)],
           "data (for the teacher): no samples for model input 'x'", out)
    copy = tmp_path / "model.onnx"
    copy.write_bytes(open(DIGITS, "rb").read())
    code = main(["finetune", str(copy), "-o", str(copy), "--data", data_file, "--labels", "labels"])
    assert code == 2 and "refusing to overwrite the input model" in capsys.readouterr().err
    assert copy.read_bytes() == open(DIGITS, "rb").read()


def test_round_ratios_compose_to_the_target():
    for ratio, steps in ((0.5, 1), (0.5, 2), (0.75, 3)):
        rounds = round_ratios(ratio, steps)
        assert len(rounds) == steps
        assert np.prod([1 - r for r in rounds]) == pytest.approx(1 - ratio)
    specs = gradual_prune_specs(0.5, 2, finetune_args={"epochs": 3}, quantize_args={})
    assert [name for name, _ in specs] == ["prune", "finetune", "prune", "finetune", "quantize"]
    assert specs[1][1] == {"epochs": 3}


def test_bundled_recipe_is_the_gradual_schedule():
    specs = [s for s in load_recipe(os.path.join(RECIPE_DIR, "prune-finetune-quantize.yaml")) if s[0] != "canonicalize"]
    expected = gradual_prune_specs(0.5, 2, quantize_args={})
    assert [name for name, _ in specs] == [name for name, _ in expected]
    for (_, got), (name, want) in zip(specs, expected):
        if name == "prune":
            assert got["ratio"] == pytest.approx(want["ratio"], abs=1e-4)
        if name == "finetune":
            assert got["teacher"] == "models/digits_cnn.onnx" and got["labels"] == "models/digits_train.npz:labels"


@pytest.mark.skipif("prune" not in registered_passes(), reason="the prune pass is not in this checkout")
def test_gradual_pruning_from_the_cli(tmp_path, data_file, capsys):
    out = tmp_path / "gradual.onnx"
    code = main(["finetune", DIGITS, "-o", str(out), "--data", data_file, "--labels", "labels",
                 "--prune-ratio", "0.5", "--steps", "2", "--epochs", "2", "--stats"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert printed.count('"pass": "prune"') == 2 and printed.count('"pass": "finetune"') == 2
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    original = onnx.load(DIGITS)
    conv = lambda m: {i.name: i.dims[0] for i in m.graph.initializer if i.name.endswith("conv2.weight")}  # noqa: E731
    assert conv(model)["conv2.weight"] <= 0.55 * conv(original)["conv2.weight"]


def _digits_with(edit) -> onnx.ModelProto:
    model = onnx.load(DIGITS)
    edit(model)
    return model


def _det_on_path(model: onnx.ModelProto) -> None:
    """logits -> Det-free detour through an op without a gradient rule (Det of a [N,10,10] outer product)."""
    graph = model.graph
    logits = graph.output[0].name
    graph.node.extend([
        onnx.helper.make_node("Unsqueeze", [logits + "_pre", "gp_ax2"], ["gp_col"], name="gp_unsq"),
        onnx.helper.make_node("Mul", ["gp_col", "gp_eye"], ["gp_diag"], name="gp_mul"),
        onnx.helper.make_node("Det", ["gp_diag"], ["gp_det"], name="the_det"),
        onnx.helper.make_node("Unsqueeze", ["gp_det", "gp_ax1"], ["gp_det1"], name="gp_unsq2"),
        onnx.helper.make_node("Add", [logits + "_pre", "gp_det1"], [logits], name="gp_add"),
    ])
    for node in graph.node[:-5]:
        for i, out in enumerate(node.output):
            if out == logits:
                node.output[i] = logits + "_pre"
    graph.initializer.extend([onnx.numpy_helper.from_array(np.array([2], np.int64), "gp_ax2"),
                              onnx.numpy_helper.from_array(np.array([1], np.int64), "gp_ax1"),
                              onnx.numpy_helper.from_array(np.eye(10, dtype=np.float32), "gp_eye")])


@pytest.mark.parametrize("edit, message", [
    (_det_on_path, "op Det (node 'the_det') has no gradient rule"),
    (lambda m: m.opset_import[0].__setattr__("version", 99), "opset 99"),
])
def test_models_that_cannot_train_exit_2_naming_the_problem(tmp_path, data_file, capsys, edit, message):
    path = tmp_path / "model.onnx"
    onnx.save(_digits_with(edit), str(path))
    before = path.read_bytes()
    out = str(tmp_path / "out.onnx")
    _fails(capsys, ["finetune", str(path), "-o", out, "--data", data_file, "--labels", "labels",
                    "--teacher", DIGITS, "--epochs", "1"], message, out)
    assert path.read_bytes() == before

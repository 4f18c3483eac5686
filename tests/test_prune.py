"""The prune pass and CLI: no-op, remove vs mask, shapes, metadata, options and bad input."""

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphprune.cli import main
from graphprune.errors import UserError
from graphprune.passes import PruneChannelsPass, prune_channels
from graphprune.pruning import PRUNED_CHANNELS_KEY, pruned_channels
from graphprune.runtime import make_session, run
from graphprune.validate import compare_outputs
from tests.test_dependency import conv, make_model, w

DIGITS = "models/digits_cnn.onnx"


def outputs(model, feed):
    return run(make_session(model), feed)


def assert_same_outputs(a, b, feed, tol=1e-4):
    out_a, out_b = outputs(a, feed), outputs(b, feed)
    for name in out_a:
        assert compare_outputs(name, out_a[name], out_b[name]).rel_l2 <= tol


def _cnn(batch="N"):
    """conv -> BN -> relu -> residual Add -> flatten -> gemm, dynamic batch."""
    nodes = [
        conv("x", "c1", "w1", "b1"),
        helper.make_node("BatchNormalization", ["c1", "s", "bb", "m", "v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        conv("r", "c2", "w2"),
        helper.make_node("Add", ["c2", "r"], ["res"]),
        helper.make_node("MaxPool", ["res"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ]
    inits = {
        "w1": w(8, 3, 3, 3), "b1": w(8), "s": w(8), "bb": w(8), "m": w(8), "v": np.abs(w(8)) + 1,
        "w2": w(8, 8, 3, 3), "wf": w(5, 8 * 2 * 2), "bf": w(5),
    }
    return make_model(nodes, [("x", [batch, 3, 4, 4])], [("y", [batch, 5])], inits)


FEED = {"x": np.random.default_rng(1).standard_normal((3, 3, 4, 4)).astype(np.float32)}


def test_ratio_zero_is_a_no_op():
    model = _cnn()
    result = PruneChannelsPass(ratio=0.0)(model)
    assert not result.modified and result.model is model
    assert result.stats["groups_prunable"] == 1 and result.stats["channels_removed"] == 0


def test_remove_halves_the_group_and_keeps_dynamic_batch_and_outputs():
    model = _cnn()
    result = PruneChannelsPass(ratio=0.5)(model)
    assert result.modified
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)
    inits = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
    assert inits["w1"].shape == (4, 3, 3, 3) and inits["w2"].shape == (4, 4, 3, 3)
    assert inits["s"].shape == (4,) and inits["wf"].shape == (5, 16)
    assert pruned.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert outputs(pruned, FEED)["y"].shape == (3, 5)
    assert result.stats["channels_removed"] == 4 and result.stats["params_after"] < result.stats["params_before"]


def test_remove_equals_mask_and_mask_records_channels():
    model = _cnn()
    removed = prune_channels(model, ratio=0.5, mode="remove")
    masked_result = PruneChannelsPass(ratio=0.5, mode="mask")(model)
    masked = masked_result.model
    assert_same_outputs(removed, masked, FEED)
    record = pruned_channels(masked)
    assert set(record["w1"]) == {"0"} and len(record["w1"]["0"]) == 4
    assert record["w2"].keys() == {"0", "1"} and "v" not in record  # statistics are not zeroed
    w1 = numpy_helper.to_array(next(i for i in masked.graph.initializer if i.name == "w1"))
    assert not w1[record["w1"]["0"]].any() and w1.shape == (8, 3, 3, 3)
    assert masked_result.stats["params_zeroed"] > 0


def test_kept_channels_are_the_important_ones():
    model = _cnn()
    # make channel 0..3 of w1 tiny: l1 and l2 must prune exactly them
    w1 = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w1[:4] *= 1e-3
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "w1"))
    masked = prune_channels(model, ratio=0.5, criterion="l1", mode="mask")
    assert pruned_channels(masked)["w1"]["0"] == [0, 1, 2, 3]


def test_round_to_keeps_multiples_and_at_least_one_channel():
    model = _cnn()
    pruned = prune_channels(model, ratio=0.5, round_to=3)
    w1 = next(i for i in pruned.graph.initializer if i.name == "w1")
    assert w1.dims[0] == 6  # 4 kept rounded up to a multiple of 3
    pruned = prune_channels(model, ratio=0.99)
    assert next(i for i in pruned.graph.initializer if i.name == "w1").dims[0] == 1


def test_global_ranking_caps_each_group():
    model = onnx.load(DIGITS)
    result = PruneChannelsPass(ratio=0.5, global_ranking=True, max_group_ratio=0.75)(model)
    dims = {i.name: list(i.dims) for i in result.model.graph.initializer}
    kept = [dims["conv1.weight"][0], dims["conv2.weight"][0], dims["conv3.weight"][0]]
    assert sum(kept) == 112 - 56 and all(k >= c // 4 for k, c in zip(kept, (16, 32, 64)))
    onnx.checker.check_model(result.model, full_check=True)


def test_exclude_keeps_the_node_channels():
    model = onnx.load(DIGITS)
    name = next(n.name for n in model.graph.node if n.op_type == "Conv" and "conv2.weight" in n.input)
    result = PruneChannelsPass(ratio=0.5, exclude=[name])(model)
    dims = {i.name: list(i.dims) for i in result.model.graph.initializer}
    assert dims["conv2.weight"][:2] == [32, 16] and dims["conv3.weight"][0] == 32
    assert result.stats["groups_excluded"] == 2


def test_activation_criterion_uses_calibration_data():
    from graphprune.data import random_inputs

    model = _cnn()
    data = random_inputs(model, {"x": (2, 3, 4, 4)}, samples=2)
    masked = prune_channels(model, ratio=0.5, criterion="activation", mode="mask", data=data)
    removed = prune_channels(model, ratio=0.5, criterion="activation", data=data)
    assert len(pruned_channels(masked)["w1"]["0"]) == 4
    assert_same_outputs(removed, masked, FEED)


def test_gradual_mask_then_remove_remaps_the_record():
    model = _cnn()
    masked = prune_channels(model, ratio=0.25, mode="mask")
    masked_more = prune_channels(masked, ratio=0.5, mode="mask")
    first, second = pruned_channels(masked), pruned_channels(masked_more)
    assert set(first["w1"]["0"]) <= set(second["w1"]["0"])  # masked (zero) channels go first
    assert not pruned_channels(prune_channels(masked, ratio=0.5))  # removed: nothing left masked


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ratio": 1.0}, "outside [0, 1)"),
        ({"ratio": -0.1}, "outside [0, 1)"),
        ({"criterion": "l3"}, "unknown criterion"),
        ({"mode": "delete"}, "unknown mode"),
        ({"criterion": "activation"}, "needs calibration data"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        PruneChannelsPass(**kwargs)


def test_exclude_of_unknown_node_is_refused():
    with pytest.raises(UserError, match="no node"):
        PruneChannelsPass(ratio=0.5, exclude=["nope"])(_cnn())


# -- CLI ----------------------------------------------------------------------------------------

def test_cli_prune_writes_a_smaller_model(tmp_path, capsys):
    out = tmp_path / "p.onnx"
    assert main(["prune", DIGITS, "-o", str(out), "--ratio", "0.5", "--stats"]) == 0
    text = capsys.readouterr().out
    assert "3 prunable" in text and "channels removed: 56" in text
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    assert json.loads(text[text.index("{"): text.rindex("}") + 1])["groups_pruned"] == 3


def test_cli_mask_mode_records_channels(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["prune", DIGITS, "-o", str(out), "--ratio", "0.25", "--mode", "mask", "--criterion", "bn"]) == 0
    assert PRUNED_CHANNELS_KEY in {p.key for p in onnx.load(str(out)).metadata_props}


def test_cli_nothing_prunable_exits_2_with_the_reasons_and_writes_nothing(tmp_path, capsys):
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"])], [("x", [1, 3, 4, 4])], [("y", [1, 2, 2, 2])],
                       {"w": w(2, 3, 3, 3)})
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "nothing pruned (graphprune inspect MODEL --groups lists why): every group is blocked" in err and "channels x2 (first: graph output y)" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_cli_activation_criterion_with_data(tmp_path, capsys):
    out = tmp_path / "a.onnx"
    args = ["prune", DIGITS, "-o", str(out), "--ratio", "0.5", "--criterion", "activation", "--data", "models/digits_test.npz"]
    assert main(args) == 0
    assert "channels removed: 56" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ratio", "1.5"], "--ratio 1.5 is outside [0.0, 1.0)"),
        (["--ratio", "abc"], "--ratio 'abc' is not a number"),
        (["--ratio", "0.5", "--criterion", "l7"], "unknown --criterion 'l7'"),
        (["--ratio", "0.5", "--mode", "zap"], "unknown --mode 'zap'"),
        (["--ratio", "0.5", "--criterion", "activation"], "--criterion activation needs calibration data"),
        (["--ratio", "0.5", "--exclude", "no_such_node"], "--exclude names no node of the model: no_such_node"),
        (["--ratio", "0.5", "--round-to", "0"], "--round-to 0 must be at least 1"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "o.onnx"
    assert main(["prune", DIGITS, "-o", str(out)] + extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_bad_model_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    assert main(["prune", str(bad), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.5"]) == 2
    assert "bad.onnx" in capsys.readouterr().err and not (tmp_path / "o.onnx").exists()


def test_inspect_groups_lists_prunable_and_blocked(capsys):
    assert main(["inspect", DIGITS, "--groups"]) == 0
    text = capsys.readouterr().out
    assert "channel groups: 4 (3 prunable, 1 blocked)" in text
    assert "graph output logits" in text
    assert main(["inspect", DIGITS, "--groups", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["prunable"]) == 3 and doc["blocked"][0]["reasons"] == ["graph output logits"]


def test_recipe_runs_canonicalize_then_prune(tmp_path, capsys):
    out = tmp_path / "r.onnx"
    assert main(["run", DIGITS, "-o", str(out), "--recipe", "prune"]) == 0
    assert "prune" in capsys.readouterr().out
    dims = {i.name: list(i.dims) for i in onnx.load(str(out)).graph.initializer}
    assert dims["conv1.weight"][0] == 8

"""Validation at the door, numbers that cannot be right, and checked inputs and arguments."""

import os

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import helper, numpy_helper

from graphprune.cli import main
from graphprune.data import load_inputs, random_inputs
from graphprune.errors import UserError
from graphprune.model_io import load
from graphprune.recipes import MAX_RECIPE_BYTES, build_pass, load_recipe
from graphprune.testing import fuzz
from graphprune.testing.fuzz import defects
from graphprune.validation import check_finite, check_session, door, validate_model


def _save(model, path):
    onnx.save_model(model, str(path))
    return str(path)


@pytest.mark.parametrize("edit, expected", [
    (defects.set_attr("conv1", "strides", [0, 1]), "strides [0, 1] must all be >= 1"),
    (defects.set_attr("conv1", "dilations", [1, 0]), "dilations [1, 0] must all be >= 1"),
    (defects.set_attr("conv1", "pads", [-1, 1, 1, 1]), "pads [-1, 1, 1, 1] must all be >= 0"),
    (defects.set_attr("conv1", "pads", [1, 1]), "2 values per spatial axis"),
    (defects.set_attr("conv2", "group", 0), "group 0 must be >= 1"),
    (defects.set_attr("conv2", "group", 3), "group 3 does not divide the 4 output channels"),
    (defects.pool_edit("strides", [0, 2]), "node 'pool' (MaxPool): strides"),
    (defects.conv_transpose("strides", [0, 1]), "(ConvTranspose): strides"),
    (defects.replace_init("c1.w", defects.negative_dims), "initializer 'c1.w' has negative dims"),
    (defects.replace_init("c2.w", defects.short_raw), "initializer 'c2.w': 288 bytes of data"),
    (defects.replace_init("c2.w", defects.nan_weight(float("nan"))), "weight 'c2.w' holds NaN or Inf"),
    (defects.replace_init("bn.v", defects.nan_weight(float("inf"))), "weight 'bn.v' holds NaN or Inf"),
    (defects.conflicting_vi, "7 input channels but weight [4, 4, 3, 3] with group 1 expects 4"),
    (defects.conflicting_type, "invalid ONNX graph: "),
    (defects.negative_input_dim, "declares a negative dim"),
])
def test_validate_model_names_the_first_problem(edit, expected):
    with pytest.raises(UserError, match=None) as info:
        validate_model(fuzz.conv_model(edit=edit), need_session=False)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_validate_model_zero_channels_and_session():
    with pytest.raises(UserError, match="zero-size"):
        validate_model(fuzz.conv_model(channels=0), need_session=False)
    validate_model(fuzz.conv_model(), need_session=True)  # the valid model passes every step
    with pytest.raises(UserError, match="onnxruntime cannot load the model: .*NoSuchOp"):
        check_session(fuzz.conv_model(edit=defects.unknown_op))


def test_load_validates_only_under_the_door(tmp_path):
    path = _save(fuzz.conv_model(edit=defects.set_attr("conv1", "strides", [0, 1])), tmp_path / "m.onnx")
    load(path)  # library users: unchanged
    with door(need_session=False), pytest.raises(UserError, match=r"m\.onnx: node 'conv1' \(Conv\): strides"):
        load(path)


def test_stride_zero_is_refused_by_every_command_without_crashing(tmp_path, capfd):
    path = _save(fuzz.conv_model(edit=defects.set_attr("conv1", "strides", [0, 1])), tmp_path / "m.onnx")
    for argv in (["inspect", path], ["prune", path, "-o", str(tmp_path / "o.onnx"), "--ratio", "0.5"]):
        assert main(argv) == 2
        err = capfd.readouterr().err
        assert err.count("\n") == 1 and "strides [0, 1] must all be >= 1" in err
    assert not os.path.exists(tmp_path / "o.onnx")


def test_runtime_log_lines_do_not_leak(tmp_path, capfd):
    path = _save(fuzz.conv_model(edit=defects.unknown_op), tmp_path / "m.onnx")
    assert main(["prune", path, "-o", str(tmp_path / "o.onnx"), "--ratio", "0.5"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1, err
    assert "\x1b[" not in err


def test_check_finite_reads_bfloat16_and_constants():
    model = fuzz.conv_model()
    const = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([np.inf], np.float32)))
    model.graph.node.insert(0, const)
    with pytest.raises(UserError, match="'k' holds NaN or Inf"):
        check_finite(model)


def _if_holding(name: str, value: float) -> onnx.NodeProto:
    """An If whose branches hold initializer ``name`` (``value``) in their own graphs."""
    def branch(tag):
        init = numpy_helper.from_array(np.array([value], np.float32), name)
        return helper.make_graph([helper.make_node("Identity", [name], [f"o{tag}"])], f"b{tag}", [],
                                 [helper.make_tensor_value_info(f"o{tag}", onnx.TensorProto.FLOAT, [1])], [init])
    return helper.make_node("If", ["c"], ["o"], then_branch=branch(1), else_branch=branch(2))


def test_check_finite_skips_only_the_main_graphs_weights_already_checked():
    """``checked`` names the input's weights a command left untouched (the door read them): skipped in
    the main graph only; a subgraph's or a Constant's tensor of the same name is still read, and the
    first non-finite tensor named is the one the graphs' order meets first."""
    model = fuzz.conv_model(edit=defects.replace_init("c2.w", defects.nan_weight(float("nan"))))
    with pytest.raises(UserError, match="'c2.w' holds NaN or Inf"):
        check_finite(model)
    check_finite(model, checked={"c2.w"})  # only the skipped weight is bad
    model.graph.node.append(_if_holding("c2.w", float("inf")))
    with pytest.raises(UserError, match="'c2.w' holds NaN or Inf"):
        check_finite(model, checked={"c2.w"})  # the branch's own c2.w
    constant = fuzz.conv_model()
    constant.graph.node.insert(0, helper.make_node("Constant", [], ["c2.w"], value=numpy_helper.from_array(
        np.array([np.nan], np.float32))))
    with pytest.raises(UserError, match="'c2.w' holds NaN or Inf"):
        check_finite(constant, checked={"c2.w"})
    nested = fuzz.conv_model()
    outer = _if_holding("a", 1.0)
    outer.attribute[0].g.node.append(_if_holding("b", float("nan")))  # then-branch: a, then its If's b
    nested.graph.node.extend([outer, _if_holding("c", float("nan"))])
    with pytest.raises(UserError, match="'b' holds NaN or Inf"):  # depth first, as runtime_support.all_graphs
        check_finite(nested)


# ---------------------------------------------------------------------------- .npz data


def _npz(path, **arrays):
    np.savez(str(path), **arrays)
    return str(path)


def test_npz_problems_are_named(tmp_path):
    model = fuzz.conv_model()
    x = np.zeros((4, 3, 8, 8), np.float32)
    bad = x.copy()
    bad[2, 0, 0, 0] = np.nan
    cases = {
        "zero samples": {"x": x[:0]},
        "NaN or Inf values (sample 2)": {"x": bad},
        "is a scalar; the model expects": {"x": np.float32(1)},
        "has shape [4, 3, 4, 8]": {"x": x[:, :, :4]},
        "has dtype int32": {"x": x.astype(np.int32)},
    }
    for expected, arrays in cases.items():
        with pytest.raises(UserError, match=None) as info:
            load_inputs(_npz(tmp_path / "d.npz", **arrays), model)
        assert expected in str(info.value), str(info.value)
    np.save(str(tmp_path / "a.npy"), x)
    os.replace(tmp_path / "a.npy", tmp_path / "a.npz")
    with pytest.raises(UserError, match="a .npy file"):
        load_inputs(str(tmp_path / "a.npz"), model)
    os.mkfifo(tmp_path / "f.npz")
    with pytest.raises(UserError, match="not a regular file"):
        load_inputs(str(tmp_path / "f.npz"), model)


def test_labels_are_checked(tmp_path):
    model = fuzz.conv_model()
    x = np.zeros((4, 3, 8, 8), np.float32)
    for labels, expected in [(np.array([np.nan] * 4), "NaN or Inf"), (np.int64(1), "is a scalar"),
                             (np.array(["a"] * 4), "labels must be integer")]:
        with pytest.raises(UserError, match=None) as info:
            load_inputs(_npz(tmp_path / "d.npz", x=x, y=labels), model, extra_keys=["y"])
        assert expected in str(info.value)


def test_scalar_inputs_one_shared_value(tmp_path):
    """A rank-0 input takes one value: a 0-d array or equal per-sample values; it is fed with every batch."""
    model = fuzz.scalar_input_model()
    xs = np.ones((5, 16), np.float32)
    for sr in (np.array(16000, np.int64), np.full(5, 16000, np.int32)):
        data, _ = load_inputs(_npz(tmp_path / "d.npz", x=xs, sr=sr), model)
        assert len(data) == 5
        batches = list(data.batches(2))
        assert [b["x"].shape[0] for b in batches] == [2, 2, 1]
        assert all(b["sr"].shape == () and b["sr"].dtype == np.int64 and int(b["sr"]) == 16000 for b in batches)
        assert data.subset([0, 3]).arrays["sr"].shape == ()
    with pytest.raises(UserError, match="different values"):
        load_inputs(_npz(tmp_path / "d.npz", x=xs, sr=np.arange(5)), model)
    feeds = random_inputs(model, {"x": (1, 16)}, samples=3)
    assert feeds.arrays["sr"].shape == () and len(feeds) == 3


def test_scalar_input_model_through_the_cli(tmp_path, capfd):
    model = _save(fuzz.scalar_input_model(), tmp_path / "vad.onnx")
    data = _npz(tmp_path / "d.npz", x=np.ones((6, 16), np.float32), sr=np.array(16000, np.int64))
    out = str(tmp_path / "o.onnx")
    assert main(["prune", model, "-o", out, "--ratio", "0.5", "--criterion", "activation", "--data", data]) == 0
    assert main(["validate", model, out, "--data", data, "--runs", "1"]) == 0


# ---------------------------------------------------------------------------- recipes and arguments


def test_recipes_only_from_small_regular_files(tmp_path):
    os.mkfifo(tmp_path / "fifo.yaml")
    with pytest.raises(UserError, match="not a regular file"):
        load_recipe(str(tmp_path / "fifo.yaml"))
    big = tmp_path / "big.yaml"
    big.write_bytes(b"passes: [canonicalize]\n" + b"#" * MAX_RECIPE_BYTES)
    with pytest.raises(UserError, match="a recipe is at most"):
        load_recipe(str(big))


@pytest.mark.parametrize("kwargs, expected", [
    ({"round_to": 1.5}, "round_to=1.5 must be an integer"),
    ({"round_to": True}, "must be an integer"),
    ({"ratio": float("nan")}, "must be a finite number"),
    ({"ratio": 1.0}, "is outside [0.0, 1.0)"),
    ({"ratio": "half"}, "must be a number"),
    ({"max_group_ratio": 0}, "is outside (0.0, 1.0]"),
])
def test_bad_pass_arguments_are_refused(kwargs, expected):
    with pytest.raises(UserError) as info:
        build_pass("prune", kwargs)
    assert expected in str(info.value)


@pytest.mark.parametrize("argv, expected", [
    (["validate", "a", "b", "--threads", str(10**6)], "--threads 1000000 is outside [1, "),
    (["validate", "a", "b", "--threads", "0"], "--threads 0 is outside"),
    (["validate", "a", "b", "--samples", "0"], "--samples 0 is outside"),
    (["validate", "a", "b", "--runs", str(10**9)], "--runs 1000000000 is outside"),
    (["finetune", "a", "-o", "b", "--data", "d", "--seed", "-1"], "--seed -1 is outside"),
    (["finetune", "a", "-o", "b", "--data", "d", "--epochs", "x"], "--epochs 'x' is not an integer"),
])
def test_integer_options_are_range_checked_first(argv, expected, capfd):
    assert main(argv) == 2
    assert expected in capfd.readouterr().err


# ---------------------------------------------------------------------------- mask records and results


@pytest.mark.parametrize("key, value", [
    ("graphprune.pruned_channels", "{"),
    ("graphprune.pruned_channels", "[1, 2]"),
    ("graphprune.pruned_channels", '{"c1.w": {"9": [0]}}'),
    ("graphprune.pruned_channels", '{"c1.w": {"0": [99]}}'),
    ("graphprune.weight_masks", '{"version": 7, "weights": {}}'),
])
def test_malformed_mask_records_are_ignored_with_a_warning(tmp_path, capfd, key, value):
    model = fuzz.conv_model()
    model.metadata_props.add(key=key, value=value)
    path = _save(model, tmp_path / "m.onnx")
    for argv in (["prune", path, "-o", str(tmp_path / "o.onnx"), "--ratio", "0.5", "--mode", "mask"],
                 ["sparsify", path, "-o", str(tmp_path / "s.onnx"), "--sparsity", "0.5"]):
        assert main(argv) == 0
    err = capfd.readouterr().err
    if key == "graphprune.pruned_channels":
        assert "warning: model metadata 'graphprune.pruned_channels'" in err
    else:
        assert "warning: model metadata 'graphprune.weight_masks'" in err


def test_non_finite_results_are_never_written(tmp_path, capfd):
    """BatchNorm statistics re-estimated from data that overflow float32 are refused, not written."""
    from graphprune.data import InputSet
    from graphprune.passes.finetune import FineTunePass

    model = fuzz.conv_model()
    huge = np.full((4, 3, 8, 8), 3e38, np.float32)
    with pytest.raises(UserError, match="not finite"):
        FineTunePass(data=InputSet({"x": huge}), teacher=model, epochs=0)(model)
    path = _save(model, tmp_path / "m.onnx")
    data = _npz(tmp_path / "d.npz", x=huge, y=np.zeros(4, np.int64))
    out = tmp_path / "o.onnx"
    assert main(["finetune", path, "-o", str(out), "--data", data, "--labels", "y", "--epochs", "0"]) == 2
    assert "not finite" in capfd.readouterr().err
    assert not out.exists()


def test_paddle_style_minus_one_dims_read_as_dynamic(tmp_path, capfd):
    # Paddle (every PP-OCR model) declares its dynamic batch as dim_value -1: ONNX Runtime runs such
    # models, so the door must not refuse them; the dims come out named.
    model = fuzz.conv_model()
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = -1
    path = _save(model, tmp_path / "m.onnx")
    out = str(tmp_path / "o.onnx")
    assert main(["prune", path, "-o", out, "--ratio", "0.5"]) == 0, capfd.readouterr().err
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "x_dim0"
    assert all(d.dim_value >= 0 for vi in written.graph.input for d in vi.type.tensor_type.shape.dim)
    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    shape = [2] + [d.dim_value for d in written.graph.input[0].type.tensor_type.shape.dim[1:]]
    assert session.run(None, {"x": np.ones(shape, np.float32)})[0].shape[0] == 2


def test_deferred_session_check_names_the_input_only_when_something_fails(tmp_path):
    """prune defers the door's session check of its input (each costs ~1 s on a 20,000-node graph):
    the input is checked when the result fails its own check or an internal error escapes."""
    from graphprune.validation import check_result, deferred_session_check

    x = helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, [1, 4])
    erf = helper.make_model(helper.make_graph([helper.make_node("Erf", ["x"], ["y"])], "g", [x], [y]),
                            opset_imports=[helper.make_opsetid("", 17)])
    bad = _save(erf, tmp_path / "bad.onnx")  # the checker accepts it; ORT has no double Erf kernel
    good = _save(fuzz.conv_model(), tmp_path / "good.onnx")
    with door(need_session=True), pytest.raises(UserError, match="onnxruntime cannot load the model"):
        load(bad)  # without deferral: the door refuses it at once
    with door(need_session=True), deferred_session_check():
        model = load(bad)  # deferred: loaded
        check_result(fuzz.conv_model())  # a result ORT loads is all exit 0 needs
        with pytest.raises(UserError, match="onnxruntime cannot load the model: .*Erf"):
            check_result(model)  # the result fails: the input is checked and named first
    with pytest.raises(UserError, match="Erf"), door(need_session=True), deferred_session_check():
        load(bad)
        raise RuntimeError("a pass crashed")  # not reported as an internal error: the input is at fault
    with pytest.raises(RuntimeError, match="a pass crashed"), door(need_session=True), deferred_session_check():
        load(good)
        raise RuntimeError("a pass crashed")  # a valid input: our bug stays an internal error
    with door(need_session=False), deferred_session_check():
        load(bad)  # a door that needs no session: nothing deferred, nothing checked
        check_result(fuzz.conv_model())


def test_prune_without_data_checks_its_input_only_when_the_result_fails(tmp_path, capfd):
    """``prune`` (no --data) defers the input's session check: an input ORT refuses is still exit 2
    with the door's one-line message and nothing written, the same as a checked door gives."""

    def erf_branch(parts):  # a double Erf beside the prunable convs: the checker accepts it, ORT has no kernel
        parts["nodes"].append(helper.make_node("Erf", ["d"], ["e"], name="erf"))
        parts["inputs"].append(helper.make_tensor_value_info("d", onnx.TensorProto.DOUBLE, [1, 4]))
        parts["outputs"].append(helper.make_tensor_value_info("e", onnx.TensorProto.DOUBLE, [1, 4]))

    bad = _save(fuzz.conv_model(edit=erf_branch), tmp_path / "bad.onnx")
    out = tmp_path / "out.onnx"
    assert main(["prune", bad, "--ratio", "0.5", "-o", str(out)]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "onnxruntime cannot load the model: " in err and "Erf" in err
    assert not out.exists()
    good = _save(fuzz.conv_model(), tmp_path / "good.onnx")
    assert main(["prune", good, "--ratio", "0.5", "-o", str(out)]) == 0
    onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])

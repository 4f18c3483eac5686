"""Reconstruction after pruning: exact on redundant channels, better than plain pruning, a no-op at ratio 0."""

import os
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphprune.cli import main
from graphprune.data import InputSet
from graphprune.errors import UserError
from graphprune.passes import PruneChannelsPass, ReconstructPass, prune_channels
from graphprune.pruning.apply import REMOVED_CHANNELS_KEY
from graphprune.runtime import make_session, run
from graphprune.testing.fixtures_small import digits_cnn_like, mlp


def _out(model, x):
    session = make_session(model, threads=1)
    return run(session, {session.get_inputs()[0].name: x})[session.get_outputs()[0].name]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _model(nodes, inits, x_shape, y_shape):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _redundant_mlp():
    """x -> Gemm(6) -> Gemm(4): hidden unit 5 is 0.01 * (h0 + h1), the smallest in l2, so pruning
    one of six removes it and the kept units still span the original output exactly."""
    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((6, 8)), rng.standard_normal(6)
    w1[5], b1[5] = 0.01 * (w1[0] + w1[1]), 0.01 * (b1[0] + b1[1])
    w2, b2 = rng.standard_normal((4, 6)) * 0.1, rng.standard_normal(4)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], name="fc2", transB=1)]
    return _model(nodes, {"w1": w1, "b1": b1, "w2": w2, "b2": b2}, ["N", 8], ["N", 4])


def _redundant_cnn():
    """Conv(3->4) -> Conv 3x3 stride 2 pad 1 (4->5, no bias): channel 3 = 0.01 * (c0 - c2)."""
    rng = np.random.default_rng(1)
    w1, b1 = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    w1[3], b1[3] = 0.01 * (w1[0] - w1[2]), 0.01 * (b1[0] - b1[2])
    w2 = rng.standard_normal((5, 4, 3, 3)) * 0.1
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2])]
    return _model(nodes, {"w1": w1, "b1": b1, "w2": w2}, ["N", 3, 8, 8], ["N", 5, 4, 4])


@pytest.mark.parametrize("build, shape", [(_redundant_mlp, (8,)), (_redundant_cnn, (3, 8, 8))])
@pytest.mark.parametrize("damp", [0.0, None])
def test_redundant_channel_is_restored_exactly(build, shape, damp):
    model = build()
    rng = np.random.default_rng(2)
    calibration = InputSet({"x": rng.standard_normal((40,) + shape).astype(np.float32)})
    held = rng.standard_normal((16,) + shape).astype(np.float32)
    pruned = prune_channels(model, ratio=0.25, criterion="l2")
    assert _rel(_out(pruned, held), _out(model, held)) > 1e-3  # pruning alone loses the channel's share
    result = ReconstructPass(original=model, data=calibration, damp=damp)(pruned)
    assert result.modified and result.stats["layers"] == 1
    assert _rel(_out(result.model, held), _out(model, held)) < 1e-5
    onnx.checker.check_model(result.model, full_check=True)


def test_conv_without_bias_gets_one():
    model = _redundant_cnn()
    pruned = prune_channels(model, ratio=0.25)
    data = InputSet({"x": np.random.default_rng(3).standard_normal((8, 3, 8, 8)).astype(np.float32)})
    result = ReconstructPass(original=model, data=data)(pruned).model
    conv2 = next(n for n in result.graph.node if n.name == "conv2")
    assert len(conv2.input) == 3 and conv2.input[2] in {i.name for i in result.graph.initializer}


@pytest.mark.parametrize("build, shape", [(lambda: digits_cnn_like(channels=(8, 16), hidden=32), (1, 8, 8)),
                                          (lambda: mlp(in_features=16, hidden=(48, 32)), (16,))])
def test_reconstruction_beats_plain_pruning_on_held_out_data(build, shape):
    model = build()
    rng = np.random.default_rng(4)
    name = model.graph.input[0].name
    calibration = InputSet({name: rng.standard_normal((256,) + shape).astype(np.float32)})
    held = rng.standard_normal((64,) + shape).astype(np.float32)
    pruned = prune_channels(model, ratio=0.5)
    result = ReconstructPass(original=model, data=calibration)(pruned)
    plain, rebuilt = _rel(_out(pruned, held), _out(model, held)), _rel(_out(result.model, held), _out(model, held))
    assert rebuilt < 0.75 * plain, (plain, rebuilt)
    assert result.stats["error_after"] < result.stats["error_before"]
    # the final check ran on the last tenth, which no round fit or chose a damp on
    assert result.stats["verification_samples"] == 25
    assert result.stats["held_out_output_error"] < result.stats["held_out_output_error_pruned"]
    assert all(e["after"] <= e["before"] for e in result.stats["per_layer"])


def test_ratio_zero_then_reconstruct_is_a_no_op():
    model = digits_cnn_like()
    data = InputSet({"input": np.random.default_rng(5).standard_normal((8, 1, 8, 8)).astype(np.float32)})
    pruned = PruneChannelsPass(ratio=0.0)(model).model
    result = ReconstructPass(original=model, data=data)(pruned)
    assert not result.modified and result.model is pruned and result.stats["layers"] == 0


def test_masked_model_has_nothing_to_refit():
    model = digits_cnn_like()
    data = InputSet({"input": np.zeros((4, 1, 8, 8), np.float32)})
    masked = prune_channels(model, ratio=0.5, mode="mask")
    assert REMOVED_CHANNELS_KEY not in {p.key for p in masked.metadata_props}
    assert not ReconstructPass(original=model, data=data)(masked).modified


def test_wrong_original_and_missing_inputs_are_refused():
    model = digits_cnn_like(seed=0)
    data = InputSet({"input": np.zeros((4, 1, 8, 8), np.float32)})
    pruned = prune_channels(model, ratio=0.5)
    with pytest.raises(UserError, match="not the original's minus the removed channels"):
        ReconstructPass(original=digits_cnn_like(seed=1), data=data)(pruned)
    with pytest.raises(UserError, match="needs calibration data"):
        ReconstructPass(original=model)(pruned)
    with pytest.raises(UserError, match="needs the original model"):
        ReconstructPass(data=data)(pruned)
    with pytest.raises(UserError, match="does not run through the model"):
        ReconstructPass(original=model, data=InputSet({"input": np.zeros((4, 1, 7, 7), np.float32)}))(pruned)


def _files(tmp_path):
    model = digits_cnn_like()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    data = tmp_path / "d.npz"
    np.savez(data, input=np.random.default_rng(6).standard_normal((64, 1, 8, 8)).astype(np.float32))
    return model, str(path), str(data)


def test_cli_prune_reconstruct_writes_a_checked_model_equal_to_the_pipeline(tmp_path, capsys):
    model, path, data = _files(tmp_path)
    out, piped = tmp_path / "out.onnx", tmp_path / "piped.onnx"
    assert main(["prune", path, "-o", str(out), "--ratio", "0.5", "--reconstruct", "--data", data]) == 0
    assert "reconstruction: 3 layers refit" in capsys.readouterr().out
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    assert main(["run", path, "-o", str(piped), "--pass", "prune:ratio=0.5", "--pass", "reconstruct", "--data", data]) == 0
    x = np.random.default_rng(7).standard_normal((5, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_out(onnx.load(str(piped)), x), _out(written, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    ([], "--reconstruct needs calibration data"),
    (["--data", "BAD"], "input"),
    (["--data", "DATA", "--mode", "mask"], "not with --mode mask"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, extra, message):
    _, path, data = _files(tmp_path)
    bad = tmp_path / "bad.npz"
    np.savez(bad, wrong=np.zeros((3, 2), np.float32))
    extra = [str(bad) if e == "BAD" else data if e == "DATA" else e for e in extra]
    out = tmp_path / "out.onnx"
    assert main(["prune", path, "-o", str(out), "--ratio", "0.5", "--reconstruct"] + extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_budget_prune_reconstructs_and_blocks_are_refused(tmp_path, capsys):
    _, path, data = _files(tmp_path)
    out = tmp_path / "out.onnx"
    assert main(["prune", path, "-o", str(out), "--target-macs", "0.6", "--reconstruct", "--data", data, "--jobs", "1"]) == 0
    assert "reconstruction: " in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    out.unlink()
    assert main(["prune", path, "-o", str(out), "--blocks", "1", "--reconstruct", "--data", data]) == 2
    assert "not with --blocks" in capsys.readouterr().err and not out.exists()


def test_finetune_keeps_the_statistics_a_reconstruction_refit_to_until_the_next_removal():
    # Re-estimating BatchNorm statistics after reconstruct undoes the refit (README, PP-OCR cls):
    # finetune's default keeps them right after reconstruct, and re-estimates after a new removal.
    from graphprune.data import load_inputs
    from graphprune.passes.finetune import FineTunePass

    model = onnx.load(os.path.join(os.path.dirname(__file__), "..", "models", "digits_cnn.onnx"))
    data = load_inputs(os.path.join(os.path.dirname(__file__), "..", "models", "digits_train.npz"), model)[0]
    data = data.subset(range(64))
    pruned = prune_channels(model, ratio=0.3)
    rebuilt = ReconstructPass(original=model, data=data)(pruned).model

    def recalibrated(candidate, batchnorm="auto"):
        result = FineTunePass(data=data, teacher=model, epochs=0, batchnorm=batchnorm)(candidate)
        return result.stats["batchnorm_recalibrated"]

    assert recalibrated(rebuilt) == 0
    assert recalibrated(rebuilt, "recalibrate") > 0
    assert recalibrated(pruned) > 0  # not reconstructed: re-estimated as before
    assert recalibrated(prune_channels(rebuilt, ratio=0.2)) > 0  # a new removal voids the mark

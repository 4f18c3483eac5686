"""sparsify --criterion wanda|sparsegpt: exact patterns, error ordering, mask record, compact storage, bad data."""

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphprune.cli import main
from graphprune.data import InputSet
from graphprune.errors import UserError
from graphprune.model_io import load
from graphprune.passes.sparsify_weights import SparsifyWeightsPass
from graphprune.recipes import build_pass, parse_pass_spec
from graphprune.runtime import make_session, run
from graphprune.sparsity.masks import read_weight_masks
from graphprune.sparsity.storage import expand_compact_weights
from tests.test_sparsify_pass import LAYERS, small_net, weights


def _data(samples: int = 16, seed: int = 3) -> InputSet:
    return InputSet({"x": np.random.default_rng(seed).standard_normal((samples, 3, 8, 8)).astype(np.float32)})


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_unstructured_reaches_the_sparsity_exactly_per_layer(criterion):
    result = SparsifyWeightsPass(sparsity=0.6, criterion=criterion, data=_data())(small_net())
    after = weights(result.model)
    for name in LAYERS:
        assert int(np.sum(after[name] == 0)) == round(0.6 * after[name].size), name
    assert result.stats["criterion"] == criterion and result.stats["scope"] == "layer"
    assert set(read_weight_masks(result.model)) == set(LAYERS)


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_two_four_keeps_two_of_every_four_along_the_reduction_axis(criterion):
    result = SparsifyWeightsPass(pattern="2:4", criterion=criterion, data=_data())(small_net())
    after = weights(result.model)
    for name in ("conv_w", "fc_w", "proj_w"):
        axis = LAYERS[name][1]
        groups = np.moveaxis(after[name], axis, -1).reshape(-1, 4)
        assert (np.count_nonzero(groups, axis=1) == 2).all(), name
    np.testing.assert_array_equal(after["stem_w"], weights(small_net())["stem_w"])  # 3 channels: skipped
    assert any("does not fit" in s["reason"] for s in result.stats["skipped"])


def _wide_layer(k: int = 64, n: int = 32) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "wide",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", k])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", n])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_layer_error_sparsegpt_below_wanda_below_magnitude(pattern):
    """On inputs whose channels have uneven, correlated norms (as real activations do)."""
    model = _wide_layer()
    rng = np.random.default_rng(1)
    mix = rng.standard_normal((64, 64)) / 8
    scale = np.exp(rng.standard_normal(64))

    def inputs(count, seed):
        z = np.random.default_rng(seed).standard_normal((count, 64))
        return ((z @ mix) * scale).astype(np.float32)

    calibration, held_out = InputSet({"x": inputs(512, 2)}), inputs(256, 3)
    reference = held_out @ weights(model)["w"]
    errors = {}
    for criterion in ("magnitude", "wanda", "sparsegpt"):
        kwargs = {"criterion": criterion, "scope": "layer", "pattern": pattern}
        if pattern == "unstructured":
            kwargs["sparsity"] = 0.5
        if criterion != "magnitude":
            kwargs["data"] = calibration
        pruned = weights(SparsifyWeightsPass(**kwargs)(model).model)["w"]
        assert np.count_nonzero(pruned == 0) == 32 * 32
        errors[criterion] = np.linalg.norm(held_out @ pruned - reference) / np.linalg.norm(reference)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_masked_model_equals_compact_storage_model_and_masks_survive():
    data = _data()
    dense = SparsifyWeightsPass(sparsity=0.7, criterion="sparsegpt", data=data)(small_net()).model
    compact = SparsifyWeightsPass(sparsity=0.7, criterion="sparsegpt", data=data, storage="sparse")(small_net()).model
    x = {"x": data.arrays["x"][:4]}
    np.testing.assert_array_equal(run(make_session(compact), x)["y"], run(make_session(dense), x)["y"])
    masks = read_weight_masks(compact)
    for name, mask in masks.items():
        np.testing.assert_array_equal(mask, weights(dense)[name] != 0)
    assert weights(expand_compact_weights(compact)).keys() >= set(LAYERS)


def test_sparsegpt_changes_kept_weights_wanda_does_not():
    original = weights(small_net())
    for criterion, changes in (("wanda", False), ("sparsegpt", True)):
        after = weights(SparsifyWeightsPass(sparsity=0.5, criterion=criterion, data=_data())(small_net()).model)
        kept = after["conv_w"] != 0
        assert np.array_equal(after["conv_w"][kept], original["conv_w"][kept]) is not changes, criterion


def test_global_scope_prunes_the_total_exactly():
    result = SparsifyWeightsPass(sparsity=0.5, criterion="wanda", scope="global", data=_data())(small_net())
    rows = result.stats["layers"]
    assert sum(r["zeros"] for r in rows) == round(0.5 * sum(r["params"] for r in rows))


def test_calibrated_criteria_need_data_and_known_options():
    with pytest.raises(UserError, match="needs calibration data"):
        SparsifyWeightsPass(sparsity=0.5, criterion="wanda")
    with pytest.raises(UserError, match="criterion 'obs'"):
        SparsifyWeightsPass(sparsity=0.5, criterion="obs")
    with pytest.raises(UserError, match="group 'column'"):
        SparsifyWeightsPass(sparsity=0.5, criterion="wanda", data=_data(), group="column")


def test_recipe_pass_takes_the_run_data():
    name, kwargs = parse_pass_spec("sparsify:criterion=wanda,sparsity=0.5")
    sparsify = build_pass(name, kwargs, context={"data": _data()})
    assert sparsify(small_net()).stats["criterion"] == "wanda"
    with pytest.raises(UserError, match="needs calibration data"):
        build_pass(name, kwargs, context={})


@pytest.fixture
def files(tmp_path):
    model = tmp_path / "net.onnx"
    onnx.save(small_net(), str(model))
    good = tmp_path / "cal.npz"
    np.savez(good, x=_data(8).arrays["x"])
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 3, 5, 5), np.float32))
    return model, good, bad, tmp_path


def test_cli_wanda_writes_the_model_and_report(files, capsys):
    model, good, _, tmp = files
    out, report = tmp / "out.onnx", tmp / "r.json"
    assert main(["sparsify", str(model), "-o", str(out), "--sparsity", "0.5", "--criterion", "wanda",
                 "--data", str(good), "--batch-size", "3", "--report", str(report)]) == 0
    assert "overall sparsity of sparsified weights: 50.00%" in capsys.readouterr().out
    stats = json.loads(report.read_text())
    assert stats["calibration"]["calibration_samples"] == 8
    onnx.checker.check_model(str(out), full_check=True)
    assert set(read_weight_masks(load(str(out)))) == set(LAYERS)


def test_cli_compare_layer_is_one_threshold_per_layer(files):
    model, good, _, tmp = files
    outs = {}
    for compare in ("row", "layer"):
        outs[compare] = tmp / f"{compare}.onnx"
        assert main(["sparsify", str(model), "-o", str(outs[compare]), "--sparsity", "0.5", "--criterion", "wanda",
                     "--data", str(good), "--compare", compare]) == 0
    row, layer = weights(load(str(outs["row"])))["fc_w"], weights(load(str(outs["layer"])))["fc_w"]
    assert (np.count_nonzero(row == 0, axis=1) == 8).all()  # 16 inputs per output row, half pruned in each
    assert np.count_nonzero(layer == 0) == 256 and not (np.count_nonzero(layer == 0, axis=1) == 8).all()


@pytest.mark.parametrize("extra,message", [
    ([], "--criterion wanda needs calibration data"),
    (["--criterion", "magnitude", "--compare", "layer"], "--compare is only used by --criterion wanda"),
    (["--data", "BAD"], "input 'x' has shape [4, 3, 5, 5]"),
    (["--data", "MISSING"], "no such data file"),
])
def test_cli_bad_data_exits_2_and_writes_nothing(files, capsys, extra, message):
    model, _, bad, tmp = files
    out = tmp / "out.onnx"
    extra = [str(bad) if e == "BAD" else str(tmp / "none.npz") if e == "MISSING" else e for e in extra]
    assert main(["sparsify", str(model), "-o", str(out), "--sparsity", "0.5", "--criterion", "wanda"] + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt", "magnitude"])
def test_cli_on_a_model_with_external_data_reads_weights_from_disk(files, criterion, capsys):
    from graphprune.model_io import model_files, save

    _, good, _, tmp = files
    model, out = tmp / "ext.onnx", tmp / "ext_out.onnx"
    save(small_net(), str(model), external_data=True)
    assert len(model_files(str(model))) == 2  # the graph and its data file
    data = ["--criterion", criterion] + (["--data", str(good), "--batch-size", "2"] if criterion != "magnitude" else [])
    assert main(["sparsify", str(model), "-o", str(out), "--pattern", "2:4"] + data) == 0
    after = weights(load(str(out)))
    groups = np.moveaxis(after["conv_w"], 1, -1).reshape(-1, 4)
    assert (np.count_nonzero(groups, axis=1) == 2).all()
    # Oracle: the same pass on the model held in memory gives the same weights, every one of them.
    in_memory = SparsifyWeightsPass(pattern="2:4", criterion=criterion,
                                    data=_data(8) if criterion != "magnitude" else None, batch_size=2)(small_net())
    expected = weights(in_memory.model)
    assert after.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(after[name], expected[name], err_msg=name)


def test_pass_with_source_dir_leaves_untouched_weights_on_disk(tmp_path):
    from graphprune.model_io import save

    path = tmp_path / "ext.onnx"
    save(small_net(), str(path), external_data=True)
    lazy = load(str(path), load_external_data=False)
    # conv_w (4.6 KB) is left out: it stays on disk, never read, and save copies its bytes across.
    result = SparsifyWeightsPass(sparsity=0.5, criterion="wanda", data=_data(8), exclude="conv_w",
                                 source_dir=str(tmp_path))(lazy)
    inits = {t.name: t for t in result.model.graph.initializer}
    pruned = {row["weight"] for row in result.stats["layers"]}
    assert pruned == set(LAYERS) - {"conv_w"}
    assert all(inits[n].data_location != onnx.TensorProto.EXTERNAL for n in pruned)  # pruned: in memory
    assert inits["conv_w"].data_location == onnx.TensorProto.EXTERNAL and not inits["conv_w"].raw_data
    expected = weights(SparsifyWeightsPass(sparsity=0.5, criterion="wanda", data=_data(8), exclude="conv_w")(
        small_net()).model)
    out = tmp_path / "out.onnx"
    save(result.model, str(out), source_dir=str(tmp_path))
    got = weights(load(str(out)))
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_sparsegpt_falls_back_to_wanda_where_the_hessian_is_over_the_cap(monkeypatch):
    import functools

    from graphprune.sparsity import calibrated, calibration

    # conv_w's Hessian is 72 x 72 floats (20,736 bytes); the others are smaller.
    monkeypatch.setattr(calibrated, "collect_layer_inputs",
                        functools.partial(calibration.collect_layer_inputs, max_hessian_bytes=10_000))
    result = SparsifyWeightsPass(sparsity=0.5, criterion="sparsegpt", data=_data())(small_net())
    fallbacks = result.stats["calibration"]["fallbacks"]
    assert [f["weight"] for f in fallbacks] == ["conv_w"] and "per-layer cap" in fallbacks[0]["reason"]
    wanda = SparsifyWeightsPass(sparsity=0.5, criterion="wanda", data=_data())(small_net())
    np.testing.assert_array_equal(weights(result.model)["conv_w"], weights(wanda.model)["conv_w"])


def test_sparsity_zero_is_a_no_op_without_calibration():
    model = small_net()
    result = SparsifyWeightsPass(sparsity=0.0, criterion="sparsegpt", data=_data())(model)
    assert not result.modified and result.model is model and "calibration" not in result.stats


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_wanda_ranks_blocks_of_rows_as_it_ranks_the_whole_layer(monkeypatch, pattern):
    from graphprune.sparsity import wanda

    rng = np.random.default_rng(5)
    matrix = rng.standard_normal((2, 37, 24)).astype(np.float32)  # 2 conv groups, 37 rows (uneven counts)
    norms = rng.random((2, 24)).astype(np.float32)
    count = 911  # not a multiple of 74 rows: some rows lose one more
    whole = wanda.wanda_prune(matrix, norms, count, pattern)
    monkeypatch.setattr(wanda, "_CHUNK_ELEMENTS", 5 * 24)  # 5 rows a block, the last one short
    np.testing.assert_array_equal(wanda.wanda_prune(matrix, norms, count, pattern), whole)
    if pattern is None:
        assert int(whole.sum()) == count
        scores = np.abs(matrix) * norms[:, None, :]
        kept_min = np.where(whole, np.inf, scores).min(axis=-1)  # every row drops its smallest scores
        assert (np.where(whole, scores, -np.inf).max(axis=-1) <= kept_min).all()
    else:
        assert (whole.reshape(-1, 4).sum(axis=1) == 2).all()

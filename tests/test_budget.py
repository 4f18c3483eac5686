"""prune --target-macs/--target-params/--target-latency: per-group ratios meeting a budget; saved and re-applied."""

import json
import os

import numpy as np
import onnx
import pytest

from graphprune.cli import main
from graphprune.data import load_inputs, random_inputs
from graphprune.errors import UserError
from graphprune.metrics import count_macs
from graphprune.model_io import load
from graphprune.passes.prune_channels import PruneChannelsPass
from graphprune.pruning.budget import allocate, dominating_groups
from graphprune.runtime import make_session, run_samples
from graphprune.sensitivity import prune_to_budget
from graphprune.testing import resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "models", "digits_cnn.onnx")
DIGITS_DATA = os.path.join(ROOT, "models", "digits_test.npz")
SHAPE = {"images": (1, 1, 8, 8)}


def _outputs(model, data):
    return run_samples(make_session(model), data)


def _report(damages, macs, original_macs=100):
    """A sensitivity report by group: name -> damage per ratio (0.25, 0.5), name -> MACs left per ratio."""
    units = []
    for name in damages:
        entries = [{"ratio": 0.0, "damage": 0.0, "macs": original_macs}]
        entries += [{"ratio": r, "damage": d, "macs": m} for r, d, m in zip((0.25, 0.5), damages[name], macs[name])]
        units.append({"name": name, "entries": entries})
    return {"by": "group", "metric": "top1", "original": {"macs": original_macs, "params": 1}, "units": units}


def test_knapsack_spends_the_budget_on_the_least_damage():
    report = _report({"a": (0.01, 0.02), "b": (0.05, 0.3), "c": (0.02, 0.04)},
                     {"a": (90, 80), "b": (80, 60), "c": (90, 80)})

    def additive(ratios):  # the cost model is exact here: savings add up
        saved = {"a": {0.25: 10, 0.5: 20}, "b": {0.25: 20, 0.5: 40}, "c": {0.25: 10, 0.5: 20}}
        return (100 - sum(saved[n].get(r, 0) for n, r in ratios.items())) / 100

    allocation = allocate(report, "macs", 0.6, additive)
    # 40 points to save: a and c at 0.5 (20 + 20 for damage 0.06) beat b at 0.5 (40 for 0.3)
    assert allocation.ratios == {"a": 0.5, "b": 0.0, "c": 0.5}
    # met in the first round; stepping a or c back to 0.25 was tried (2 builds) and misses the budget
    assert allocation.measured == pytest.approx(0.6) and allocation.rounds == 3
    assert allocation.damage == pytest.approx(0.06)


def test_measured_miss_tightens_the_estimate_until_met():
    report = _report({"a": (0.005, 0.03), "b": (0.005, 0.03)}, {"a": (85, 70), "b": (85, 70)})
    calls = []

    def overlapping(ratios):  # savings overlap: two pruned groups save less than the sum
        calls.append(dict(ratios))
        cut = [{0.0: 0.0, 0.25: 0.15, 0.5: 0.3}[r] for r in ratios.values()]
        return (1 - cut[0]) * (1 - cut[1])

    allocation = allocate(report, "macs", 0.7, overlapping)
    assert allocation.measured <= 0.7 and allocation.rounds == len(calls) >= 2
    assert calls[0] == {"a": 0.25, "b": 0.25}  # estimated 0.7, measured 0.7225: missed
    assert allocation.ratios == {"a": 0.5, "b": 0.0}  # asked for more, then stepped b back down


def test_dominating_group_is_never_pruned_and_unreachable_budget_says_so():
    report = _report({"stem": (0.9, 0.95), "a": (0.01, 0.02), "b": (0.02, 0.03)},
                     {"stem": (70, 40), "a": (90, 80), "b": (90, 80)})
    assert list(dominating_groups(report)) == ["stem"]
    with pytest.raises(UserError, match=r"^budget cannot be met without pruning blocked groups \(1 by their "
                                        r"damage: stem: damage 0.9 at ratio 0.25"):
        allocate(report, "macs", 0.5, lambda r: 1 - 0.1 * sum(v > 0 for v in r.values()) - 0.05)


def test_digits_target_macs_meets_the_budget_and_saved_ratios_reapply(tmp_path, capsys):
    out, ratios = tmp_path / "b.onnx", tmp_path / "ratios.json"
    assert main(["prune", DIGITS, "-o", str(out), "--target-macs", "0.6", "--data", DIGITS_DATA,
                 "--save-ratios", str(ratios)]) == 0
    printed = capsys.readouterr().out
    assert "budget: macs <= 0.6" in printed and "wrote" in printed
    original, pruned = load(DIGITS), load(str(out))
    macs = count_macs(pruned, SHAPE) / count_macs(original, SHAPE)
    assert 0.3 < macs <= 0.6  # met exactly (no tolerance for MACs), and not by pruning everything
    doc = json.loads(ratios.read_text())
    assert doc["version"] == 1 and doc["target"] == "macs" and doc["measured"] == pytest.approx(macs)
    assert set(doc["groups"]) == {"conv1.weight:0", "conv2.weight:0", "conv3.weight:0"}
    assert any(r > 0 for r in doc["groups"].values())

    again, masked = tmp_path / "again.onnx", tmp_path / "masked.onnx"
    assert main(["prune", DIGITS, "-o", str(again), "--group-ratios", str(ratios)]) == 0
    assert main(["prune", DIGITS, "-o", str(masked), "--group-ratios", str(ratios), "--mode", "mask"]) == 0
    reapplied = load(str(again))
    assert [(i.name, onnx.numpy_helper.to_array(i).tobytes()) for i in reapplied.graph.initializer] == \
           [(i.name, onnx.numpy_helper.to_array(i).tobytes()) for i in pruned.graph.initializer]
    data, _ = load_inputs(DIGITS_DATA, original)
    removed_out, masked_out = _outputs(pruned, data)["logits"], _outputs(load(str(masked)), data)["logits"]
    assert np.array_equal(_outputs(reapplied, data)["logits"], removed_out)
    assert np.linalg.norm(masked_out - removed_out) / np.linalg.norm(removed_out) < 1e-4  # its masked twin


@pytest.mark.slow  # 36 one-group measurements of a ResNet-18, then the builds
def test_small_cnn_budgets_in_macs_and_params():
    model = resnet(depth=18, width=0.25, image=32, num_classes=10, dynamic_batch=True)
    data = random_inputs(model, {"input": (1, 3, 32, 32)}, samples=8)
    shapes = {"input": (1, 3, 32, 32)}
    result = prune_to_budget(model, data, "macs", 0.6, ratios=(0.25, 0.5, 0.75), jobs=1)
    assert count_macs(result.model, shapes) <= 0.6 * count_macs(model, shapes)
    assert result.allocation.measured == pytest.approx(count_macs(result.model, shapes) / count_macs(model, shapes))
    assert result.report["by"] == "group" and len(result.allocation.ratios) == len(result.report["units"])
    checked = result.allocation.checked  # the per-group plan was checked against one uniform ratio
    assert checked["uniform_cost"] <= 0.6 and 0 < checked["uniform_ratio"] < 0.95
    assert result.allocation.plan == ("uniform" if checked["uniform"] < checked["knapsack"] else "knapsack")
    assert result.allocation.modeled is None  # no speed tie-break without --round-to
    masked = PruneChannelsPass(group_ratios=result.allocation.ratios, mode="mask")(model).model
    a, b = _outputs(result.model, data)["output"], _outputs(masked, data)["output"]
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-4


def test_group_ratios_prune_only_the_groups_named():
    model = load(DIGITS)
    result = PruneChannelsPass(group_ratios={"conv2.weight:0": 0.5})(model)
    assert result.stats["group_ratios"] == {"conv1.weight:0": 0.0, "conv2.weight:0": 0.5, "conv3.weight:0": 0.0}
    assert result.stats["channels_removed"] == 16
    with pytest.raises(UserError, match="name no prunable group of this model: conv9.weight:0"):
        PruneChannelsPass(group_ratios={"conv9.weight:0": 0.5})(model)
    with pytest.raises(UserError, match="outside"):
        PruneChannelsPass(group_ratios={"conv2.weight:0": 1.5})(model)


def test_unreachable_budget_exits_2_and_writes_nothing(tmp_path, capsys):
    out, ratios = tmp_path / "b.onnx", tmp_path / "r.json"
    code = main(["prune", DIGITS, "-o", str(out), "--target-macs", "0.02", "--data", DIGITS_DATA,
                 "--save-ratios", str(ratios)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "budget cannot be met without pruning blocked groups (1 by the analysis, first: graph output" in err
    assert not out.exists() and not ratios.exists()


@pytest.mark.parametrize("args, expected", [
    (["--target-macs", "0.6", "--metric", "python:HOOK:f"], "the metric hook failed: ZeroDivisionError"),
    (["--target-macs", "0.6", "--ratio", "0.5"], "sets each group's ratio: drop --ratio"),
    (["--target-macs", "0.6", "--target-params", "0.5"], "give one budget"),
    (["--target-macs", "0"], "must be above 0"),
    (["--target-macs", "0.5", "--jobs", "0"], "--jobs 0 is outside [1, "),
    (["--ratio", "0.5", "--save-ratios", "R"], "--save-ratios needs a budget"),
    (["--target-macs", "0.6", "--budget-ratios", "0.5,1"], "--budget-ratios: each ratio must be in (0, 1)"),
    (["--group-ratios", "BAD"], "not JSON"),
])
def test_bad_budget_input_exits_2_and_writes_nothing(tmp_path, capsys, args, expected):
    hook = tmp_path / "hook.py"
    hook.write_text("def f(a, b):\n    return 1 / 0\n")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    subst = {"python:HOOK:f": f"python:{hook}:f", "R": str(tmp_path / "r.json"), "BAD": str(bad)}
    out = tmp_path / "b.onnx"
    code = main(["prune", DIGITS, "-o", str(out), *[subst.get(a, a) for a in args]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "r.json").exists()


def test_budget_from_a_saved_sensitivity_report(tmp_path, capsys):
    report_dir = tmp_path / "sens"
    assert main(["sensitivity", DIGITS, "--data", DIGITS_DATA, "--samples", "128", "--metric", "top1",
                 "--ratios", "0.2,0.4,0.6,0.8", "--latency-rounds", "0", "-o", str(report_dir)]) == 0
    out = tmp_path / "b.onnx"
    assert main(["prune", DIGITS, "-o", str(out), "--target-macs", "0.6", "--data", DIGITS_DATA,
                 "--sensitivity", str(report_dir / "report.json")]) == 0
    printed = capsys.readouterr().out
    assert "allocating from" in printed and "(metric top1), not measuring" in printed
    assert count_macs(load(str(out)), SHAPE) <= 0.6 * count_macs(load(DIGITS), SHAPE)
    for args, expected in ((["--target-latency", "0.6"], "the report has no latency"),
                           (["--target-macs", "0.6", "--criterion", "l1"], "ranked channels by l2, not l1")):
        code = main(["prune", DIGITS, "-o", str(tmp_path / "x.onnx"), *args,
                     "--sensitivity", str(report_dir / "report.json")])
        assert code == 2 and expected in capsys.readouterr().err
    other = resnet(depth=18, width=0.25, image=32, num_classes=10, dynamic_batch=True)
    with pytest.raises(UserError, match="the report's groups are not this model's"):
        prune_to_budget(other, random_inputs(other, {"input": (1, 3, 32, 32)}, samples=2), "macs", 0.6,
                        report=json.loads((report_dir / "report.json").read_text()))
    assert not (tmp_path / "x.onnx").exists()


def test_budget_tables_are_measured_at_the_round_to_the_budget_builds():
    # 37 kept channels where the build keeps 40 would measure another model (another MACs count, and
    # on ONNX Runtime other kernels): the sensitivity run rounds as the build does
    from graphprune.sensitivity import sensitivity

    model = load(DIGITS)
    data, _ = load_inputs(DIGITS_DATA, model)
    data = data.subset(range(16))
    for round_to in (1, 8):
        report = sensitivity(model, data, ratios=(0.3,), round_to=round_to, latency_rounds=0, jobs=1)
        assert report["round_to"] == round_to
        kept = {u["name"]: u["channels"] - u["entries"][1]["channels_removed"] for u in report["units"]}
        assert all(k % round_to == 0 for k in kept.values()), kept
        if round_to == 1:
            assert any(k % 8 for k in kept.values())  # without rounding the counts are not all multiples of 8
    with pytest.raises(UserError, match="multiples of 8, not 1"):
        prune_to_budget(model, data, "macs", 0.6, report=report)


def test_groups_that_lose_no_channel_do_not_pull_the_dominance_median_down():
    # with --round-to 8 the 8-channel groups lose nothing at any ratio (damage 0): they must not make
    # every group that does lose channels look dominating
    units = [{"name": f"narrow{i}", "entries": [{"ratio": 0.0, "damage": 0.0, "channels_removed": 0},
                                                {"ratio": 0.25, "damage": 0.0, "channels_removed": 0}]}
             for i in range(5)]
    for name, damage in (("wide1", 0.1), ("wide2", 0.12), ("wide3", 0.09), ("stem", 0.9)):
        units.append({"name": name, "entries": [{"ratio": 0.0, "damage": 0.0, "channels_removed": 0},
                                                {"ratio": 0.25, "damage": damage, "channels_removed": 8}]})
    assert list(dominating_groups({"units": units})) == ["stem"]

"""The cost model a MAC budget's speed tie-break uses, and the tie-break itself."""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphprune.pruning.budget import SPEED_DAMAGE, allocate
from graphprune.sensitivity.cost_model import CHANNEL_BLOCK, ELEMENT_MACS, modeled_cost


def _conv_model(channels: int, tail: str = "none") -> onnx.ModelProto:
    """x[1,16,8,8] -> 1x1 conv to ``channels`` -> tail: none, hardswish (the op), paddle (written out),
    se (a broadcast Mul by per-channel scales) or mul (a same-shape Mul)."""
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [channels, 16, 1, 1], rng.standard_normal(channels * 16))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"])]
    out = "c"
    if tail == "hardswish":
        nodes.append(helper.make_node("HardSwish", ["c"], ["y"]))
        out = "y"
    elif tail == "paddle":  # x * clip(x + 3, 0, 6) / 6
        inits += [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in
                  (("three", 3.0), ("zero", 0.0), ("six", 6.0))]
        nodes += [helper.make_node("Add", ["c", "three"], ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["k"]),
                  helper.make_node("Mul", ["c", "k"], ["m"]), helper.make_node("Div", ["m", "six"], ["y"])]
        out = "y"
    elif tail in ("se", "mul"):
        nodes.append(helper.make_node("GlobalAveragePool", ["c"], ["p"]) if tail == "se" else
                     helper.make_node("Identity", ["c"], ["p"]))
        nodes.append(helper.make_node("Mul", ["c", "p"], ["y"]))
        out = "y"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def test_channels_cost_by_the_runtime_block():
    # 24 channels compute as 32 in ONNX Runtime's 16-channel NCHWc blocks: pruning 32 -> 24 saves no time
    assert CHANNEL_BLOCK == 16
    assert modeled_cost(_conv_model(24)) == modeled_cost(_conv_model(32))
    assert modeled_cost(_conv_model(16)) == pytest.approx(modeled_cost(_conv_model(32)) / 2)
    # a 1x1 conv: padded MACs plus its output written, 64 positions each
    assert modeled_cost(_conv_model(16)) == pytest.approx(64 * 16 * 16 + ELEMENT_MACS * 64 * 16)


def test_hardswish_fused_into_the_conv_in_either_form():
    # ORT fuses HardSwish into the conv before it; Paddle's written-out form costs what canonicalize makes of it
    assert modeled_cost(_conv_model(16, "hardswish")) == modeled_cost(_conv_model(16))
    assert modeled_cost(_conv_model(16, "paddle")) == modeled_cost(_conv_model(16))


def test_squeeze_excitation_scaling_costs_its_reorders():
    conv = modeled_cost(_conv_model(16))
    same_shape = modeled_cost(_conv_model(16, "mul")) - conv
    se = modeled_cost(_conv_model(16, "se")) - conv  # the pool reads the map once, the Mul 3x (reorder out and back)
    assert same_shape == pytest.approx(ELEMENT_MACS * 64 * 16)
    assert se == pytest.approx(ELEMENT_MACS * 64 * 16 * 4)


def _report(groups, with_model: bool = True):
    """name -> (damage, MACs left, modeled time left) at ratio 0.5; the original costs 100 of each."""
    units = []
    for name, (damage, macs, modeled) in groups.items():
        entries = [{"ratio": 0.0, "damage": 0.0, "macs": 100, "modeled": 100.0},
                   {"ratio": 0.5, "damage": damage, "macs": macs, "modeled": modeled}]
        if not with_model:
            for e in entries:
                del e["modeled"]
        units.append({"name": name, "entries": entries})
    original = {"macs": 100, "params": 1, **({"modeled": 100.0} if with_model else {})}
    return {"by": "group", "metric": "top1", "original": original, "units": units}


def _additive(report):
    left = {u["name"]: 100 - u["entries"][1]["macs"] for u in report["units"]}
    return lambda ratios: (100 - sum(left[n] for n, r in ratios.items() if r > 0)) / 100


def test_speed_tie_break_takes_the_faster_plan_within_the_damage_bound():
    # 'wide' (an expansion at high resolution) saves the same MACs as 'stream' (channels inside one
    # block) with 1.5x the damage, and 15x the modeled time
    report = _report({"stream": (0.10, 70, 98.0), "wide": (0.15, 70, 70.0), "other": (0.5, 60, 60.0)})
    allocation = allocate(report, "macs", 0.7, _additive(report), speed=True)
    assert allocation.ratios == {"stream": 0.0, "wide": 0.5, "other": 0.0}
    assert allocation.modeled == pytest.approx(0.7) and allocation.measured == pytest.approx(0.7)
    # past SPEED_DAMAGE times the least damage, the least damage wins as before
    report = _report({"stream": (0.10, 70, 98.0), "wide": (0.10 * SPEED_DAMAGE + 0.01, 70, 70.0)})
    allocation = allocate(report, "macs", 0.7, _additive(report), speed=True)
    assert allocation.ratios == {"stream": 0.5, "wide": 0.0} and allocation.modeled == pytest.approx(0.98)


def test_no_tie_break_without_modeled_times_or_for_params():
    groups = {"stream": (0.10, 70, 98.0), "wide": (0.15, 70, 70.0)}
    old = _report(groups, with_model=False)  # a report from before the cost model (--sensitivity)
    allocation = allocate(old, "macs", 0.7, _additive(old), speed=True)
    assert allocation.ratios == {"stream": 0.5, "wide": 0.0} and allocation.modeled is None
    report = _report(groups)
    report["original"]["params"] = 100
    for u in report["units"]:
        for e in u["entries"]:
            e["params"] = e["macs"]
    allocation = allocate(report, "params", 0.7, _additive(report), speed=True)
    assert allocation.ratios == {"stream": 0.5, "wide": 0.0} and allocation.modeled is None


def test_prune_to_budget_breaks_ties_for_speed_with_round_to():
    from graphprune.data import load_inputs
    from graphprune.model_io import load
    from graphprune.sensitivity import prune_to_budget

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model = load(os.path.join(root, "models", "digits_cnn.onnx"))
    data = load_inputs(os.path.join(root, "models", "digits_test.npz"), model, [])[0].subset(range(64))
    run = lambda **kw: prune_to_budget(model, data, "macs", 0.6, ratios=(0.25, 0.5), metric="top1",  # noqa: E731
                                       jobs=1, **kw).allocation
    # channel counts for the runtime's blocks: the tie-break is on, and the uniform check compares modeled times
    blocked = run(round_to=4)
    assert blocked.modeled is not None and 0 < blocked.modeled < 1
    assert {"knapsack_modeled", "uniform_modeled"} <= set(blocked.checked)
    # without --round-to the least damage is all (an unrecovered model pays for every point of it)
    plain = run()
    assert plain.modeled is None and "uniform_modeled" not in plain.checked
    assert run(speed=True).modeled is not None

"""graphprune sensitivity: each unit pruned alone, damage/MACs/latency per ratio; report files; bad input."""

import json
import os

import numpy as np
import pytest

from graphprune.cli import main
from graphprune.data import load_inputs, random_inputs
from graphprune.model_io import load
from graphprune.sensitivity import sensitivity
from graphprune.testing import resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "models", "digits_cnn.onnx")
DIGITS_DATA = os.path.join(ROOT, "models", "digits_test.npz")


@pytest.fixture(scope="module")
def digits():
    model = load(DIGITS)
    data, _ = load_inputs(DIGITS_DATA, model)
    return model, data.subset(range(128))


@pytest.fixture(scope="module")
def small_cnn():
    model = resnet(depth=18, width=0.25, image=32, num_classes=10, dynamic_batch=True)
    return model, random_inputs(model, {"input": (1, 3, 32, 32)}, samples=8)


def test_digits_report_has_an_entry_per_group_and_ratio(digits):
    model, data = digits
    report = sensitivity(model, data, ratios=(0.1, 0.3, 0.5), jobs=1, latency_rounds=1)
    assert report["ratios"] == [0.0, 0.1, 0.3, 0.5]
    assert [u["name"] for u in report["units"]] == ["conv1.weight:0", "conv2.weight:0", "conv3.weight:0"]
    assert len(report["blocked"]) == 1  # the classifier's outputs
    for unit in report["units"]:
        entries = unit["entries"]
        assert [e["ratio"] for e in entries] == report["ratios"]
        assert entries[0]["damage"] == 0.0 and entries[0]["macs"] == report["original"]["macs"] == 599680
        damage = [e["damage"] for e in entries]
        assert all(d > 0 for d in damage[1:])
        assert damage[2] >= damage[1] and damage[3] >= damage[1]  # l2: monotone-ish in the ratio
        macs = [e["macs"] for e in entries]
        assert macs == sorted(macs, reverse=True) and macs[-1] < macs[0]
        assert [e["channels_removed"] for e in entries] == [int(np.floor(unit["channels"] * r + 1e-9))
                                                             for r in report["ratios"]]
        assert all(e["latency_fraction"] is not None and e["latency_fraction"] > 0 for e in entries)


def test_top1_metric_and_units_by_kind_and_stage(digits):
    model, data = digits
    by_stage = sensitivity(model, data, ratios=(0.5,), by="stage", metric="top1", jobs=1, latency_rounds=0)
    assert [u["name"] for u in by_stage["units"]] == ["stage 8x8", "stage 4x4"]
    assert sorted(k for u in by_stage["units"] for k in u["groups"]) == ["conv1.weight:0", "conv2.weight:0",
                                                                        "conv3.weight:0"]
    for unit in by_stage["units"]:
        assert 0.0 < unit["entries"][1]["damage"] <= 1.0  # a fraction of the samples whose top-1 changed
        assert unit["entries"][1]["latency_fraction"] is None  # latency skipped
    by_kind = sensitivity(model, data, ratios=(0.5,), by="kind", jobs=1, latency_rounds=0)
    assert [(u["name"], u["channels"]) for u in by_kind["units"]] == [("channels", 112)]


@pytest.mark.slow  # starting worker processes: seconds of imports each
def test_small_cnn_in_worker_processes_matches_one_process(small_cnn):
    model, data = small_cnn
    one = sensitivity(model, data, ratios=(0.5,), jobs=1, latency_rounds=0)
    two = sensitivity(model, data, ratios=(0.5,), jobs=2, latency_rounds=0)  # explicit: a process pool
    assert len(one["units"]) == len(two["units"]) >= 8
    for a, b in zip(one["units"], two["units"]):
        assert a["name"] == b["name"]
        assert a["entries"][1]["macs"] == b["entries"][1]["macs"] < one["original"]["macs"]
        assert a["entries"][1]["damage"] == pytest.approx(b["entries"][1]["damage"], rel=1e-5)


def test_cli_writes_table_json_plot_and_html(tmp_path, capsys):
    out = tmp_path / "report"
    hook = tmp_path / "metric.py"
    hook.write_text("import numpy as np\n"
                    "def disagreement(original, pruned):\n"
                    "    return float(np.mean(original['logits'].argmax(1) != pruned['logits'].argmax(1)))\n")
    code = main(["sensitivity", DIGITS, "--data", DIGITS_DATA, "--samples", "64", "--ratios", "0.25,0.5",
                 "--metric", f"python:{hook}:disagreement", "--latency-rounds", "1", "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "conv2.weight:0" in printed and "damage@0.25" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["metric"].endswith(":disagreement") and report["samples"] == 64
    assert len(report["units"]) == 3 and all(len(u["entries"]) == 3 for u in report["units"])
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "<table>" in page and "conv3.weight:0" in page


def test_plot_skipped_without_matplotlib(tmp_path, capsys, monkeypatch):
    import graphprune.sensitivity.plot as plot

    monkeypatch.setattr(plot, "have_matplotlib", lambda: False)
    out = tmp_path / "r"
    assert main(["sensitivity", DIGITS, "--samples", "8", "--ratios", "0.5", "--latency-rounds", "0",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "seeded random inputs" in printed and "plot skipped: matplotlib is not installed" in printed
    assert sorted(os.listdir(out)) == ["report.html", "report.json"]
    assert "plot skipped" in (out / "report.html").read_text()


@pytest.mark.parametrize("hook, expected", [
    ("def f(a, b):\n    raise ValueError('boom')\n", "the metric hook failed: ValueError: boom"),
    ("def f(a, b):\n    return float('nan')\n", "returned nan, not a finite number"),
    ("g = 1\n", "defines no function f"),
])
def test_bad_metric_hook_exits_2_and_writes_nothing(tmp_path, capsys, hook, expected):
    path = tmp_path / "hook.py"
    path.write_text(hook)
    out = tmp_path / "report"
    code = main(["sensitivity", DIGITS, "--data", DIGITS_DATA, "--metric", f"python:{path}:f", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("args, expected", [
    (["--ray"], "ray is not installed"),
    (["--ratios", "0.5,1.2"], "each ratio must be in (0, 1)"),
    (["--by", "layer"], "--by 'layer'"),
    (["--metric", "l3"], "choose rel-l2, top1 or python:FILE.py:FUNCTION"),
    (["--jobs", "0"], "--jobs 0 is outside [1, "),
    (["--jobs", "100000"], "--jobs 100000 is outside [1, "),
])
def test_bad_options_exit_2_and_write_nothing(tmp_path, capsys, args, expected):
    out = tmp_path / "report"
    code = main(["sensitivity", DIGITS, "--data", DIGITS_DATA, "-o", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_ray_path_with_a_stand_in_cluster(digits, monkeypatch):
    """The --ray code path on a stand-in ``ray`` module that runs remote tasks in this process."""
    import sys
    import types

    calls = {}
    fake = types.ModuleType("ray")
    fake.init = lambda **kwargs: calls.setdefault("init", kwargs)
    fake.put = lambda value: value
    fake.get = lambda refs: list(refs)
    fake.cluster_resources = lambda: {"CPU": 3.0}

    def remote(fn):
        return types.SimpleNamespace(remote=lambda *args: fn(*args))

    fake.remote = remote
    monkeypatch.setitem(sys.modules, "ray", fake)
    model, data = digits
    via_ray = sensitivity(model, data, ratios=(0.5,), use_ray=True, latency_rounds=0)
    local = sensitivity(model, data, ratios=(0.5,), jobs=1, latency_rounds=0)
    assert calls["init"]["ignore_reinit_error"] and via_ray["jobs"] == "ray"
    assert [u["entries"] for u in via_ray["units"]] == [u["entries"] for u in local["units"]]

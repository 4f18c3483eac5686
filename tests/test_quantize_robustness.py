"""``quantize`` on what real models hold: infinite ranges stay float, a failing candidate is discarded
(not fatal), a placement that wrecks the outputs never wins on speed, and timing is CPU time."""

from __future__ import annotations

import importlib
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.cli import main
from graphprune.passes.insert_qdq import InsertQDQPass
from graphprune.quantization import measure
from graphprune.quantization.calibration import nonfinite_ranges, without
from graphprune.quantization.measure import Candidate, drop_wrecked, error_limit, measure_latencies, output_error
from graphprune.runtime import make_session, run

# the package re-exports the function insert_qdq under the module's name: fetch the module
insert_qdq_module = importlib.import_module("graphprune.passes.insert_qdq")

D, SEQ = 64, 32


def t5_buckets(d: int = D) -> onnx.ModelProto:
    """T5's relative-position buckets beside a MatMul that quantizes.

    ``Log`` of the positions 0..S-1 holds -inf at 0 by design; ``Mul`` scales it, ``Cast`` to int64
    turns -inf into INT64_MIN, and ``Where`` keeps the small positions as they are, so float never
    indexes with it.  Quantizing the Mul gives every element a NaN, the large positions then index
    out of the Gather's table: the crash ``quantize`` had on T5.
    """
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "one"], ["n"], name="n", axis=0),
        helper.make_node("Range", ["zero", "n", "one"], ["pos"], name="range"),
        helper.make_node("Cast", ["pos"], ["rel"], name="rel", to=TensorProto.FLOAT),
        helper.make_node("Log", ["rel"], ["logrel"], name="log"),
        helper.make_node("Mul", ["logrel", "k"], ["scaled"], name="bucket_mul"),
        helper.make_node("Cast", ["scaled"], ["large_i"], name="cast", to=TensorProto.INT64),
        helper.make_node("Add", ["large_i", "four"], ["large4"], name="add4"),
        helper.make_node("Min", ["large4", "seven"], ["large"], name="min7"),
        helper.make_node("Less", ["rel", "four_f"], ["small"], name="less"),
        helper.make_node("Where", ["small", "pos", "large"], ["bucket"], name="where"),
        helper.make_node("Gather", ["table", "bucket"], ["bias"], name="gather", axis=0),
        helper.make_node("Add", ["y", "bias"], ["out"], name="add_out"),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32), "W"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1.5, np.float32), "k"),
        numpy_helper.from_array(np.array(4, np.int64), "four"),
        numpy_helper.from_array(np.array(7, np.int64), "seven"),
        numpy_helper.from_array(np.array(4.0, np.float32), "four_f"),
        numpy_helper.from_array(rng.standard_normal((8, d)).astype(np.float32), "table"),
    ]
    # the sequence axis is dynamic, so Range is computed at run time (not folded by ORT)
    graph = helper.make_graph(nodes, "t5_buckets", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", d])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, "s", d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def swiglu_mlp(d: int = 128, seq: int = 64) -> onnx.ModelProto:
    """MatMul -> SiLU -> MatMul -> residual Add: the cost model and all-eligible place differently."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
        helper.make_node("Sigmoid", ["a"], ["s"], name="sig"),
        helper.make_node("Mul", ["a", "s"], ["g"], name="silu"),
        helper.make_node("MatMul", ["g", "W2"], ["b"], name="mm2"),
        helper.make_node("Add", ["b", "x"], ["out"], name="residual"),
    ]
    inits = [numpy_helper.from_array((rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32), n)
             for n in ("W1", "W2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, d])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, seq, d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feed(seq: int = SEQ):
    return {"x": np.random.default_rng(1).standard_normal((1, seq, D)).astype(np.float32)}


# --- infinite ranges and failing candidates ------------------------------------------------------

@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_an_infinite_range_is_never_quantized_and_says_why(method):
    model = t5_buckets()
    result = InsertQDQPass(input_shapes={"x": (1, SEQ, D)}, method=method)(model)
    stats = result.stats
    assert "not finite" in stats["float_layers"]["bucket_mul"] and "-inf" in stats["float_layers"]["bucket_mul"]
    assert stats["discarded"] == {}  # no candidate touched the -inf tensor, none failed
    assert all(c["error"] < 0.1 for c in stats["candidates"].values())
    quantized = [n.name for n in result.model.graph.node if n.op_type == "QuantizeLinear"]
    assert not any("logrel" in q or "scaled" in q for q in quantized)
    # whatever was written runs, at another sequence length too
    for seq in (SEQ, 9):
        got = run(make_session(result.model), _feed(seq))["out"]
        want = run(make_session(model), _feed(seq))["out"]
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=0, atol=0.1 * np.abs(want).max())


def test_a_candidate_that_fails_to_run_is_discarded_with_a_note(monkeypatch):
    # Without the range check, the all-eligible placement quantizes the -inf Mul and ORT's Gather
    # fails on INT64_MIN: that candidate must drop out, the command must go on.
    monkeypatch.setattr(insert_qdq_module, "nonfinite_ranges", lambda ranges: {})
    result = InsertQDQPass(input_shapes={"x": (1, SEQ, D)})(t5_buckets())
    note = result.stats["discarded"]["all-eligible"]
    assert note.startswith("failed to build or run") or "inf/NaN" in note
    assert "all-eligible" not in result.stats["candidates"]
    assert result.stats["chosen"] != "all-eligible"
    run(make_session(result.model), _feed())  # the model written runs


def test_quantize_cli_on_t5_buckets_exits_0_listing_the_infinite_range(tmp_path, capsys):
    src, out = tmp_path / "t5.onnx", tmp_path / "q.onnx"
    onnx.save(t5_buckets(), str(src))
    assert main(["quantize", str(src), "-o", str(out), "--input-shape", f"x=1x{SEQ}x{D}"]) == 0
    printed = capsys.readouterr().out
    assert "calibrated range of 'logrel' is not finite (-inf" in printed and "bucket_mul" in printed
    run(make_session(onnx.load(str(out))), _feed())


def test_nonfinite_ranges_finds_inf_and_nan_and_without_drops_them():
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

    f = np.float32
    ranges = TensorsData(CalibrationMethod.MinMax, {
        "ok": (np.array(-1, f), np.array(2, f)),
        "neg_inf": (np.array(-np.inf, f), np.array(2, f)),
        "nan": (np.array(np.nan, f), np.array(np.nan, f)),
    })
    found = nonfinite_ranges(ranges)
    assert set(found) == {"neg_inf", "nan"} and found["neg_inf"][0] == -np.inf
    assert list(without(ranges, found)) == ["ok"]
    assert without(ranges, {}) is ranges


def test_output_error_ignores_the_references_own_infinities_and_catches_new_ones():
    # Identity model: its output is its input, so the reference decides what counts
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([-np.inf, 1.0, 2.0], np.float32)
    assert output_error(model, [{"x": x}], [{"y": x}]) == 0.0  # -inf where the reference has -inf
    finite_ref = np.array([0.0, 1.0, 2.0], np.float32)
    assert output_error(model, [{"x": x}], [{"y": finite_ref}]) == float("inf")


# --- the default error guard -----------------------------------------------------------------------

def test_error_limit_is_3x_or_plus_0_05_whichever_is_larger():
    assert error_limit(0.03) == pytest.approx(0.09)
    assert error_limit(0.001) == pytest.approx(0.051)
    assert error_limit(0.0) == pytest.approx(0.05)


def test_drop_wrecked_drops_gpt2s_all_eligible_and_keeps_close_candidates():
    gpt2 = [Candidate("cost-model", None, frozenset({"a"}), error=0.030),
            Candidate("all-eligible", None, frozenset({"a", "b"}), error=0.657)]
    kept, dropped = drop_wrecked(gpt2)
    assert [c.name for c in kept] == ["cost-model"]
    assert "0.657 is far above the best candidate's 0.03" in dropped["all-eligible"]
    near = [Candidate("a", None, frozenset({"a"}), error=0.001), Candidate("b", None, frozenset({"b"}), error=0.004)]
    assert drop_wrecked(near) == (near, {})
    assert drop_wrecked([]) == ([], {})


def _wreck_all_eligible(monkeypatch):
    """all-eligible's measured error becomes 0.657 and it times fastest: only the guard stops it."""
    build = insert_qdq_module._Planner._build

    def worse(self, name, int8, note=True):
        candidate = build(self, name, int8, note)
        if candidate is not None and name == "all-eligible":
            candidate.error = 0.657
        return candidate

    def timings(models, feed, threads, rounds, **kwargs):
        return {name: {"float": 10.0, "all-eligible": 4.0}.get(name, 5.0) for name in models}

    monkeypatch.setattr(insert_qdq_module._Planner, "_build", worse)
    monkeypatch.setattr(insert_qdq_module, "measure_latencies", timings)


def test_a_much_worse_candidate_never_wins_on_speed(monkeypatch):
    model = swiglu_mlp()
    before = InsertQDQPass()(model).stats
    assert {"cost-model", "all-eligible"} <= set(before["candidates"])  # the fixture has both
    _wreck_all_eligible(monkeypatch)
    stats = InsertQDQPass()(model).stats
    assert stats["chosen"] == "cost-model" and stats["error"] < 0.1
    assert "far above the best candidate's" in stats["discarded"]["all-eligible"]
    assert "all-eligible" not in stats["candidates"]


def test_with_max_error_the_budget_judges_instead_of_the_guard(monkeypatch):
    model = swiglu_mlp()
    _wreck_all_eligible(monkeypatch)
    x = np.random.default_rng(3).standard_normal((4, 1, 64, 128)).astype(np.float32)
    stats = InsertQDQPass(data=[{"x": v} for v in x], max_error=0.7)(model).stats
    assert stats["chosen"] == "all-eligible" and stats["discarded"] == {}


def test_quantize_cli_prints_discarded_candidates(monkeypatch, tmp_path, capsys):
    _wreck_all_eligible(monkeypatch)
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(swiglu_mlp(), str(src))
    assert main(["quantize", str(src), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "all-eligible  discarded: output rel L2 0.657 is far above" in printed
    assert "chosen: cost-model" in printed


# --- timing: CPU time, interleaved -----------------------------------------------------------------

def test_cpu_clock_is_the_threads_with_one_thread_and_the_process_with_more():
    assert measure.cpu_clock(1) is time.thread_time
    assert measure.cpu_clock(4) is time.process_time


def test_time_off_the_cpu_does_not_count(monkeypatch):
    # A busy machine takes the CPU away from our thread: here, a sleep inside every run.  Wall time
    # would grow by 20 ms per run; the measured CPU time must not.
    real = measure.make_session

    class Descheduled:
        def __init__(self, session):
            self._session = session

        def run(self, names, feed):
            time.sleep(0.02)
            return self._session.run(names, feed)

    monkeypatch.setattr(measure, "make_session", lambda model, **kw: Descheduled(real(model, **kw)))
    latencies = measure_latencies({"m": swiglu_mlp()}, {"x": np.ones((1, 64, 128), np.float32)},
                                  threads=1, rounds=2, budget_seconds=0.01)
    assert latencies["m"] < 0.01


def test_a_model_that_cannot_run_is_reported_not_raised():
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "bad",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array([3], np.int64), "shape")])
    bad = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ok = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "ok",
                                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])]),
                           opset_imports=[helper.make_opsetid("", 17)])
    failures = {}
    latencies = measure_latencies({"ok": ok, "bad": bad}, {"x": np.ones(4, np.float32)}, rounds=2,
                                  budget_seconds=0.01, failures=failures)
    assert set(latencies) == {"ok"} and "bad" in failures
    with pytest.raises(Exception):
        measure_latencies({"bad": bad}, {"x": np.ones(4, np.float32)}, rounds=1, budget_seconds=0.01)

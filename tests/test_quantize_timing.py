"""Timing of candidates: interleaved sessions for small models, one session at a time for large ones."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from graphprune.model_io import load
from graphprune.quantization import measure
from graphprune.quantization.measure import measure_latencies
from tests.test_quantize_pass import dense_cnn, matmul_net


class _Tracked:
    """A session wrapper counting how many sessions are alive at once."""

    alive = 0
    peak = 0

    def __init__(self, session):
        self._session = session
        _Tracked.alive += 1
        _Tracked.peak = max(_Tracked.peak, _Tracked.alive)

    def run(self, names, feed):
        return self._session.run(names, feed)

    def __del__(self):
        _Tracked.alive -= 1


@pytest.fixture
def tracked(monkeypatch):
    real = measure._session
    monkeypatch.setattr(measure, "_session", lambda *a, **kw: _Tracked(real(*a, **kw)))
    _Tracked.alive = _Tracked.peak = 0
    return _Tracked


def _feed(model: onnx.ModelProto):
    vi = model.graph.input[0]
    shape = [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
    return {vi.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def _models():
    return {"float": dense_cnn(), "other": dense_cnn(seed=1), "third": dense_cnn(seed=2)}


def test_small_in_memory_models_are_timed_in_sessions_held_together(tracked):
    models = _models()
    latencies = measure_latencies(models, _feed(models["float"]), threads=1, rounds=2, budget_seconds=0.05)
    assert set(latencies) == set(models) and all(v > 0 for v in latencies.values())
    assert tracked.peak == len(models)


def test_large_models_are_timed_one_session_at_a_time(tracked, monkeypatch):
    monkeypatch.setattr(measure, "ONE_SESSION_BYTES", 0)
    models = _models()
    latencies = measure_latencies(models, _feed(models["float"]), threads=1, rounds=5, budget_seconds=0.05)
    assert set(latencies) == set(models) and all(v > 0 for v in latencies.values())
    assert tracked.peak == 1 and tracked.alive == 0


def test_weights_left_on_disk_are_timed_one_session_at_a_time(tracked, tmp_path):
    path = os.path.join(str(tmp_path), "m.onnx")
    onnx.save_model(dense_cnn(), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.bin", size_threshold=0)
    lazy = load(path, load_external_data=False)
    models = {"float": lazy, "copy": onnx.ModelProto.FromString(lazy.SerializeToString())}
    latencies = measure_latencies(models, _feed(lazy), threads=1, budget_seconds=0.05, source_dir=str(tmp_path))
    assert set(latencies) == set(models)
    assert tracked.peak == 1


def test_a_model_that_fails_in_turns_is_reported(monkeypatch):
    monkeypatch.setattr(measure, "ONE_SESSION_BYTES", 0)
    bad = matmul_net()
    bad.graph.input[0].type.tensor_type.shape.dim[-1].dim_value += 1  # the feed no longer fits
    good = matmul_net()
    failures = {}
    latencies = measure_latencies({"good": good, "bad": bad}, _feed(good), threads=1, budget_seconds=0.02,
                                  failures=failures)
    assert set(latencies) == {"good"} and "bad" in failures
    with pytest.raises(Exception):
        measure_latencies({"bad": bad}, _feed(good), threads=1, budget_seconds=0.02)


def test_large_model_candidates_built_again_give_the_same_result(monkeypatch):
    """Candidates of large models keep only their placement between builds; the written model is
    byte-identical to the one kept in memory (the timings are fixed so that both runs choose alike)."""
    import importlib

    from graphprune.passes.insert_qdq import InsertQDQPass
    from tests.test_quantize_pass import samples

    insert_qdq_module = importlib.import_module("graphprune.passes.insert_qdq")
    built = []

    def fixed_timings(models, feed, threads, rounds, failures, source_dir=None):
        for name, model in models.items():
            built.append(callable(model))
            assert isinstance(model() if callable(model) else model, onnx.ModelProto)
        return {name: (10.0 if name == "float" else 1.0 + 0.5 * i) for i, name in enumerate(models)}

    monkeypatch.setattr(insert_qdq_module, "measure_latencies", fixed_timings)
    model, data = dense_cnn(), samples(dense_cnn())
    kept = InsertQDQPass(data=data)(model)
    assert built and not any(built)
    built.clear()
    monkeypatch.setattr(measure, "ONE_SESSION_BYTES", 0)
    rebuilt = InsertQDQPass(data=data)(model)
    assert built[1:] and all(built[1:])  # every candidate built again, the float model held
    assert rebuilt.modified and rebuilt.stats["chosen"] == kept.stats["chosen"]
    assert rebuilt.model.SerializeToString(deterministic=True) == kept.model.SerializeToString(deterministic=True)

"""Batched runs over samples: outputs written into preallocated arrays (held once), the same as
concatenating the batches, and streamed batch by batch for callers that reduce."""

import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.data import InputSet
from graphprune.runtime import iter_outputs, make_session, run, run_samples


def _wide_model(width: int = 6, fixed_batch=None) -> onnx.ModelProto:
    """x [N, 4] -> y = x @ W [N, width]; ``c``: a constant [3] that does not follow the batch."""
    w = np.arange(4 * width, dtype=np.float32).reshape(4, width) / 7
    batch = fixed_batch if fixed_batch else "N"
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Identity", ["k"], ["c"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, width]),
         helper.make_tensor_value_info("c", TensorProto.INT64, [3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([1, 2, 3], np.int64), "k")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _concatenated(session, samples, batch_size):
    """The reference: every batch's outputs collected, then concatenated on axis 0."""
    parts = {}
    for feed in samples.batches(batch_size):
        for name, value in run(session, feed).items():
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(values, axis=0) for name, values in parts.items()}


@pytest.mark.parametrize("samples, batch_size, fixed", [(10, 3, None), (10, 4, None), (9, 32, None), (1, 32, None),
                                                        (8, 32, 2), (12, 5, 3)])
def test_run_samples_equals_the_concatenated_batches(samples, batch_size, fixed):
    """Bit for bit, including the last short batch, a fixed batch, one batch only, and an output
    (``c``) whose first axis does not follow the samples (collected and concatenated as before)."""
    rng = np.random.default_rng(samples)
    data = InputSet({"x": rng.standard_normal((samples * (fixed or 1), 4)).astype(np.float32)}, fixed_batch=fixed)
    session = make_session(_wide_model(fixed_batch=fixed))
    got = run_samples(session, data, batch_size=batch_size)
    want = _concatenated(session, data, batch_size)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_iter_outputs_streams_one_batch_at_a_time():
    data = InputSet({"x": np.ones((7, 4), np.float32)})
    session = make_session(_wide_model())
    counts = [(count, outputs["y"].shape[0]) for count, outputs in iter_outputs(session, data, batch_size=3)]
    assert counts == [(3, 3), (3, 3), (1, 1)]


class _TracedSession:
    """An ORT session whose outputs are numpy's own arrays: tracemalloc sees numpy's buffers, not
    the runtime's, so the runtime's batch outputs are copied to be counted."""

    def __init__(self, session):
        self.session = session

    def get_outputs(self):
        return self.session.get_outputs()

    def run(self, names, feed):
        return [value.copy() for value in self.session.run(names, feed)]


def numpy_peaks(*calls) -> list:
    """The peak of Python-allocated memory (numpy's buffers included) during each call, in bytes."""
    peaks = []
    tracemalloc.start()
    try:
        for call in calls:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            result = call()
            peaks.append(tracemalloc.get_traced_memory()[1] - base)
            del result
    finally:
        tracemalloc.stop()
    return peaks


def test_outputs_are_held_once():
    """Memory: the peak of numpy memory while stacking large outputs is one copy of them plus a
    batch or two; collecting the batches and concatenating them needed two copies."""
    width, samples, batch = 8192, 256, 32
    data = InputSet({"x": np.ones((samples, 4), np.float32)})
    session = _TracedSession(make_session(_wide_model(width)))
    total = samples * width * 4  # the output y: 8 MiB
    peaks = numpy_peaks(lambda: run_samples(session, data, batch), lambda: _concatenated(session, data, batch))
    assert peaks[1] >= 2 * total  # the negative control: the old way held them twice
    assert peaks[0] <= total + 3 * total * batch // samples  # one copy, plus the batch being written in

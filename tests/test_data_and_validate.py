"""Samples (.npz and random), --input-shape parsing, and the validator's numbers."""

import numpy as np
import pytest

from graphprune.data import load_inputs, parse_input_shape, random_inputs
from graphprune.errors import UserError
from graphprune.validate import compare_outputs, validate
from tests.helpers import conv_model


def test_parse_input_shape():
    assert parse_input_shape("x=1x3x224x224") == ("x", (1, 3, 224, 224))
    assert parse_input_shape("a=b=2x3") == ("a=b", (2, 3))
    for bad in ("x", "x=", "x=1xAx2", "x=0x3"):
        with pytest.raises(UserError, match="--input-shape"):
            parse_input_shape(bad)


def test_random_inputs_need_dynamic_dims():
    with pytest.raises(UserError, match=r"dynamic dims \['N'\].*--input-shape x=Nx3x8x8"):
        random_inputs(conv_model(dynamic_batch=True))
    data = random_inputs(conv_model(dynamic_batch=True), {"x": (2, 3, 8, 8)}, samples=3, seed=1)
    assert data.arrays["x"].shape == (6, 3, 8, 8) and data.fixed_batch == 2
    again = random_inputs(conv_model(dynamic_batch=True), {"x": (2, 3, 8, 8)}, samples=3, seed=1)
    np.testing.assert_array_equal(data.arrays["x"], again.arrays["x"])


def test_input_shape_must_agree_with_fixed_dims():
    with pytest.raises(UserError, match="dim 1 is 4 but the model fixes it to 3"):
        random_inputs(conv_model(), {"x": (1, 4, 8, 8)})
    with pytest.raises(UserError, match="not a model input"):
        random_inputs(conv_model(), {"nope": (1, 3, 8, 8)})


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"other": np.zeros((2, 3, 8, 8), np.float32)}, "no array for model input 'x'"),
        ({"x": np.zeros((2, 3, 8), np.float32)}, "rank 3"),
        ({"x": np.zeros((2, 3, 9, 8), np.float32)}, r"expects \['N', 3, 8, 8\]"),
        ({"x": np.zeros((2, 3, 8, 8), np.int64)}, "dtype int64"),
    ],
)
def test_npz_that_does_not_match_the_inputs(tmp_path, arrays, message):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=message):
        load_inputs(path, conv_model())


def test_npz_casts_float64_and_returns_extras(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 3, 8, 8)), labels=np.arange(4))
    data, extras = load_inputs(path, conv_model(), extra_keys=["labels"])
    assert data.arrays["x"].dtype == np.float32 and len(data) == 4
    assert list(extras["labels"]) == [0, 1, 2, 3]
    with pytest.raises(UserError, match="no array named 'y'"):
        load_inputs(path, conv_model(), extra_keys=["y"])


def test_compare_outputs_numbers():
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], np.float32)
    same = compare_outputs("y", ref, ref.copy())
    assert same.max_abs_diff == 0 and same.rel_l2 == 0 and same.cosine == pytest.approx(1.0) and same.top1_agreement == 1.0
    flipped = compare_outputs("y", ref, ref[:, ::-1].copy())
    assert flipped.top1_agreement == 0.0
    assert flipped.max_abs_diff == pytest.approx(2.0)
    assert flipped.rel_l2 == pytest.approx(np.sqrt(16 / 28))
    with pytest.raises(UserError, match="shape"):
        compare_outputs("y", ref, ref[:1])


def test_validate_identical_models_report_zero_difference():
    model = conv_model()
    report = validate(model, model, input_shapes={"x": (2, 3, 8, 8)}, samples=3, latency_runs=3)
    assert report.samples == 6  # 3 feeds of batch 2
    assert report.worst_rel_l2 == 0.0
    assert report.before.params == report.after.params == 4 * 27 + 4 + 20
    assert report.before.macs == 2 * (4 * 64 * 27 + 20)
    assert report.latency_before > 0 and report.latency_after > 0
    assert "rel L2" in report.format_table()


def test_validate_reports_differences_and_accuracy():
    model = conv_model(dynamic_batch=False)
    other = conv_model(dynamic_batch=False, seed=5)
    data = random_inputs(model, samples=16, seed=0)
    labels = np.zeros(16, np.int64)
    report = validate(model, other, data=data, labels=labels, latency=False)
    assert report.worst_rel_l2 > 0.1
    assert 0 <= report.accuracy_before <= 1 and 0 <= report.accuracy_after <= 1
    assert report.latency_before is None
    with pytest.raises(UserError, match="labels"):
        validate(model, other, data=data, labels=np.zeros(3, np.int64), latency=False)


def test_interleaved_latencies_times_every_model():
    from graphprune.runtime import interleaved_latencies

    feed = {"x": np.ones((1, 3, 8, 8), np.float32)}
    times = interleaved_latencies([conv_model(), conv_model(width=8)], feed, threads=1, runs=3)
    assert len(times) == 2 and all(t > 0 for t in times)


def test_validate_refuses_models_with_other_outputs_before_comparing():
    import onnx

    model = conv_model(dynamic_batch=False)
    extra = onnx.ModelProto()
    extra.CopyFrom(model)
    extra.graph.output.append(onnx.helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [1, 4, 8, 8]))
    with pytest.raises(UserError, match="different outputs"):
        validate(model, extra, latency=False)


def _validate_pair(width=6, shift=0.3):
    """A model and a candidate whose weight differs, from ``tests.test_runtime_samples``."""
    from onnx import numpy_helper

    from tests.test_runtime_samples import _wide_model

    model, other = _wide_model(width), _wide_model(width)
    w = numpy_helper.to_array(other.graph.initializer[0])
    other.graph.initializer[0].CopyFrom(numpy_helper.from_array((w + shift * np.sin(np.arange(w.size)).reshape(w.shape)).astype(np.float32), "w"))
    return model, other


def test_validate_streams_batches_with_the_whole_arrays_numbers():
    """Oracle: the batch-by-batch comparison (three batches, the last short) reports what
    ``compare_outputs`` and ``accuracy`` report on the whole stacked outputs: the maximum, the top-1
    agreement and the accuracy exactly, the norms to float64 rounding."""
    from graphprune.data import InputSet
    from graphprune.runtime import make_session, run_samples
    from graphprune.validate import accuracy

    model, other = _validate_pair()
    rng = np.random.default_rng(0)
    data = InputSet({"x": rng.standard_normal((70, 4)).astype(np.float32)})
    labels = rng.integers(0, 6, 70)
    report = validate(model, other, data=data, labels=labels, latency=False)
    a, b = run_samples(make_session(model), data), run_samples(make_session(other), data)
    assert [o.name for o in report.outputs] == ["y", "c"]
    for got in report.outputs:
        want = compare_outputs(got.name, a[got.name], b[got.name])
        assert got.shape == want.shape and got.max_abs_diff == want.max_abs_diff
        assert got.top1_agreement == want.top1_agreement
        assert got.rel_l2 == pytest.approx(want.rel_l2, rel=1e-12, abs=1e-15)
        assert got.cosine == pytest.approx(want.cosine, rel=1e-12)
    assert report.outputs[0].rel_l2 > 0.01 and report.outputs[0].top1_agreement < 1
    assert report.accuracy_before == accuracy(a["y"], labels) and report.accuracy_after == accuracy(b["y"], labels)
    constant_first = _validate_pair()[0]
    constant_first.graph.output.insert(0, constant_first.graph.output.pop(1))  # scores that do not follow the samples
    with pytest.raises(UserError, match="does not hold one row of scores per sample"):
        validate(constant_first, constant_first, data=data, labels=labels, latency=False)


def test_validate_holds_one_batch_of_outputs(monkeypatch):
    """Memory: the numpy peak of ``validate`` on 64 batches stays near one batch of each model's
    outputs and its float64 copies; stacking both outputs and comparing the whole arrays (the
    negative control) needed both outputs and float64 copies of the whole."""
    import importlib

    from graphprune.data import InputSet
    from graphprune.runtime import make_session, run_samples
    from tests.test_runtime_samples import _TracedSession, numpy_peaks

    width, samples, batch = 512, 2048, 32
    model, other = _validate_pair(width)
    data = InputSet({"x": np.ones((samples, 4), np.float32)})
    validate_module = importlib.import_module("graphprune.validate")  # the package's ``validate`` is the function
    traced = lambda m, **kw: _TracedSession(make_session(m, **kw))  # noqa: E731
    monkeypatch.setattr(validate_module, "make_session", traced)
    total, one_batch = samples * width * 4, batch * width * 4
    validate(model, other, data=data.subset([0]), latency=False)  # first-call imports, not measured

    def stacked():
        a, b = run_samples(traced(model), data), run_samples(traced(other), data)
        return compare_outputs("y", a["y"], b["y"])

    peaks = numpy_peaks(lambda: validate(model, other, data=data, latency=False), stacked)
    assert peaks[1] > 4 * total  # both outputs, then float64 copies of each
    assert peaks[0] < 8 * one_batch <= total / 8  # a batch of each, their float64 copies, and the rest small


def test_npz_nan_found_in_any_slice_names_its_sample(tmp_path, monkeypatch):
    """The finite check runs over slices of samples (a small mask beside large data): a NaN in a
    later slice is found and named by its sample; a float64 file is cast and checked alike."""
    import graphprune.data as data_module

    monkeypatch.setattr(data_module, "_FINITE_SLICE", 3 * 8 * 8 * 2)  # two samples a slice
    values = np.zeros((6, 3, 8, 8))
    values[5, 1, 2, 3] = np.nan
    np.savez(tmp_path / "d.npz", x=values)
    with pytest.raises(UserError, match=r"'x' holds NaN or Inf values \(sample 5\)"):
        load_inputs(tmp_path / "d.npz", conv_model(dynamic_batch=True))
    values[5, 1, 2, 3] = 1.0
    np.savez(tmp_path / "d.npz", x=values)
    inputs, _ = load_inputs(tmp_path / "d.npz", conv_model(dynamic_batch=True))
    assert inputs.arrays["x"].dtype == np.float32 and inputs.arrays["x"][5, 1, 2, 3] == 1.0

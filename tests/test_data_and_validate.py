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

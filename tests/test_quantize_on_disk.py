"""quantize on a model whose weights stay in their external-data file: the in-memory result, weights read one at a time."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphprune import ir
from graphprune.cli import main
from graphprune.model_io import load
from graphprune.passes.insert_qdq import InsertQDQPass
from graphprune.quantization import calibration
from graphprune.quantization.calibration import as_feeds, calibrate, minmax_ranges
from graphprune.quantization.config import QuantConfig
from graphprune.quantization.measure import reference_outputs
from graphprune.weights_on_disk import read_tensor, session
from graphprune.quantization.prepare import prepare
from graphprune.runtime import make_session, run_samples
from graphprune.validate import compare_outputs
from tests.test_quantize_pass import dense_cnn, samples


def _external(model: onnx.ModelProto, folder) -> str:
    """``model`` saved with every tensor in one side file (``w.bin``); its path."""
    path = os.path.join(str(folder), "m.onnx")
    onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), path, save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    return path


@pytest.fixture
def large(monkeypatch):
    """Small models take the large-model path (canonicalize, not ORT's pre-processing), as a model
    with weights left on disk always does, so that both forms compare like for like."""
    monkeypatch.setattr(ir, "LARGE_MODEL_BYTES", 0)


def _values(model: onnx.ModelProto, folder: str):
    return {t.name: read_tensor(t, folder) for t in model.graph.initializer}


def test_weights_left_on_disk_quantize_as_loaded_ones(tmp_path, large):
    path = _external(dense_cnn(), tmp_path)
    data = samples(dense_cnn())
    in_memory = InsertQDQPass(data=data, measure=False)(load(path))
    lazy = load(path, load_external_data=False)
    on_disk = InsertQDQPass(data=data, measure=False, source_dir=str(tmp_path))(lazy)
    assert on_disk.modified and in_memory.modified
    assert on_disk.stats["quantized_ops"] == in_memory.stats["quantized_ops"]
    assert [(n.op_type, list(n.input)) for n in on_disk.model.graph.node] == \
        [(n.op_type, list(n.input)) for n in in_memory.model.graph.node]
    # Identical int8 weights; a range behind the Gemm may differ in its last bit (the streamed
    # calibration runs without weight pre-packing, and packed and plain float GEMMs round differently)
    got, want = _values(on_disk.model, str(tmp_path)), _values(in_memory.model, str(tmp_path))
    assert got.keys() == want.keys()
    for name in want:
        if want[name].dtype.kind == "f":
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=0, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert on_disk.stats["error"] == pytest.approx(in_memory.stats["error"], rel=1e-5)
    # the input stayed records (no weight was loaded into it), and so did every float weight left
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in lazy.graph.initializer)
    inline_float = [t.name for t in on_disk.model.graph.initializer
                    if t.data_type == onnx.TensorProto.FLOAT and t.data_location != onnx.TensorProto.EXTERNAL
                    and t.dims and np.prod(t.dims) > 64]
    assert inline_float == []


def test_streamed_minmax_equals_ort_calibrator():
    model = prepare(dense_cnn())
    feeds = as_feeds(samples(model, n=5))
    ours = minmax_ranges(model, feeds)
    ort = calibrate(model, feeds, QuantConfig("minmax", True, "uint8", 64))
    assert set(ours.data) == set(ort.data)
    for name in ort.data:
        for a, b in zip(ours[name].range_value, ort[name].range_value):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert len(model.graph.output) == 1  # the exposed tensors were removed again


@pytest.mark.parametrize("chunk", [8, 64, 2**22])
def test_tensor_extremes_equal_each_tensors_min_and_max(chunk, monkeypatch):
    """Reduced in groups (reduceat over a concatenation): the same [1]-shaped min and max, NaN kept."""
    monkeypatch.setattr(calibration, "_REDUCE_CHUNK", chunk)
    rng = np.random.default_rng(0)
    values = [rng.standard_normal(shape).astype(dtype) for shape, dtype in
              [((2, 3), np.float32), ((4,), np.float16), ((0, 3), np.float32), ((), np.float32), ((5, 2), np.float32)]]
    values[0][1, 1] = np.nan
    names = [f"t{i}" for i in range(len(values))]
    found = {name: (lo, hi) for name, lo, hi in calibration._tensor_extremes(names, values)}
    assert "t2" not in found  # empty: no range, as ORT's calibrator keeps none
    for name, value in zip(names, values):
        if value.size:
            for got, want in zip(found[name], (value.min().reshape(1), value.max().reshape(1))):
                assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


def test_streamed_calibration_also_gives_the_float_reference(tmp_path, large):
    path = _external(dense_cnn(), tmp_path)
    model = prepare(load(path, load_external_data=False), source_dir=str(tmp_path))
    feeds = as_feeds(samples(model, n=4))
    outputs = []
    calibrate(model, feeds, QuantConfig("minmax", True, "uint8", 64), source_dir=str(tmp_path), outputs=outputs)
    reference = reference_outputs(prepare(load(path)), feeds)
    assert len(outputs) == len(feeds)
    for got, want in zip(outputs, reference):
        np.testing.assert_allclose(got["y"], want["y"], rtol=1e-4, atol=1e-5)


def test_read_tensor_reads_one_record(tmp_path):
    model = dense_cnn()
    model.graph.initializer.append(numpy_helper.from_array(np.arange(6, dtype=np.float16).reshape(2, 3), "half"))
    path = _external(model, tmp_path)
    loaded, lazy = load(path), load(path, load_external_data=False)
    for t, r in zip(loaded.graph.initializer, lazy.graph.initializer):
        value = read_tensor(r, str(tmp_path))
        assert value.dtype == numpy_helper.to_array(t).dtype
        np.testing.assert_array_equal(value, numpy_helper.to_array(t))
    with pytest.raises(ValueError, match="on disk"):
        read_tensor(lazy.graph.initializer[0], None)


def test_session_maps_weights_from_the_source_folder(tmp_path):
    model = dense_cnn()
    path = _external(model, tmp_path)
    data = samples(model, n=2)
    want = run_samples(make_session(model), data)
    got = run_samples(session(load(path, load_external_data=False), str(tmp_path)), data)
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-5, atol=1e-6)


def test_cli_quantizes_an_external_data_model_and_leaves_it_untouched(tmp_path, capsys):
    model = dense_cnn()
    path = _external(model, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("m.onnx", "w.bin")}
    out = str(tmp_path / "q.onnx")
    assert main(["quantize", path, "-o", out, "--no-measure", "--calibration-samples", "8"]) == 0
    assert "chosen: cost-model" in capsys.readouterr().out
    data = samples(model, n=4)
    error = compare_outputs("y", run_samples(make_session(model), data)["y"],
                            run_samples(make_session(load(out)), data)["y"]).rel_l2
    assert error < 0.1
    assert before == {name: (tmp_path / name).read_bytes() for name in before}


def test_histogram_methods_copy_weights_left_on_disk_for_ort(tmp_path, large):
    # ORT's Percentile calibrator takes a file: the weights are copied there from the source folder
    path = _external(dense_cnn(), tmp_path)
    feeds = as_feeds(samples(dense_cnn(), n=3))
    config = QuantConfig("percentile", True, "uint8", 64)
    lazy = prepare(load(path, load_external_data=False), source_dir=str(tmp_path))
    got = calibrate(lazy, feeds, config, source_dir=str(tmp_path))
    want = calibrate(prepare(load(path)), feeds, config)
    assert set(got.data) == set(want.data)
    for name in want.data:
        np.testing.assert_array_equal(got[name].range_value, want[name].range_value, err_msg=name)


def test_error_budget_on_weights_left_on_disk(tmp_path, large):
    # The large-model path keeps Relu for ORT's quantizer, which folds it into the Conv before it:
    # the Conv's own output name is gone from the int8 model, and the budget probes the Relu's.
    path = _external(dense_cnn(), tmp_path)
    data = samples(dense_cnn())
    free = InsertQDQPass(data=data, measure=False, source_dir=str(tmp_path))(load(path, load_external_data=False))
    budget = free.stats["error"] / 2
    result = InsertQDQPass(data=data, measure=False, max_error=budget, source_dir=str(tmp_path))(
        load(path, load_external_data=False))
    assert result.stats["error"] <= budget
    assert any(reason.startswith("error budget") for reason in result.stats["float_layers"].values())

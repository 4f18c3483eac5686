"""Loading, saving and ORT relabelling: bad files are UserErrors, writes are atomic, inputs are safe."""

import os

import numpy as np
import onnx
import pytest

from graphprune import model_io
from graphprune.errors import UserError
from graphprune.model_io import OrtLimits, for_ort, load, ort_limits, save
from graphprune.runtime import make_session, run
from tests.helpers import conv_model, save_model


def test_load_round_trips_a_valid_model(tmp_path):
    path = save_model(conv_model(), tmp_path / "m.onnx")
    assert load(path).graph.name == "conv_model"


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"", "empty file"),
        (b"this is not a protobuf at all \xff\xfe", "not an ONNX model"),
    ],
)
def test_bad_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load(path)


def test_truncated_model_is_rejected(tmp_path):
    data = conv_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.onnx"):
        load(path)


def test_invalid_graph_is_rejected(tmp_path):
    model = conv_model()
    model.graph.node[1].input[0] = "does_not_exist"
    path = save_model(model, tmp_path / "invalid.onnx")
    with pytest.raises(UserError, match="invalid ONNX graph"):
        load(path)


def test_save_refuses_to_overwrite_the_input(tmp_path):
    path = save_model(conv_model(), tmp_path / "m.onnx")
    before = open(path, "rb").read()
    with pytest.raises(UserError, match="refusing to overwrite the input"):
        save(conv_model(seed=1), path, input_path=path)
    assert open(path, "rb").read() == before
    save(conv_model(seed=1), path, input_path=path, overwrite_input=True)
    assert open(path, "rb").read() != before


def test_save_is_atomic_and_leaves_no_temporaries(tmp_path):
    save(conv_model(), tmp_path / "out.onnx")
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", boom)
    with pytest.raises(OSError):
        save(conv_model(), tmp_path / "out.onnx")
    assert os.listdir(tmp_path) == []


def test_external_data_round_trip(tmp_path):
    model = conv_model(width=32)  # weights above the 1 KiB inline threshold
    path = save(model, tmp_path / "ext.onnx", external_data=True)
    assert os.path.exists(str(path) + ".data")
    stored = onnx.load(path, load_external_data=False).graph.initializer
    assert {i.name for i in stored if i.data_location == onnx.TensorProto.EXTERNAL} == {"w"}  # fc (640 bytes) stays inline
    loaded = load(path)
    feeds = {"x": np.ones((2, 3, 8, 8), np.float32)}
    np.testing.assert_array_equal(run(make_session(loaded), feeds)["y"], run(make_session(model), feeds)["y"])


def test_models_past_the_protobuf_limit_go_external(tmp_path, monkeypatch):
    # a real > 2 GiB model is too slow for a unit test; lower the threshold instead
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 100)
    path = save(conv_model(width=32), tmp_path / "big.onnx")
    assert os.path.exists(str(path) + ".data")
    assert load(path).graph.initializer[0].data_location == onnx.TensorProto.DEFAULT


def test_old_style_ir3_graph_loads(tmp_path):
    model = conv_model(dynamic_batch=False)
    model.ir_version = 3
    model.opset_import[0].version = 9
    del model.graph.node[:]
    model.graph.node.extend([
        onnx.helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Relu", ["c"], ["r"]),
        onnx.helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        onnx.helper.make_node("Flatten", ["p"], ["f"]),
        onnx.helper.make_node("Gemm", ["f", "fc", "fc_bias"], ["y"], transB=1),  # C is required before opset 11
    ])
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(5, np.float32), "fc_bias"))
    for init in model.graph.initializer:  # IR 3: every initializer is also an input
        model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    loaded = load(save_model(model, tmp_path / "old.onnx"))
    assert loaded.ir_version == 3
    out = run(make_session(loaded), {"x": np.ones((1, 3, 8, 8), np.float32)})["y"]
    assert out.shape == (1, 5)


def test_ort_limits_are_probed_from_the_installed_runtime():
    import onnxruntime

    limits = ort_limits()
    assert limits is ort_limits()  # probed once per process
    assert limits.version == onnxruntime.__version__
    assert limits.short_version == ".".join(onnxruntime.__version__.split(".")[:2])

    def loads(ir_version, opset):
        model = conv_model()
        model.ir_version, model.opset_import[0].version = ir_version, opset
        try:
            onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return True
        except Exception:
            return False

    # the highest of each: the runtime loads them and refuses one more
    assert loads(limits.ir_version, limits.opset)
    assert not loads(limits.ir_version + 1, limits.opset)
    assert not loads(limits.ir_version, limits.opset + 1)


# What onnxruntime-training 1.19 (the last training release) loads: IR 10, opset 21.
ORT_1_19 = OrtLimits(ir_version=10, opset=21, version="1.19.2")


def test_for_ort_lowers_newer_ir_labels_when_content_allows():
    model = conv_model()
    model.ir_version = ort_limits().ir_version + 1
    lowered = for_ort(model)
    assert lowered.ir_version == ort_limits().ir_version
    assert model.ir_version == ort_limits().ir_version + 1  # the input is not modified
    feeds = {"x": np.ones((1, 3, 8, 8), np.float32)}
    assert run(make_session(model), feeds)["y"].shape == (1, 5)
    current = conv_model()
    assert for_ort(current) is current  # nothing to relabel


def test_for_ort_relabels_for_an_older_runtime(monkeypatch):
    monkeypatch.setattr(model_io, "ort_limits", lambda: ORT_1_19)
    model = conv_model()
    model.ir_version = 14  # what onnx 1.23's helper.make_model stamps
    assert for_ort(model).ir_version == 10
    model.opset_import[0].version = 22
    with pytest.raises(UserError) as info:
        for_ort(model)
    assert str(info.value) == ("model uses ai.onnx opset 22; the installed onnxruntime 1.19 runs opset <= 21 "
                               "(upgrade onnxruntime or convert the model)")


def test_for_ort_refuses_an_opset_the_runtime_does_not_run():
    model = conv_model()
    model.opset_import[0].version = ort_limits().opset + 1
    with pytest.raises(UserError, match=rf"opset {ort_limits().opset + 1}; the installed onnxruntime "
                                        rf"{ort_limits().short_version} runs opset <= {ort_limits().opset}"):
        for_ort(model)


def test_for_ort_refuses_element_types_of_a_newer_ir(monkeypatch):
    monkeypatch.setattr(model_io, "ort_limits", lambda: ORT_1_19)
    model = conv_model()
    model.ir_version = 11
    model.graph.initializer.append(onnx.TensorProto(name="f4", data_type=23, dims=[2], raw_data=b"\x00"))  # FLOAT4E2M1
    with pytest.raises(UserError, match="uses element types of IR 11; the installed onnxruntime 1.19 loads IR <= 10"):
        for_ort(model)


def test_save_writes_an_ir_label_the_runtime_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "ort_limits", lambda: ORT_1_19)
    model = conv_model()
    model.ir_version = 14
    assert onnx.load(save(model, tmp_path / "m.onnx")).ir_version == 10
    assert model.ir_version == 14
    # content of a newer IR keeps its label: the file is still the user's model
    model.graph.initializer.append(onnx.TensorProto(name="f4", data_type=23, dims=[2], raw_data=b"\x00"))
    assert onnx.load(save(model, tmp_path / "f4.onnx")).ir_version == 14


def test_model_file_size_counts_the_side_file(tmp_path):
    from graphprune.model_io import model_file_size, model_files

    inline = save(conv_model(width=32), tmp_path / "inline.onnx")
    assert model_files(inline) == [inline] and model_file_size(inline) == os.path.getsize(inline)
    external = save(conv_model(width=32), tmp_path / "ext.onnx", external_data=True)
    assert model_files(external) == [external, external + ".data"]
    assert model_file_size(external) == os.path.getsize(external) + os.path.getsize(external + ".data")

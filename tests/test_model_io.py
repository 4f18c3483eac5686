"""Loading, saving and ORT relabelling: bad files are UserErrors, writes are atomic, inputs are safe."""

import os

import numpy as np
import onnx
import pytest

from graphprune import model_io
from graphprune.errors import UserError
from graphprune.model_io import for_ort, load, save
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


def test_for_ort_lowers_newer_ir_labels_when_content_allows():
    model = conv_model()
    model.ir_version = 11
    lowered = for_ort(model)
    assert lowered.ir_version == model_io.ORT_MAX_IR_VERSION
    assert model.ir_version == 11  # the input is not modified
    assert for_ort(conv_model()) is not None


def test_for_ort_refuses_an_opset_ort_does_not_know():
    model = conv_model()
    model.opset_import[0].version = 22
    with pytest.raises(UserError, match="opset 22"):
        for_ort(model)


def test_for_ort_refuses_element_types_of_a_newer_ir():
    model = conv_model()
    model.ir_version = 11
    model.graph.initializer.append(onnx.TensorProto(name="f4", data_type=23, dims=[2], raw_data=b"\x00"))  # FLOAT4E2M1
    with pytest.raises(UserError, match="IR 11"):
        for_ort(model)


def test_model_file_size_counts_the_side_file(tmp_path):
    from graphprune.model_io import model_file_size, model_files

    inline = save(conv_model(width=32), tmp_path / "inline.onnx")
    assert model_files(inline) == [inline] and model_file_size(inline) == os.path.getsize(inline)
    external = save(conv_model(width=32), tmp_path / "ext.onnx", external_data=True)
    assert model_files(external) == [external, external + ".data"]
    assert model_file_size(external) == os.path.getsize(external) + os.path.getsize(external + ".data")

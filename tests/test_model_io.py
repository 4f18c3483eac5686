"""Loading, saving and ORT relabelling: bad files are UserErrors, writes are atomic, inputs are safe."""

import os

import numpy as np
import onnx
import pytest

from graphprune import external_writes, model_io, runtime_support
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


def test_an_initializer_of_an_unknown_data_type_is_named(tmp_path):
    # a bit flip in a type code (seen with fuzz seed 3): the size estimate before the checker met it first
    model = conv_model()
    bias = model.graph.initializer[-1]
    bias.data_type = 65
    path = save_model(model, tmp_path / "bad_type.onnx")
    with pytest.raises(UserError, match=f"invalid ONNX graph: Invalid tensor data type 65 of tensor '{bias.name}'"):
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

    monkeypatch.setattr(external_writes, "_varint", boom)  # fails after the first bytes were written
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
    monkeypatch.setattr(runtime_support, "ort_limits", lambda: ORT_1_19)
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
    monkeypatch.setattr(runtime_support, "ort_limits", lambda: ORT_1_19)
    model = conv_model()
    model.ir_version = 11
    model.graph.initializer.append(onnx.TensorProto(name="f4", data_type=23, dims=[2], raw_data=b"\x00"))  # FLOAT4E2M1
    with pytest.raises(UserError, match="uses element types of IR 11; the installed onnxruntime 1.19 loads IR <= 10"):
        for_ort(model)


def test_save_writes_an_ir_label_the_runtime_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime_support, "ort_limits", lambda: ORT_1_19)
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


# -- GroupNormalization's opset 18-20 form, upgraded on load -----------------------------------------

def _group_norm_reference(x, scale, bias, groups, eps=1e-5):
    """GroupNormalization-18: statistics and scale/bias per group."""
    n, c = x.shape[:2]
    grouped = x.reshape(n, groups, -1).astype(np.float64)
    normed = (grouped - grouped.mean(-1, keepdims=True)) / np.sqrt(grouped.var(-1, keepdims=True) + eps)
    return (normed * scale.reshape(1, groups, 1) + bias.reshape(1, groups, 1)).reshape(x.shape)


def _opset18_model(nodes, inits, inputs, outputs, opset=18):
    graph = onnx.helper.make_graph(
        nodes, "gn",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in inputs],
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in outputs],
        [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def test_load_upgrades_opset18_group_norm_to_the_per_channel_form(tmp_path):
    rng = np.random.default_rng(0)
    inits = {"s": np.array([1.5, 0.5, -1.0], np.float32), "b": np.array([0.1, -0.2, 0.3], np.float32),
             "grid": rng.uniform(-1, 1, (2, 3, 3, 2)).astype(np.float32)}
    nodes = [
        onnx.helper.make_node("GroupNormalization", ["x", "s", "b"], ["n"], name="gn", num_groups=3),
        # GridSample's "bilinear" became "linear" in opset 20: the rest of the model is converted too
        onnx.helper.make_node("GridSample", ["n", "grid"], ["y"], name="sample", mode="bilinear"),
    ]
    model = _opset18_model(nodes, inits, [("x", [2, 6, 4, 4])], [("n", [2, 6, 4, 4]), ("y", [2, 6, 3, 3])])
    with pytest.raises(onnx.checker.ValidationError, match="GroupNormalization is deprecated"):
        onnx.checker.check_model(model)  # what onnx >= 1.18 says of the opset 18 form
    path = str(tmp_path / "gn18.onnx")
    onnx.save_model(model, path)

    loaded = load(path)
    model_io.check_model(loaded, full=True)
    assert model_io.default_opset(loaded) == 21 and loaded.ir_version >= 10
    values = {i.name: onnx.numpy_helper.to_array(i) for i in loaded.graph.initializer}
    np.testing.assert_array_equal(values["s"], np.repeat(inits["s"], 2))  # each group's value, per channel
    np.testing.assert_array_equal(values["b"], np.repeat(inits["b"], 2))
    sample = next(n for n in loaded.graph.node if n.op_type == "GridSample")
    assert onnx.helper.get_attribute_value(sample.attribute[0]) == b"linear"

    x = rng.standard_normal((2, 6, 4, 4)).astype(np.float32)
    after = run(make_session(loaded), {"x": x})
    np.testing.assert_allclose(after["n"], _group_norm_reference(x, inits["s"], inits["b"], 3), rtol=1e-4, atol=1e-5)
    before = run(make_session(model), {"x": x})  # onnxruntime still runs the opset 18 form
    np.testing.assert_allclose(after["y"], before["y"], rtol=1e-5, atol=1e-6)


def test_group_norm_upgrade_handles_shared_and_computed_parameters():
    from graphprune.opset_upgrade import upgrade_group_norm

    rng = np.random.default_rng(1)
    inits = {"w": rng.standard_normal((6, 4, 1, 1)).astype(np.float32),
             "s": np.array([2.0, 0.5], np.float32), "b": np.array([0.5, -0.5], np.float32)}
    nodes = [
        onnx.helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        onnx.helper.make_node("GroupNormalization", ["c", "s", "b"], ["g6"], name="gn6", num_groups=2),  # C = 6
        onnx.helper.make_node("GroupNormalization", ["x", "s", "b"], ["g4"], name="gn4", num_groups=2),  # C = 4
        onnx.helper.make_node("Abs", ["s"], ["s_abs"], name="abs"),  # a computed scale
        onnx.helper.make_node("GroupNormalization", ["x", "s_abs", "b"], ["g4a"], name="gn4a", num_groups=2),
    ]
    outputs = [("g6", [1, 6, 3, 3]), ("g4", [1, 4, 3, 3]), ("g4a", [1, 4, 3, 3])]
    model = _opset18_model(nodes, inits, [("x", [1, 4, 3, 3])], outputs)
    upgraded = upgrade_group_norm(model)
    model_io.check_model(upgraded, full=True)
    shapes = {i.name: tuple(i.dims) for i in upgraded.graph.initializer}
    # read at two channel counts: a copy for each; "b" has no reader left, "s" still feeds Abs
    assert "b" not in shapes and shapes["s"] == (2,)
    gn = {n.name: n for n in upgraded.graph.node if n.op_type == "GroupNormalization"}
    assert shapes[gn["gn6"].input[1]] == (6,) and shapes[gn["gn4"].input[1]] == (4,)
    assert "Expand" in [n.op_type for n in upgraded.graph.node]  # Abs(s) repeated at run time
    x = rng.standard_normal((1, 4, 3, 3)).astype(np.float32)
    after, before = run(make_session(upgraded), {"x": x}), run(make_session(model), {"x": x})
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-5, atol=1e-6)


def test_group_norm_with_unknown_channels_is_refused_on_load(tmp_path):
    nodes = [onnx.helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], name="gn", num_groups=2)]
    inits = {"s": np.ones(2, np.float32), "b": np.zeros(2, np.float32)}
    model = _opset18_model(nodes, inits, [("x", ["N", "C", 4, 4])], [("y", ["N", "C", 4, 4])])
    path = str(tmp_path / "gn_dynamic.onnx")
    onnx.save_model(model, path)
    with pytest.raises(UserError, match=r"gn_dynamic.onnx: GroupNormalization 'gn': cannot tell its channel count"):
        load(path)


def test_group_norm_upgrade_leaves_other_models_alone():
    from graphprune.opset_upgrade import upgrade_group_norm

    nodes = [onnx.helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2)]
    per_channel = _opset18_model(nodes, {"s": np.ones(4, np.float32), "b": np.zeros(4, np.float32)},
                                 [("x", [1, 4, 2, 2])], [("y", [1, 4, 2, 2])], opset=21)
    assert upgrade_group_norm(per_channel) is per_channel
    without = conv_model()
    without.opset_import[0].version = 18
    assert upgrade_group_norm(without) is without


def test_inline_write_streams_tensors_and_reads_back_the_same_model(tmp_path):
    # initializers are written one per graph fragment; every reader merges them back in order
    model = conv_model(width=32)
    path = save(model, tmp_path / "inline.onnx", external_data=False)
    assert not os.path.exists(str(path) + ".data")
    onnx.checker.check_model(str(path), full_check=True)
    assert onnx.load(path).SerializeToString(deterministic=True) == model.SerializeToString(deterministic=True)
    feeds = {"x": np.ones((2, 3, 8, 8), np.float32)}
    np.testing.assert_array_equal(run(make_session(load(path)), feeds)["y"], run(make_session(model), feeds)["y"])

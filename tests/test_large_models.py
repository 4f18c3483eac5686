"""Large models: checks, shape inference, inspect and prune never serialize or size the whole proto.

A model past protobuf's 2 GiB limit is too slow to build in the fast suite: there the size that
counts as large is lowered and every whole-proto ``SerializeToString``/``ByteSize`` of a proto
still carrying weights is made to raise. The real thing runs behind the ``slow`` marker.
"""

import os
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune import ir
from graphprune.cli import main
from graphprune.errors import UserError
from graphprune.model_io import check_model, load
from graphprune.shapes import concrete_shapes, infer_shapes

_WIDTH = 64  # 16 KiB a weight: far above the 1 KiB under which weightless copies keep data


def _mlp(layers: int = 3, width: int = _WIDTH) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits += [numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        x = f"a{i}"
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    shape = numpy_helper.from_array(np.array([1, width], np.int64), "shape")  # read by data propagation
    nodes.append(helper.make_node("Reshape", [x, "shape"], ["y"]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])], inits + [shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _carries_weights(proto) -> bool:
    graph = proto.graph if isinstance(proto, onnx.ModelProto) else proto
    return any(init.ByteSize() > 4096 for init in graph.initializer)


def _callers() -> list:
    """``module.function`` of every frame above the caller's caller, innermost first."""
    frame, names = sys._getframe(2), []
    while frame is not None:
        names.append(f"{frame.f_globals.get('__name__')}.{frame.f_code.co_name}")
        frame = frame.f_back
    return names


class _WholeProtoCalls(list):
    """Where ``SerializeToString``/``ByteSize`` ran on a proto still carrying its weights."""

    def outside(self, *allowed: str) -> list:
        """The calls made from none of the ``allowed`` functions (``module.function`` names)."""
        return [stack for stack in self if not any(name in stack for name in allowed)]


@pytest.fixture
def no_whole_proto(monkeypatch):
    """Models count as large from 1 KiB of weights; a whole-proto serialization or sizing raises.

    With ``.record = True`` (see ``test_prune...``) calls are recorded instead of raising.
    """
    calls = _WholeProtoCalls()
    calls.record = False
    monkeypatch.setattr(ir, "LARGE_MODEL_BYTES", 1024)
    for cls in (onnx.ModelProto, onnx.GraphProto):
        for method in ("SerializeToString", "ByteSize"):
            original = getattr(cls, method)

            def guarded(self, *args, _original=original, _method=method, **kwargs):
                if _carries_weights(self):
                    if not calls.record:
                        raise AssertionError(f"{type(self).__name__}.{_method} on a proto with its weights")
                    calls.append(_callers())
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(cls, method, guarded)
    return calls


@pytest.fixture
def external_path(tmp_path):
    path = str(tmp_path / "mlp.onnx")
    onnx.save_model(_mlp(), path, save_as_external_data=True, location="mlp.onnx.data", size_threshold=1024)
    return path


def test_weightless_copy_keeps_structure_and_small_tensors_only():
    model = _mlp()
    light = ir.weightless_copy(model)
    assert [n.op_type for n in light.graph.node] == [n.op_type for n in model.graph.node]
    stripped = {i.name for i in light.graph.initializer if i.data_location == TensorProto.EXTERNAL}
    assert stripped == {"w0", "w1", "w2"}  # biases (256 bytes) and the shape stay inline
    assert [tuple(i.dims) for i in light.graph.initializer] == [tuple(i.dims) for i in model.graph.initializer]
    assert not any(i.raw_data for i in light.graph.initializer if i.name in stripped)
    assert ir.weight_bytes(light) == pytest.approx(ir.weight_bytes(model), rel=0.01)
    assert len(model.graph.initializer[0].raw_data) == _WIDTH * _WIDTH * 4  # the original is untouched


def _record_field_by_field(init: TensorProto) -> TensorProto:
    """The oracle: a stripped tensor's record built field by field (as weightless_copy did before it
    copied one record made per type, dims and length)."""
    target = TensorProto(name=init.name, data_type=init.data_type, doc_string=init.doc_string, dims=init.dims)
    if init.HasField("segment"):
        target.segment.CopyFrom(init.segment)
    target.metadata_props.extend(init.metadata_props)
    target.data_location = TensorProto.EXTERNAL
    for key, value in (("location", ir.WEIGHTLESS_LOCATION), ("offset", "0"), ("length", str(ir._tensor_bytes(init)))):
        entry = target.external_data.add()
        entry.key, entry.value = key, value
    return target


def test_weightless_records_equal_field_by_field_ones(external_path, tmp_path):
    """Shared records, then each tensor's own fields: names, doc strings (set even when empty),
    segments and metadata; records of weights left on disk keep their length; ``keep`` keeps data."""
    model = _mlp()
    model.graph.initializer[0].doc_string = "first"
    model.graph.initializer[2].segment.begin = 1
    model.graph.initializer[4].metadata_props.add(key="k", value="v")
    on_disk = load(external_path, load_external_data=False)
    for source, keep in ((model, frozenset()), (model, {"w1"}), (on_disk, frozenset())):
        light = ir.weightless_copy(source, keep=keep)
        for init, copy in zip(source.graph.initializer, light.graph.initializer):
            stripped = init.name not in keep and (init.data_location == TensorProto.EXTERNAL or ir._tensor_bytes(init) >= 1024)
            assert copy == (_record_field_by_field(init) if stripped else init), init.name
        assert len(light.graph.initializer) == len(source.graph.initializer)
    path, written = ir.write_weightless_bytes(model, str(tmp_path))
    assert open(path, "rb").read() == written == ir.weightless_copy(model).SerializeToString()
    assert os.path.getsize(tmp_path / ir.WEIGHTLESS_LOCATION) == 0  # unsized: empty
    ir.write_weightless(model, str(tmp_path), sized=True)
    assert os.path.getsize(tmp_path / ir.WEIGHTLESS_LOCATION) == _WIDTH * _WIDTH * 4  # the longest stripped


def test_check_model_checks_a_large_model_without_serializing_it(no_whole_proto):
    model = _mlp()
    check_model(model)
    check_model(model, full=True)
    model.graph.node[1].input[0] = "missing"
    with pytest.raises(UserError, match="missing"):
        check_model(model)


def test_check_model_of_weights_left_on_disk(external_path, no_whole_proto):
    model = onnx.load(external_path, load_external_data=False)
    assert ir.has_external_data(model) and ir.is_large(model)
    check_model(model, full=True)


def test_shape_inference_of_a_large_model_works_on_the_graph_only(no_whole_proto):
    model = _mlp()
    inferred = infer_shapes(model)
    shapes = {vi.name: ir.value_shape(vi) for vi in inferred.graph.value_info}
    assert shapes["r1"] == ("N", _WIDTH)
    assert infer_shapes(model, inplace=True) is model and len(model.graph.value_info) == len(shapes)
    assert concrete_shapes(model, {"x": (2, _WIDTH)})["a2"] == (2, _WIDTH)


def test_inspect_reads_no_weights(external_path, no_whole_proto, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("inspect read the external data")

    monkeypatch.setattr(onnx, "load_external_data_for_model", refuse)
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model", refuse)
    assert main(["inspect", external_path, "--input-shape", "x=2x64"]) == 0
    out = capsys.readouterr().out
    assert f"params: {3 * (_WIDTH * _WIDTH + _WIDTH) + 2:,}" in out
    assert f"MACs: {3 * 2 * _WIDTH * _WIDTH:,}" in out
    assert "MatMul 3" in out


def test_prune_of_a_model_with_external_data(external_path, tmp_path, no_whole_proto, capsys):
    # Known whole-proto serializations outside this module's scope: the door's ORT session check
    # (validation.check_session) and writing a small output inline (model_io._write).
    no_whole_proto.record = True
    out = str(tmp_path / "pruned.onnx")
    assert main(["prune", external_path, "--ratio", "0.5", "-o", out]) == 0
    assert no_whole_proto.outside("graphprune.validation.check_session", "graphprune.model_io._write") == []
    pruned = load(out)
    widths = {i.name: tuple(i.dims) for i in pruned.graph.initializer}
    assert widths["w0"] == (_WIDTH, _WIDTH // 2) and widths["w2"] == (_WIDTH // 2, _WIDTH)


@pytest.mark.slow
def test_a_model_past_two_gib_loads_checks_and_inspects(tmp_path, capsys):
    """A real 2.1 GB model with external data (written one layer at a time)."""
    import shutil

    if shutil.disk_usage(tmp_path).free < 6 * 2**30:
        pytest.skip("needs 6 GiB of free disk for a 2 GiB model and its copies")
    width, layers = 8192, 8  # 8 x 256 MiB
    path = str(tmp_path / "big.onnx")
    nodes, inits, x = [], [], "x"
    with open(path + ".data", "wb") as data:
        for i in range(layers):
            offset = data.tell()
            data.write(np.full((width, width), 1.0 / width, np.float32).tobytes())
            tensor = onnx.TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[width, width])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", "big.onnx.data"), ("offset", str(offset)), ("length", str(width * width * 4))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            inits.append(tensor)
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]))
            x = f"m{i}"
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, width]) for n in ("x", x)]
    graph = helper.make_graph(nodes, "big", io[:1], io[1:], inits)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    assert main(["inspect", path]) == 0
    assert f"params: {layers * width * width:,}" in capsys.readouterr().out
    model = load(path)
    check_model(model, full=True)
    assert ir.weight_bytes(model) >= 2**31  # past protobuf's 2**31 - 1
    assert infer_shapes(model, inplace=True).graph.value_info[0].name == "m0"


def test_canonicalize_of_a_large_model_keys_and_infers_without_the_weights(no_whole_proto):
    import graphprune

    no_whole_proto.record = True
    model = _mlp()
    shape = model.graph.initializer.pop()  # the Reshape's shape as a Constant node, for canonicalize to convert
    model.graph.node.insert(0, helper.make_node("Constant", [], ["shape"], value=shape))
    result = graphprune.canonicalize(model)
    # folding hands graphsurgeon's ORT session the foldable part only (no weights here)
    assert no_whole_proto == []
    assert {vi.name for vi in result.graph.value_info} >= {"m0", "r0", "a2"}
    np_w = numpy_helper.to_array(result.graph.initializer[0])
    np.testing.assert_array_equal(np_w, numpy_helper.to_array(model.graph.initializer[0]))


def test_canonicalize_returns_an_unchanged_model_itself_and_copies_nothing():
    import graphprune

    model = _mlp()
    result = graphprune.CanonicalizePass()(model)
    assert not result.modified and result.model is model  # no copy of the weights was made


def test_canonicalize_folds_with_the_weights_it_reads_and_restores_the_others():
    import graphprune
    from graphprune.runtime import make_session

    model = _mlp()
    # w0 reaches its MatMul through a Transpose (folded: its data is read); a dead Neg goes
    model.graph.node[0].input[1] = "w0t"
    model.graph.node.insert(0, helper.make_node("Transpose", ["w0"], ["w0t"]))
    model.graph.node.append(helper.make_node("Neg", ["a0"], ["unused"]))
    result = graphprune.CanonicalizePass()(model)
    assert result.modified and {n.op_type for n in result.model.graph.node} == {"MatMul", "Add", "Relu", "Reshape"}
    inits = {i.name: i for i in result.model.graph.initializer}
    assert all(i.data_location != TensorProto.EXTERNAL for i in inits.values())
    np.testing.assert_array_equal(numpy_helper.to_array(inits["w1"]), numpy_helper.to_array(model.graph.initializer[2]))
    x = {"x": np.random.default_rng(1).standard_normal((1, _WIDTH)).astype(np.float32)}
    expected, got = make_session(model).run(["y"], x)[0], make_session(result.model).run(["y"], x)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_observed_shapes_leaves_the_model_as_it_was():
    from graphprune.shapes import observed_shapes

    model = _mlp()
    before = model.SerializeToString()
    shapes = observed_shapes(model, {"x": np.ones((1, _WIDTH), np.float32)}, {}, names=["m1", "r0"])
    assert shapes["m1"] == (1, _WIDTH) and shapes["r0"] == (1, _WIDTH)
    assert model.SerializeToString() == before


def test_a_session_past_the_protobuf_limit_is_built_without_sizing_the_model(no_whole_proto, monkeypatch):
    import graphprune.runtime as runtime

    monkeypatch.setattr(runtime, "EXTERNAL_DATA_THRESHOLD", 1000)  # this model counts as past 2 GiB
    model = _mlp()
    assert ir.approx_bytes(model) == 3 * (_WIDTH * _WIDTH + _WIDTH) * 4 + 2 * 8
    session = runtime.make_session(model)
    (y,) = session.run(None, {"x": np.ones((1, _WIDTH), np.float32)})
    assert y.shape == (1, _WIDTH)

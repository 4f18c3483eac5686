"""Within ``shapes.sharing_inference`` the full check's strict inference serves the MAC counts and the
dependency analysis: the same numbers as each inferring on its own, the same verdicts as the checker."""

import contextlib

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphprune import shapes
from graphprune.dependency.shape_info import tensor_shapes
from graphprune.errors import UserError
from graphprune.metrics import count_macs
from graphprune.model_io import check_model
from tests.helpers import conv_model


def _mlp(reshape_from_shape: bool = False) -> onnx.ModelProto:
    """MatMul -> Relu -> MatMul; optionally a Reshape whose target is computed (Shape -> Reshape):
    only data propagation resolves it, which the checker's inference does not run."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 16)), ("w2", (16, 4)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"])]
    if reshape_from_shape:
        nodes += [helper.make_node("Shape", ["r"], ["s"]), helper.make_node("Reshape", ["r", "s"], ["q"])]
    nodes.append(helper.make_node("MatMul", ["q" if reshape_from_shape else "r", "w2"], ["y"]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("model", [_mlp(), _mlp(reshape_from_shape=True), conv_model(dynamic_batch=False)],
                         ids=["mlp", "computed-reshape", "conv"])
def test_shared_shapes_give_the_same_macs_and_analysis_shapes(model):
    alone_macs, alone_shapes = count_macs(model), tensor_shapes(model)
    assert alone_macs > 0
    with shapes.sharing_inference():
        check_model(model, full=True)
        assert shapes.checked_shapes(model) is not None
        assert count_macs(model) == alone_macs
        assert tensor_shapes(model) == alone_shapes
    assert shapes.checked_shapes(model) is None  # nothing outlives the block


def test_computed_reshape_is_not_covered_so_each_infers_on_its_own():
    model = _mlp(reshape_from_shape=True)
    with shapes.sharing_inference():
        check_model(model, full=True)
        assert not shapes.covers(shapes.checked_shapes(model), model)  # "q" needs data propagation


def test_edited_or_other_model_gets_no_shapes():
    model = _mlp()
    with shapes.sharing_inference():
        check_model(model, full=True)
        twin = onnx.ModelProto()
        twin.CopyFrom(model)
        assert shapes.checked_shapes(twin) is None  # keyed by the object checked, not by its content
        model.graph.node.append(helper.make_node("Relu", ["y"], ["z"]))
        assert shapes.checked_shapes(model) is None  # edited after its check


def test_strict_inference_failure_is_the_checkers_verdict():
    model = _mlp()
    model.graph.value_info.append(helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, [2, 99]))
    with pytest.raises(UserError) as outside:
        check_model(model, full=True)
    with shapes.sharing_inference(), pytest.raises(UserError) as inside:
        check_model(model, full=True)
    assert str(inside.value) == str(outside.value) and "invalid ONNX graph" in str(inside.value)


def test_session_check_reuses_the_full_checks_weightless_file(monkeypatch):
    from graphprune import ir, validation

    model = _mlp()
    monkeypatch.setattr(ir, "_STRIP_MIN_BYTES", 16)  # its weights stripped
    with shapes.sharing_inference():
        check_model(model, full=True)
        path = shapes.checked_file(model)
        assert path is not None and ir.has_external_data(onnx.load(path, load_external_data=False))
        monkeypatch.setattr(ir, "weightless_copy", lambda *a, **k: pytest.fail("copied again"))
        monkeypatch.setattr(ir, "write_weightless", lambda *a, **k: pytest.fail("written again"))
        validation.check_session(model)
        model.ir_version = 99  # a label the runtime does not load: a relabelled copy, written anew
        with pytest.raises(pytest.fail.Exception, match="copied again"):
            validation.check_session(model)


def _shapes_read_field_by_field(model: onnx.ModelProto, inferred: onnx.ModelProto) -> dict:
    """The oracle: every value of ``inferred``'s graph read from its parsed proto (what
    ``shapes._concrete`` did before it read the serialized model for the types only)."""
    found = {init.name: tuple(init.dims) for init in model.graph.initializer}
    g = inferred.graph
    for vi in [vi for vi in g.input if vi.name not in found] + list(g.value_info) + list(g.output):
        if not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        values = tuple(d.dim_value for d in dims)
        if all(v > 0 for v in values) or all(d.HasField("dim_value") for d in dims):
            found[vi.name] = values
    for init in g.initializer:
        found[init.name] = tuple(init.dims)
    for node in g.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            found[node.output[0]] = tuple(node.attribute[0].t.dims)
    return found


def test_concrete_shapes_read_from_the_serialized_model_match_the_parsed_one():
    """Every kind of value: concrete, scalar, an explicit 0, a named or unknown dim, no shape, not a
    tensor, an initializer listed as an input and in value_info, a Constant's output."""
    model = _mlp()
    model.graph.node.append(helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones((3, 1), np.float32))))
    unknown = helper.make_tensor_value_info("u", onnx.TensorProto.FLOAT, [2, None])
    unknown.type.tensor_type.shape.dim[1].Clear()
    values = [helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, []),
              helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [0, 3]),
              helper.make_tensor_value_info("n", onnx.TensorProto.FLOAT, ["batch", 3]), unknown,
              helper.make_tensor_value_info("k", onnx.TensorProto.FLOAT, [9, 9]),
              helper.make_tensor_value_info("w1", onnx.TensorProto.FLOAT, [1]),
              onnx.ValueInfoProto(name="none"), helper.make_tensor_sequence_value_info("q", onnx.TensorProto.FLOAT, [2])]
    inferred = onnx.shape_inference.infer_shapes(model)
    inferred.graph.value_info.extend(values)
    inferred.graph.input.extend([helper.make_tensor_value_info("w2", onnx.TensorProto.FLOAT, [5, 5])])
    expected = _shapes_read_field_by_field(model, inferred)
    found = shapes._concrete(model, inferred.SerializeToString())
    assert found == expected and list(found) == list(expected)  # same entries, same order
    assert found["s"] == () and found["z"] == (0, 3) and found["k"] == (3, 1) and found["w1"] == (8, 16)
    assert not {"n", "u", "none", "q"} & set(found)


def test_inspect_counts_macs_with_the_doors_shapes(tmp_path, monkeypatch, capsys):
    """``inspect``: the door's full check infers the shapes once; the MAC count reads them (the same
    figure as its own inference gave), and infers again only for other input shapes."""
    import graphprune.metrics as metrics
    from graphprune.cli import main

    path = str(tmp_path / "m.onnx")
    onnx.save_model(_mlp(), path)
    inferred = []
    real = metrics.concrete_shapes
    monkeypatch.setattr(metrics, "concrete_shapes", lambda *a, **k: inferred.append(a) or real(*a, **k))
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "MACs: 384" in out and not inferred  # 2x8x16 + 2x16x4
    with monkeypatch.context() as alone:  # nothing shared: the count's own inference, the same figure
        alone.setattr(shapes, "sharing_inference", contextlib.nullcontext)
        assert main(["inspect", path]) == 0 and capsys.readouterr().out == out
    assert len(inferred) == 1
    assert main(["inspect", path, "--input-shape", "x=4x8"]) == 0 and len(inferred) == 2  # other shapes
    assert "MACs: 384" not in capsys.readouterr().out

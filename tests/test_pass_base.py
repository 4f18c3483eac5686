"""The pass contract: requires -> call -> ensures, Pipeline records, registry."""

import onnx
import pytest
from onnx import helper

from graphprune.errors import UserError
from graphprune.passes.base import Pass, PassContractError, PassResult, Pipeline, pass_class, registered_passes


def _relu_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class _Rename(Pass):
    name = "rename"

    def call(self, model):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        out.graph.name = "renamed"
        return PassResult(out, True, {"renamed": 1})


class _Refuse(Pass):
    def requires(self, model):
        raise UserError("cannot handle this")


class _Broken(Pass):
    def call(self, model):
        return model


def test_pipeline_records_each_pass_and_chains_models():
    result = Pipeline([_Rename(), _Rename()])(_relu_model())
    assert result.modified
    assert result.model.graph.name == "renamed"
    assert [r["pass"] for r in result.stats["passes"]] == ["rename", "rename"]
    assert all(r["stats"] == {"renamed": 1} and r["seconds"] >= 0 for r in result.stats["passes"])


def test_empty_pipeline_is_a_no_op():
    model = _relu_model()
    result = Pipeline([])(model)
    assert not result.modified and result.model is model


def test_requires_refuses_before_call():
    with pytest.raises(UserError, match="cannot handle this"):
        _Refuse()(_relu_model())


def test_a_pass_returning_a_bare_model_breaks_the_contract():
    with pytest.raises(PassContractError):
        _Broken()(_relu_model())


def test_builtin_passes_are_registered():
    assert "canonicalize" in registered_passes()
    with pytest.raises(UserError, match="unknown pass 'nope'"):
        pass_class("nope")

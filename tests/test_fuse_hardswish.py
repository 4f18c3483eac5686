"""FuseHardSwishPass and raise_opset: HardSwish written out as elementwise ops becomes one op, outputs kept."""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.errors import UserError
from graphprune.opset_upgrade import raise_opset
from graphprune.passes import CanonicalizePass, FuseHardSwishPass, fuse_hardswish
from graphprune.runtime import make_session, run

REAL_CLS = os.path.expanduser("~/.cache/graphprune-real/models/cls.onnx")
REAL_CLS_DATA = os.path.expanduser("~/.cache/graphprune-real/data/cls_test.npz")
SHAPE = [2, 8, 5, 5]


def _const(name, value):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.float32)))


def _model(body, opset=11, outputs=("y",)):
    """x -> Conv (so x is computed, as in a network) -> body -> outputs; scalars as Constant nodes (Paddle)."""
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((8, 8, 1, 1)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["inp", "w"], ["x"], name="conv")] + body
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("inp", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, SHAPE) for o in outputs], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def _paddle(root="div"):
    """Paddle's hardswish: Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6), or the 1/6 as a Mul (``root="mul"``)."""
    body = [_const("three", 3.0), _const("zero", 0.0), _const("six", 6.0),
            helper.make_node("Add", ["x", "three"], ["a"], name="add"),
            helper.make_node("Clip", ["a", "zero", "six"], ["c"], name="clip"),
            helper.make_node("Mul", ["c", "x"], ["m"], name="mul")]  # operands swapped: order must not matter
    if root == "div":
        return body + [helper.make_node("Div", ["m", "six"], ["y"], name="div")]
    return body + [_const("sixth", 1.0 / 6.0), helper.make_node("Mul", ["sixth", "m"], ["y"], name="scale")]


def _variants():
    inner_div = [_const("three", [3.0]), _const("six", 6.0),
                 helper.make_node("Add", ["three", "x"], ["a"]),
                 helper.make_node("Clip", ["a"], ["c"], min=0.0, max=6.0),  # Clip-6: bounds as attributes
                 helper.make_node("Div", ["c", "six"], ["g"]),
                 helper.make_node("Mul", ["x", "g"], ["y"])]
    torch_form = [helper.make_node("HardSigmoid", ["x"], ["h"], alpha=1.0 / 6.0, beta=0.5),
                  helper.make_node("Mul", ["x", "h"], ["y"])]
    return {"paddle-div": (_paddle("div"), 11), "paddle-mul-sixth": (_paddle("mul"), 11),
            "gate-divided-clip-attributes": (inner_div, 10), "torch-hardsigmoid": (torch_form, 13),
            "already-opset-14": (_paddle("div"), 14)}


def _feeds():
    return {"inp": (np.random.default_rng(0).standard_normal(SHAPE) * 4).astype(np.float32)}


def _outputs(model):
    return run(make_session(model), _feeds())


@pytest.mark.parametrize("name", list(_variants()))
def test_each_written_out_form_becomes_one_hardswish_with_equal_outputs(name):
    body, opset = _variants()[name]
    model = _model(body, opset)
    result = FuseHardSwishPass()(model)
    assert result.modified and result.stats["hardswish_fused"] == 1
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert [n.op_type for n in out.graph.node] == ["Conv", "HardSwish"]  # the scalars' Constants went too
    assert list(out.graph.node[1].input) == ["x"] and list(out.graph.node[1].output) == ["y"]
    assert out.opset_import[0].version == max(opset, 14)
    assert result.stats["opset_raised"] == (None if opset >= 14 else f"{opset} -> 14")
    np.testing.assert_allclose(_outputs(out)["y"], _outputs(model)["y"], rtol=1e-6, atol=1e-6)


def test_the_input_model_is_not_mutated():
    model = _model(_paddle())
    before = model.SerializeToString()
    fuse_hardswish(model)
    assert model.SerializeToString() == before


@pytest.mark.parametrize("case", ["intermediate-is-output", "add-2", "paddle-hardsigmoid-0.2", "scale-1/5"])
def test_what_is_not_hardswish_is_left_alone(case):
    body, outputs = _paddle(), ("y",)
    if case == "intermediate-is-output":
        outputs = ("y", "c")  # the clipped value is read outside the pattern
    elif case == "add-2":
        body[0] = _const("three", 2.0)
    elif case == "paddle-hardsigmoid-0.2":  # Paddle's SE gate: slope 0.2, not hardswish's 1/6
        body = [helper.make_node("HardSigmoid", ["x"], ["h"], alpha=0.2, beta=0.5), helper.make_node("Mul", ["x", "h"], ["y"])]
    else:
        body[-1] = _const("five", 5.0)
        body.append(helper.make_node("Div", ["m", "five"], ["y"]))
        body = [n for n in body if not (n.op_type == "Div" and n.input[1] == "six")]
    model = _model(body, outputs=outputs)
    result = FuseHardSwishPass()(model)
    assert not result.modified and result.model is model
    assert result.stats["hardswish_fused"] == 0


def test_without_raising_the_opset_an_old_model_keeps_its_ops():
    model = _model(_paddle(), 11)
    result = FuseHardSwishPass(raise_opset=False)(model)
    assert not result.modified and result.stats["skipped"] == "opset 11 has no HardSwish"


def test_canonicalize_fuses_and_can_be_told_not_to():
    model = _model(_paddle(), 11)
    result = CanonicalizePass()(model)
    assert result.stats["hardswish_fused"] == 1 and result.stats["opset_raised"] == "11 -> 14"
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "HardSwish"]
    assert not result.model.graph.initializer[1:]  # only the conv weight: the scalars went with the pattern
    kept = CanonicalizePass(fuse=False)(model).model
    assert "HardSwish" not in [n.op_type for n in kept.graph.node] and kept.opset_import[0].version == 11


def test_raise_opset_relabels_when_no_schema_changes_and_converts_otherwise():
    relabel = _model(_paddle(), 11)  # Conv, Add, Clip, Mul, Div, Constant: no schema between 11 and 14 differs...
    assert raise_opset(relabel, 11) is relabel
    raised = raise_opset(relabel, 12)
    assert raised.opset_import[0].version == 12 and raised.graph.node[2] == relabel.graph.node[2]
    # ...but Squeeze's axes become an input at 13: the converter rewrites it, outputs unchanged
    squeeze = helper.make_model(helper.make_graph(
        [helper.make_node("Squeeze", ["x"], ["y"], axes=[1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]), opset_imports=[helper.make_opsetid("", 11)])
    converted = raise_opset(squeeze, 14)
    onnx.checker.check_model(converted, full_check=True)
    assert len(converted.graph.node[-1].input) == 2
    x = np.arange(6, dtype=np.float32).reshape(2, 1, 3)
    np.testing.assert_array_equal(run(make_session(converted), {"x": x})["y"], x[:, 0])
    with pytest.raises(UserError, match="imports no ai.onnx opset"):
        raise_opset(helper.make_model(helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("x", 1)]), 14)


@pytest.mark.skipif(not (os.path.exists(REAL_CLS) and os.path.exists(REAL_CLS_DATA)),
                    reason="PP-OCR classifier not cached (tools/real_models.py)")
def test_real_paddle_classifier_outputs_unchanged_on_real_lines():
    model = onnx.load(REAL_CLS)
    plain = CanonicalizePass(fuse=False)(model).model
    result = CanonicalizePass()(model)
    assert result.stats["hardswish_fused"] == 18 and result.stats["opset_raised"] == "11 -> 14"
    onnx.checker.check_model(result.model, full_check=True)
    assert not {"Clip", "Div"} & {n.op_type for n in result.model.graph.node}
    lines = np.load(REAL_CLS_DATA)["x"][:16]
    before = run(make_session(plain), {"x": lines})
    after = run(make_session(result.model), {"x": lines})
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-5, atol=1e-6)
        assert (after[name].argmax(-1) == before[name].argmax(-1)).all()

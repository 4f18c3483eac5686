"""Per-op rules end to end: each small graph is pruned in both modes; removed == masked, the
checker passes, shape-carrying constants and attributes are rewritten, output shapes are kept."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.opset_upgrade import upgrade_group_norm
from graphprune.passes import PruneChannelsPass
from graphprune.runtime import make_session, run
from graphprune.validate import compare_outputs
from tests.test_dependency import conv, make_model, w


def i64(*values):
    return np.array(values, dtype=np.int64)


def stem(c=8):
    """x [N,3,6,6] -> conv (c channels) -> relu 'a': the prunable producer every case starts from."""
    return [conv("x", "a0", "ws"), helper.make_node("Relu", ["a0"], ["a"])], {"ws": w(c, 3, 3, 3)}


def head(x, c, out=4):
    """Global pool -> flatten -> gemm: consumes ``x`` with c channels (the group's consumer)."""
    return [
        helper.make_node("GlobalAveragePool", [x], ["gp"]),
        helper.make_node("Flatten", ["gp"], ["gf"]),
        helper.make_node("Gemm", ["gf", "wh", "bh"], ["y"], transB=1),
    ], {"wh": w(out, c), "bh": w(out)}


def case_conv_transpose():
    n, i = stem()
    n += [helper.make_node("ConvTranspose", ["a", "wt", "bt"], ["t"], strides=[2, 2])]
    h, hi = head("t", 6)
    return n + h, {**i, "wt": w(8, 6, 2, 2), "bt": w(6), **hi}


def case_resize_sizes():
    n, i = stem()
    n += [helper.make_node("Resize", ["a", "", "", "sz"], ["r"], mode="nearest")]
    h, hi = head("r", 8)
    return n + h, {**i, "sz": i64(1, 8, 12, 12), **hi}


def case_split_num_outputs():
    n, i = stem()
    n += [helper.make_node("Split", ["a"], ["p", "q"], axis=1, num_outputs=2),
          conv("p", "pc", "wp"), helper.make_node("Add", ["pc", "q"], ["s"])]
    h, hi = head("s", 4)
    return n + h, {**i, "wp": w(4, 4, 3, 3), **hi}


def case_slice_reshape_expand():
    n, i = stem()
    n += [
        helper.make_node("Slice", ["a", "st", "en", "ax"], ["sl"]),          # channels 2..7
        helper.make_node("Reshape", ["sl", "shp"], ["rs"]),                  # [N, 6, 36]
        helper.make_node("Expand", ["bias", "eshape"], ["eb"]),              # [6, 36] broadcast bias
        helper.make_node("Add", ["rs", "eb"], ["ad"]),
        helper.make_node("Reshape", ["ad", "shp2"], ["back"]),
    ]
    h, hi = head("back", 6)
    inits = {**i, "st": i64(2), "en": i64(8), "ax": i64(1), "shp": i64(0, 6, 36), "bias": w(6, 1),
             "eshape": i64(6, 36), "shp2": i64(0, 6, 6, 6), **hi}
    return n + h, inits


def case_tile_squeeze_unsqueeze_matmul():
    n, i = stem()
    n += [
        helper.make_node("ReduceMean", ["a", "axes"], ["m"], keepdims=1),            # [N, 8, 1, 1]
        helper.make_node("Squeeze", ["m", "sq"], ["v"]),                            # [N, 8]
        helper.make_node("Tile", ["v", "reps"], ["tv"]),                            # [N, 16]
        helper.make_node("MatMul", ["tv", "wm"], ["mm"]),                           # [N, 5]
        helper.make_node("Unsqueeze", ["mm", "usq"], ["y3"]),                       # [N, 1, 5]
        helper.make_node("Flatten", ["y3"], ["y"]),
    ]
    inits = {**i, "axes": i64(2, 3), "sq": i64(2, 3), "reps": i64(1, 2), "wm": w(16, 5), "usq": i64(1)}
    return n, inits


def case_constant_of_shape_pad_norms():
    n, i = stem()
    n += [
        helper.make_node("ConstantOfShape", ["cs"], ["ones"], value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("Mul", ["a", "ones"], ["ao"]),
        helper.make_node("Pad", ["ao", "pads"], ["pd"]),
        helper.make_node("InstanceNormalization", ["pd", "is", "ib"], ["inn"]),
        helper.make_node("GroupNormalization", ["inn", "gs", "gb"], ["gn"], num_groups=4),
        helper.make_node("PRelu", ["gn", "slope"], ["pr"]),
    ]
    h, hi = head("pr", 8)
    inits = {**i, "cs": i64(1, 8, 6, 6), "pads": i64(0, 0, 1, 1, 0, 0, 1, 1), "is": w(8), "ib": w(8),
             "gs": w(4), "gb": w(4), "slope": np.abs(w(8, 1, 1)), **hi}
    return n + h, inits


def case_transpose_gemm_nhwc():
    n, i = stem()
    n += [
        helper.make_node("Transpose", ["a"], ["tr"], perm=[0, 2, 3, 1]),      # NHWC
        helper.make_node("MatMul", ["tr", "wc"], ["mc"]),                       # per-pixel linear on C
        helper.make_node("Transpose", ["mc"], ["back"], perm=[0, 3, 1, 2]),
    ]
    h, hi = head("back", 6)
    return n + h, {**i, "wc": w(8, 6), **hi}


CASES = {
    "conv_transpose": case_conv_transpose,
    "resize_sizes": case_resize_sizes,
    "split_num_outputs": case_split_num_outputs,
    "slice_reshape_expand": case_slice_reshape_expand,
    "tile_squeeze_unsqueeze_matmul": case_tile_squeeze_unsqueeze_matmul,
    "constant_of_shape_pad_norms": case_constant_of_shape_pad_norms,
    "transpose_matmul_nhwc": case_transpose_gemm_nhwc,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_rule_prunes_and_masked_equals_removed(name):
    nodes, inits = CASES[name]()
    # opset 18: GroupNormalization in its per-group form, upgraded as model_io.load does
    model = upgrade_group_norm(make_model(nodes, [("x", ["N", 3, 6, 6])], [("y", ["N", None])], inits, opset=18))
    model.graph.output[0].type.tensor_type.shape.dim[1].ClearField("dim_param")
    onnx.checker.check_model(model, full_check=True)
    feed = {"x": np.random.default_rng(3).standard_normal((2, 3, 6, 6)).astype(np.float32)}
    reference = run(make_session(model), feed)["y"]
    removed = PruneChannelsPass(ratio=0.5)(model)
    masked = PruneChannelsPass(ratio=0.5, mode="mask")(model)
    assert removed.modified, removed.stats
    assert removed.stats["groups_pruned"] >= 1
    onnx.checker.check_model(removed.model, full_check=True)
    out_removed, out_masked = run(make_session(removed.model), feed)["y"], run(make_session(masked.model), feed)["y"]
    assert out_removed.shape == reference.shape
    assert compare_outputs("y", out_masked, out_removed).rel_l2 <= 1e-5
    stem_weight = next(i for i in removed.model.graph.initializer if i.name == "ws")
    assert stem_weight.dims[0] < 8  # the stem's channels went


def test_subgraph_reads_block_the_tensor():
    nodes, inits = stem()
    branch = helper.make_graph([helper.make_node("Identity", ["a"], ["o"])], "b", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    nodes += [helper.make_node("If", ["cond"], ["yo"], then_branch=branch, else_branch=branch)]
    model = make_model(nodes, [("x", [1, 3, 6, 6])], [("yo", None)], inits)
    model.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    result = PruneChannelsPass(ratio=0.5)(model)
    assert not result.modified
    assert any("read inside a subgraph of If" in r for b in result.stats["blocked"] for r in b["reasons"])

"""Reshape targets computed at run time, as small inline graphs: GPT-2's Conv1D (view(-1, C) -> Gemm ->
view(*size[:-1], nf)) with sizes read by Shape, and symbolic products in the axis matching."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.dependency import build_dependency_graph, reported_groups
from graphprune.dependency.rules.layout import match_reshape_axes
from graphprune.passes import PruneChannelsPass
from graphprune.runtime import make_session, run

C, NF, OUT = 6, 8, 3


def _i64(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _conv1d(x, w, b, out, width, tag):
    """transformers' Conv1D as torch exports it: the flattening target reads the last size of x, the
    restoring one reads x's leading sizes and appends the constant width."""
    return [
        helper.make_node("Shape", [x], [f"{tag}_shape"]),
        helper.make_node("Gather", [f"{tag}_shape", "last"], [f"{tag}_c"], axis=0),
        helper.make_node("Unsqueeze", [f"{tag}_c", "zero_axis"], [f"{tag}_c1"]),
        helper.make_node("Concat", ["minus_one", f"{tag}_c1"], [f"{tag}_flat_shape"], axis=0),
        helper.make_node("Reshape", [x, f"{tag}_flat_shape"], [f"{tag}_flat"]),
        helper.make_node("Gemm", [f"{tag}_flat", w, b], [f"{tag}_mm"]),
        helper.make_node("Slice", [f"{tag}_shape", "zero", "minus_one"], [f"{tag}_lead"]),
        helper.make_node("Concat", [f"{tag}_lead", f"{tag}_width"], [f"{tag}_out_shape"], axis=0),
        helper.make_node("Reshape", [f"{tag}_mm", f"{tag}_out_shape"], [out]),
    ], [_i64(f"{tag}_width", [width])]


def _gpt2_mlp(seed=0):
    rng = np.random.default_rng(seed)
    fc, fc_inits = _conv1d("x", "w_fc", "b_fc", "h", NF, "fc")
    proj, proj_inits = _conv1d("a", "w_proj", "b_proj", "y", OUT, "proj")
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in {
        "w_fc": rng.standard_normal((C, NF)), "b_fc": rng.standard_normal(NF),
        "w_proj": rng.standard_normal((NF, OUT)), "b_proj": rng.standard_normal(OUT)}.items()]
    inits += [_i64("last", -1), _i64("zero_axis", [0]), _i64("minus_one", [-1]), _i64("zero", [0])]
    graph = helper.make_graph(
        fc + [helper.make_node("Relu", ["h"], ["a"])] + proj, "conv1d_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", C])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", OUT])],
        inits + fc_inits + proj_inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_symbolic_products_pair_a_flattened_token_axis():
    assert match_reshape_axes(("batch", "sequence", 64), ("batch*sequence", 64)) == [([0, 1], [0]), ([2], [1])]
    assert match_reshape_axes(("sequence*batch", 128), ("batch", "sequence", 128)) == [([0], [0, 1]), ([1], [2])]
    assert match_reshape_axes(("batch", "sequence", 64), ("batch*heads", 64)) is None


def test_conv1d_mlp_has_one_prunable_ffn_group_with_the_sizes_read_by_shape_following_it():
    groups = reported_groups(build_dependency_graph(_gpt2_mlp()).groups())
    ffn = [g for g in groups if g.kind == "ffn" and g.prunable]  # (the input's C is a graph input: blocked)
    assert [g.channels for g in ffn] == [NF]
    members = {str(m.dim) for m in ffn[0].members}
    assert {"w_fc[1]", "b_fc[0]", "w_proj[0]", "h[2]", "proj_flat[1]"} <= members


@pytest.mark.parametrize("batch, seq", [(2, 5), (1, 1)])
def test_conv1d_mlp_masked_equals_removed(batch, seq):
    model = _gpt2_mlp()
    removed = PruneChannelsPass(ratio=0.0, ffn_ratio=0.5)(model)
    masked = PruneChannelsPass(ratio=0.0, ffn_ratio=0.5, mode="mask")(model)
    assert removed.stats["kinds"]["ffn"]["removed"] == NF // 2
    w = {i.name: list(i.dims) for i in removed.model.graph.initializer}
    assert w["w_fc"] == [C, NF // 2] and w["w_proj"] == [NF // 2, OUT]
    feeds = {"x": np.random.default_rng(1).standard_normal((batch, seq, C)).astype(np.float32)}
    a, b = run(make_session(removed.model), feeds), run(make_session(masked.model), feeds)
    assert a["y"].shape == (batch, seq, OUT)
    np.testing.assert_allclose(a["y"], b["y"], rtol=1e-5, atol=1e-5)


def test_nothing_asked_nothing_changed():
    assert not PruneChannelsPass(ratio=0.0)(_gpt2_mlp()).modified

"""Transformer patterns the fixtures do not cover, as small inline graphs: hidden-size pruning through a
decomposed LayerNorm and an RMSNorm (against a NumPy oracle), GPT-2's packed QKV projection split into
Q, K, V, and per-kind ratios on a model without heads."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.dependency import build_dependency_graph, reported_groups
from graphprune.passes import PruneChannelsPass
from graphprune.runtime import make_session, run

IN, HIDDEN, OUT = 6, 8, 3


def _model(nodes, inits, out_width=OUT, hidden_in=IN):
    graph = helper.make_graph(
        nodes, "pattern",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", hidden_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", out_width])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _norm_model(kind, seed=0):
    """x -> MatMul (hidden 8) -> decomposed LayerNorm or RMSNorm -> MatMul -> y."""
    rng = np.random.default_rng(seed)
    inits = {"w_in": rng.standard_normal((IN, HIDDEN)).astype(np.float32),
             "g": (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32),
             "b": (0.1 * rng.standard_normal(HIDDEN)).astype(np.float32),
             "w_out": rng.standard_normal((HIDDEN, OUT)).astype(np.float32),
             "two": np.float32(2.0), "eps": np.float32(1e-5)}
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h"])]
    if kind == "layernorm":
        nodes += [
            helper.make_node("ReduceMean", ["h"], ["mean"], axes=[-1], keepdims=1),
            helper.make_node("Sub", ["h", "mean"], ["c"]),
            helper.make_node("Pow", ["c", "two"], ["sq"]),
            helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], keepdims=1),
            helper.make_node("Add", ["var", "eps"], ["ve"]),
            helper.make_node("Sqrt", ["ve"], ["std"]),
            helper.make_node("Div", ["c", "std"], ["n"]),
        ]
    else:  # RMSNorm as Llama exports it: x * 1/sqrt(mean(x^2) + eps)
        nodes += [
            helper.make_node("Pow", ["h", "two"], ["sq"]),
            helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
            helper.make_node("Add", ["ms", "eps"], ["me"]),
            helper.make_node("Sqrt", ["me"], ["rms"]),
            helper.make_node("Reciprocal", ["rms"], ["inv"]),
            helper.make_node("Mul", ["h", "inv"], ["n"]),
        ]
    nodes += [helper.make_node("Mul", ["n", "g"], ["ng"]), helper.make_node("Add", ["ng", "b"], ["nb"]),
              helper.make_node("MatMul", ["nb", "w_out"], ["y"])]
    return _model(nodes, inits), inits


def _numpy_norm(kind, x, w_in, g, b, w_out):
    h = x @ w_in
    if kind == "layernorm":
        c = h - h.mean(-1, keepdims=True)
        n = c / np.sqrt((c ** 2).mean(-1, keepdims=True) + 1e-5)
    else:
        n = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + 1e-5)
    return (n * g + b) @ w_out


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_hidden_pruning_through_a_decomposed_norm_normalizes_over_the_kept_features(kind):
    model, w = _norm_model(kind)
    groups = reported_groups(build_dependency_graph(model).groups())
    hidden = [g for g in groups if g.kind == "hidden"]
    assert len(hidden) == 1 and hidden[0].blocked
    assert all("pruned only with --hidden-ratio" in r for r in hidden[0].reasons)
    result = PruneChannelsPass(ratio=0.0, hidden_ratio=0.5)(model)
    assert result.stats["kinds"]["hidden"]["removed"] == HIDDEN // 2
    kept_w = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert kept_w["w_in"].shape == (IN, HIDDEN // 2) and kept_w["g"].shape == (HIDDEN // 2,)
    kept = np.array([np.flatnonzero((w["w_in"] == col[:, None]).all(0))[0] for col in kept_w["w_in"].T])
    x = np.random.default_rng(1).standard_normal((2, 5, IN)).astype(np.float32)
    expected = _numpy_norm(kind, x, w["w_in"][:, kept], w["g"][kept], w["b"][kept], w["w_out"][kept])
    np.testing.assert_allclose(run(make_session(result.model), {"x": x})["y"], expected, rtol=1e-4, atol=1e-5)


def test_a_reduce_mean_over_the_features_that_is_no_norm_still_blocks():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h"]),
             helper.make_node("ReduceMean", ["h"], ["m"], axes=[-1], keepdims=1),
             helper.make_node("Mul", ["h", "m"], ["y8"]),
             helper.make_node("MatMul", ["y8", "w_out"], ["y"])]
    model = _model(nodes, {"w_in": rng.standard_normal((IN, HIDDEN)).astype(np.float32),
                           "w_out": rng.standard_normal((HIDDEN, OUT)).astype(np.float32)})
    group = next(g for g in reported_groups(build_dependency_graph(model).groups()) if "w_in" in g.param_names())
    assert group.blocked and any("reduced over by ReduceMean" in r for r in group.reasons)


def _gpt2_attention(seed=0):
    """GPT-2 export: one packed c_attn MatMul [H, 3H] + Add, Split into Q, K, V, 2 heads of 4."""
    rng = np.random.default_rng(seed)
    heads, hd = 2, 4
    width = heads * hd
    inits = {"c_attn": rng.standard_normal((IN, 3 * width)).astype(np.float32) / 3,
             "c_attn_b": rng.standard_normal(3 * width).astype(np.float32) / 10,
             "split": np.array([width] * 3, np.int64), "heads_shape": np.array([0, 0, heads, hd], np.int64),
             "merge_shape": np.array([0, 0, width], np.int64), "scale": np.float32(2.0),
             "c_proj": rng.standard_normal((width, OUT)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "c_attn"], ["qkv0"]), helper.make_node("Add", ["qkv0", "c_attn_b"], ["qkv"]),
             helper.make_node("Split", ["qkv", "split"], ["q", "k", "v"], axis=2)]
    for t in "qkv":
        nodes.append(helper.make_node("Reshape", [t, "heads_shape"], [f"{t}4"]))
    nodes += [
        helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qt", "kt"], ["s0"]), helper.make_node("Div", ["s0", "scale"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "vt"], ["c"]),
        helper.make_node("Transpose", ["c"], ["ct"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ct", "merge_shape"], ["merged"]),
        helper.make_node("MatMul", ["merged", "c_proj"], ["y"]),
    ]
    return _model(nodes, inits)


def test_packed_qkv_split_prunes_a_head_in_each_third_and_rewrites_split_sizes():
    model = _gpt2_attention()
    heads = [g for g in reported_groups(build_dependency_graph(model).groups()) if g.kind == "heads"]
    assert len(heads) == 1 and heads[0].prunable and heads[0].channels == 2
    packed = next(m for m in heads[0].members if m.dim.tensor == "c_attn" and m.dim.axis == 1)
    assert np.array_equal(packed.atoms, np.tile(np.repeat([0, 1], 4), 3))
    removed = PruneChannelsPass(ratio=0.0, heads_ratio=0.5)(model)
    masked = PruneChannelsPass(ratio=0.0, heads_ratio=0.5, mode="mask")(model)
    split = next(n for n in removed.model.graph.node if n.op_type == "Split")
    sizes = next(i for i in removed.model.graph.initializer if i.name == split.input[1])
    assert numpy_helper.to_array(sizes).tolist() == [4, 4, 4]
    x = np.random.default_rng(2).standard_normal((2, 7, IN)).astype(np.float32)
    np.testing.assert_allclose(run(make_session(removed.model), {"x": x})["y"],
                               run(make_session(masked.model), {"x": x})["y"], rtol=1e-4, atol=1e-5)


def test_a_heads_ratio_on_a_model_without_heads_says_so():
    result = PruneChannelsPass(ratio=0.0, heads_ratio=0.5)(onnx.load("models/digits_cnn.onnx"))
    assert not result.modified
    assert result.stats["notes"] == ["heads ratio 0.5 unused: the model has no prunable heads groups"]


def test_gather_of_an_activation_blocks_the_indexed_axis_and_prunes_the_picks():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h"]),
             helper.make_node("Gather", ["h", "pick"], ["g"], axis=2),   # features 0, 2, 5 of 8
             helper.make_node("MatMul", ["g", "w_out"], ["y"])]
    model = _model(nodes, {"w_in": rng.standard_normal((IN, HIDDEN)).astype(np.float32),
                           "pick": np.array([0, 2, 5], np.int64),
                           "w_out": rng.standard_normal((3, OUT)).astype(np.float32)})
    groups = reported_groups(build_dependency_graph(model).groups())
    picked = next(g for g in groups if "w_in" in g.param_names())
    assert picked.blocked and any("indexed by Gather" in r for r in picked.reasons)
    picks = next(g for g in groups if "pick" in g.param_names())
    assert picks.prunable and set(picks.param_names()) == {"pick", "w_out"}
    removed = PruneChannelsPass(ratio=0.5)(model)
    masked = PruneChannelsPass(ratio=0.5, mode="mask")(model)
    dims = {i.name: list(i.dims) for i in removed.model.graph.initializer}
    assert dims["pick"] == [2] and dims["w_out"] == [2, OUT] and dims["w_in"] == [IN, HIDDEN]
    x = rng.standard_normal((1, 2, IN)).astype(np.float32)
    np.testing.assert_allclose(run(make_session(removed.model), {"x": x})["y"],
                               run(make_session(masked.model), {"x": x})["y"], rtol=1e-5, atol=1e-6)

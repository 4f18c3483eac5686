"""ORT's fused transformer ops (com.microsoft Attention, SkipLayerNormalization, BiasGelu/FastGelu):
pruned like their unfused forms (masked == removed, ``num_heads`` rewritten), or blocked with a
reason — never corrupted.  The graphs are written as ORT's transformer optimizer emits them."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.dependency import AnalysisOptions, build_dependency_graph, reported_groups
from graphprune.passes import PruneChannelsPass
from graphprune.runtime import make_session, run

HIDDEN, HEADS, FFN = 16, 4, 32


def _w(rng, *shape):
    return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)


def fused_encoder_layer(num_heads=HEADS, gelu="BiasGelu", past=False, seed=0):
    """x [N, S, 16] -> Attention -> MatMul -> SkipLayerNorm(+x) -> MatMul -> BiasGelu -> MatMul ->
    SkipLayerNorm -> MatMul to 3 outputs (so the hidden stream is not pinned by the graph output)."""
    rng = np.random.default_rng(seed)
    inits = {
        "qkv_w": _w(rng, HIDDEN, 3 * HIDDEN), "qkv_b": _w(rng, 3 * HIDDEN), "wo": _w(rng, HIDDEN, HIDDEN),
        "ln1_g": 1 + 0.1 * _w(rng, HIDDEN), "ln1_b": _w(rng, HIDDEN), "bo": _w(rng, HIDDEN),
        "w1": _w(rng, HIDDEN, FFN), "b1": _w(rng, FFN), "w2": _w(rng, FFN, HIDDEN), "b2": _w(rng, HIDDEN),
        "ln2_g": 1 + 0.1 * _w(rng, HIDDEN), "ln2_b": _w(rng, HIDDEN), "head": _w(rng, HIDDEN, 3),
    }
    attention_inputs = ["x", "qkv_w", "qkv_b", ""] + (["past"] if past else [])
    attention_outputs = ["ctx"] + (["present"] if past else [])
    nodes = [
        helper.make_node("Attention", attention_inputs, attention_outputs, name="attn", domain="com.microsoft",
                         num_heads=num_heads),
        helper.make_node("MatMul", ["ctx", "wo"], ["proj"], name="proj"),
        helper.make_node("SkipLayerNormalization", ["proj", "x", "ln1_g", "ln1_b", "bo"], ["h"], name="ln1",
                         domain="com.microsoft", epsilon=1e-5),
        helper.make_node("MatMul", ["h", "w1"], ["up"], name="up"),
        helper.make_node(gelu, ["up", "b1"], ["act"], name="gelu", domain="com.microsoft"),
        helper.make_node("MatMul", ["act", "w2"], ["down"], name="down"),
        helper.make_node("SkipLayerNormalization", ["down", "h", "ln2_g", "ln2_b", "b2"], ["h2"], name="ln2",
                         domain="com.microsoft", epsilon=1e-5),
        helper.make_node("MatMul", ["h2", "head"], ["y"], name="head"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", HIDDEN])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 3])]
    if past:
        inputs.append(helper.make_tensor_value_info("past", TensorProto.FLOAT, [2, "N", num_heads, "P", HIDDEN // num_heads]))
        outputs.append(helper.make_tensor_value_info("present", TensorProto.FLOAT, [2, "N", num_heads, "T", HIDDEN // num_heads]))
    graph = helper.make_graph(nodes, "fused", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def _groups(model, **options):
    return reported_groups(build_dependency_graph(model, options=AnalysisOptions(**options)).groups())


def _feeds(seq=5, batch=2):
    return {"x": np.random.default_rng(1).standard_normal((batch, seq, HIDDEN)).astype(np.float32)}


def _attr(model, op, name):
    node = next(n for n in model.graph.node if n.op_type == op)
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def test_fused_attention_heads_span_the_three_projections_of_the_packed_weight():
    groups = _groups(fused_encoder_layer())
    heads = next(g for g in groups if g.kind == "heads")
    assert heads.prunable and heads.channels == HEADS
    packed = next(m for m in heads.members if m.dim.tensor == "qkv_w" and m.dim.axis == 1)
    per_projection = np.repeat(np.arange(HEADS), HIDDEN // HEADS)
    assert np.array_equal(packed.atoms, np.tile(per_projection, 3))  # [Q heads | K heads | V heads]
    ffn = next(g for g in groups if g.kind == "ffn")
    assert {"w1", "w2", "b1"} <= set(ffn.param_names())
    hidden = next(g for g in groups if g.kind == "hidden")
    assert hidden.blocked and {"ln1_g", "ln2_b", "bo"} <= set(hidden.param_names())


@pytest.mark.parametrize("gelu", ["BiasGelu", "FastGelu"])
def test_fused_heads_and_ffn_masked_equals_removed_and_num_heads_is_rewritten(gelu):
    model = fused_encoder_layer(gelu=gelu)
    removed = PruneChannelsPass(ratio=0.5)(model)
    masked = PruneChannelsPass(ratio=0.5, mode="mask")(model)
    assert removed.modified and removed.stats["params_after"] < removed.stats["params_before"]
    assert _attr(removed.model, "Attention", "num_heads") == HEADS // 2
    qkv = next(i for i in removed.model.graph.initializer if i.name == "qkv_w")
    assert list(qkv.dims) == [HIDDEN, 3 * HIDDEN // 2]
    for seq, batch in ((5, 2), (11, 1)):
        a = run(make_session(removed.model), _feeds(seq, batch))["y"]
        b = run(make_session(masked.model), _feeds(seq, batch))["y"]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_fused_attention_with_past_state_or_heads_that_do_not_divide_blocks():
    for model, reason in ((fused_encoder_layer(past=True), "past state"),
                          (fused_encoder_layer(num_heads=3), "num_heads 3 does not divide the 16 features")):
        groups = _groups(model)
        assert not [g for g in groups if g.kind == "heads"]
        blocked = [r for g in groups for r in g.reasons if "Attention 'attn'" in r]
        assert blocked and all(reason in r for r in blocked)
        result = PruneChannelsPass(ratio=0.5)(model)
        attention = next(n for n in result.model.graph.node if n.op_type == "Attention")
        assert list(attention.input[1:3]) == ["qkv_w", "qkv_b"]  # untouched
        assert next(i for i in result.model.graph.initializer if i.name == "qkv_w").dims == [HIDDEN, 3 * HIDDEN]


def test_fused_head_dim_pruning_keeps_num_heads_and_writes_the_trained_scale():
    model = fused_encoder_layer()
    removed = PruneChannelsPass(ratio=0.0, heads_ratio=0.5, head_dim=True)(model)
    masked = PruneChannelsPass(ratio=0.0, heads_ratio=0.5, head_dim=True, mode="mask")(model)
    assert removed.stats["kinds"]["head_dim"]["removed"] == 2
    assert _attr(removed.model, "Attention", "num_heads") == HEADS
    assert _attr(removed.model, "Attention", "scale") == pytest.approx(0.5)  # 1 / sqrt(4), not 1 / sqrt(2)
    qkv = next(i for i in removed.model.graph.initializer if i.name == "qkv_w")
    assert list(qkv.dims) == [HIDDEN, 3 * HIDDEN // 2]
    a = run(make_session(removed.model), _feeds())["y"]
    np.testing.assert_allclose(a, run(make_session(masked.model), _feeds())["y"], rtol=1e-4, atol=1e-5)

"""Groups pinned on representative graphs: members, channel maps, order and reasons as the analysis
found them at 2a8e175, before it was made cheaper (issue 13).  A change to what the analysis finds
shows here: the digest covers every group (trivial ones too) with every member's positions and
atoms; the readable summaries name what the channel groups are."""

import hashlib

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.dependency import AnalysisOptions, build_dependency_graph, reported_groups
from graphprune.testing.fixtures import bert_encoder, gpt_decoder

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(RNG.standard_normal(s).astype(np.float32), k) for k, s in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _conv(x, y, w, **attrs):
    return helper.make_node("Conv", [x, w], [y], name=y, pads=[1, 1, 1, 1], **attrs)


def residual_add():
    nodes = [_conv("x", "a", "wa"), _conv("a", "b", "wb"), _conv("a", "c", "wc"),
             helper.make_node("Add", ["b", "c"], ["s"]), _conv("s", "y", "wy")]
    inits = {"wa": (6, 3, 3, 3), "wb": (8, 6, 3, 3), "wc": (8, 6, 3, 3), "wy": (2, 8, 3, 3)}
    return _model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 2, 5, 5])], inits)


def concat():
    nodes = [_conv("x", "a", "wa"), _conv("x", "b", "wb"), helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
             _conv("c", "y", "wy")]
    inits = {"wa": (4, 3, 3, 3), "wb": (6, 3, 3, 3), "wy": (2, 10, 3, 3)}
    return _model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 2, 5, 5])], inits)


def depthwise():
    nodes = [_conv("x", "a", "wa"), _conv("a", "d", "wd", group=6), _conv("d", "y", "wy")]
    inits = {"wa": (6, 3, 3, 3), "wd": (6, 1, 3, 3), "wy": (2, 6, 3, 3)}
    return _model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 2, 5, 5])], inits)


def residual_mlp(blocks=3, width=4, hidden=6):
    """The structure of tools/bench_scale.py's 20,000-node graph: MatMul, Relu, MatMul, Add per block."""
    nodes, inits, s = [], {}, "x"
    for k in range(blocks):
        nodes += [helper.make_node("MatMul", [s, f"u{k}"], [f"h{k}"]), helper.make_node("Relu", [f"h{k}"], [f"r{k}"]),
                  helper.make_node("MatMul", [f"r{k}", f"d{k}"], [f"m{k}"]),
                  helper.make_node("Add", [s, f"m{k}"], [f"s{k}"])]
        inits.update({f"u{k}": (width, hidden), f"d{k}": (hidden, width)})
        s = f"s{k}"
    nodes.append(helper.make_node("Identity", [s], ["y"]))
    return _model(nodes, [("x", [1, width])], [("y", [1, width])], inits)


def attention():
    return bert_encoder(layers=1, hidden=16, heads=2, ffn=32)


def grouped_query_attention():
    return gpt_decoder(layers=1, hidden=16, heads=4, kv_heads=2, ffn=32, gated=True)


CASES = [
    ("residual_add", residual_add, None),
    ("concat", concat, None),
    ("depthwise", depthwise, None),
    ("residual_mlp", residual_mlp, None),
    ("attention", attention, None),
    ("attention_head_dim", attention, AnalysisOptions(head_dim=True)),
    ("attention_hidden", attention, AnalysisOptions(hidden=True)),
    ("grouped_query_attention", grouped_query_attention, None),
]


def canonical(groups):
    """Every group in order: id, channels, kind, fixed, reasons, and each member's dim, info and
    channel map (positions, atoms) as plain values."""

    def values(array):
        return None if array is None else tuple(array.tolist())

    return [
        (g.id, g.channels, g.kind, g.fixed, tuple(g.reasons),
         tuple((str(m.dim), m.info.size, m.info.param, m.info.role, m.info.fixed, m.info.kind, tuple(m.info.reasons),
                values(m.positions), values(m.atoms), m.identity) for m in g.members))
        for g in groups
    ]


def digest(groups) -> str:
    return hashlib.sha256(repr(canonical(groups)).encode()).hexdigest()[:16]


def summary(group) -> tuple:
    """A channel group, readably: id, kind, channels, prunable, its number of member constants, and
    the first one's dim with the positions of channel 0 there (head 0 of an attention projection
    is its first head-dim columns)."""
    first = group.params[0]
    return (group.id, group.kind, group.channels, group.prunable, len(group.params), str(first.dim),
            tuple(first.positions[first.atoms == 0].tolist()))


# The channel groups of the BERT layer: the hidden size, position ids, whole heads (head 0 is the
# first 8 columns of every projection), FFN neurons, the pooler and the classifier.
_BERT_HIDDEN = (1, "hidden", 16, False, 17, "embeddings.LayerNorm.bias[0]", (0,))
_BERT_POSITIONS = (6, "channels", 128, False, 1, "embeddings.position_ids[1]", (0,))
_BERT = [
    _BERT_HIDDEN, _BERT_POSITIONS,
    (8, "heads", 2, True, 7, "encoder.layer.0.attention.output.dense.weight[0]", (0, 1, 2, 3, 4, 5, 6, 7)),
    (13, "ffn", 32, True, 3, "encoder.layer.0.intermediate.dense.bias[0]", (0,)),
    (14, "channels", 16, True, 3, "classifier.weight[1]", (0,)),
    (15, "channels", 2, False, 2, "classifier.bias[0]", (0,)),
]
# --head-dim: the same 8 dims of every head (dim 0 is columns 0 and 8), Q/K and V/output apart
_BERT_HEAD_DIM = [
    _BERT_HIDDEN, _BERT_POSITIONS,
    (8, "head_dim", 8, True, 4, "encoder.layer.0.attention.self.key.bias[0]", (0, 8)),
    (10, "head_dim", 8, True, 3, "encoder.layer.0.attention.output.dense.weight[0]", (0, 8)),
    (12, "ffn", 32, True, 3, "encoder.layer.0.intermediate.dense.bias[0]", (0,)),
    (13, "channels", 16, True, 3, "classifier.weight[1]", (0,)),
    (14, "channels", 2, False, 2, "classifier.bias[0]", (0,)),
]
# grouped-query attention: a KV head (4 columns of K) goes with its 2 query heads
_GQA = [
    (1, "hidden", 16, False, 16, "lm_head.weight[0]", (0,)),
    (6, "channels", 128, False, 1, "model.position_ids[1]", (0,)),
    (8, "heads", 2, True, 4, "model.layers.0.self_attn.k_proj.weight[1]", (0, 1, 2, 3)),
    (37, "channels", 128, False, 1, "model.causal_mask[2]", (0,)),
    (38, "channels", 128, False, 1, "model.causal_mask[3]", (0,)),
    (40, "ffn", 32, True, 3, "model.layers.0.mlp.down_proj.weight[0]", (0,)),
    (41, "channels", 100, False, 1, "lm_head.weight[1]", (0,)),
]

# name -> (digest of every group, number of groups, summaries of the channel groups), as found at 2a8e175
PINNED = {
    "residual_add": ("728ca432a7a8d0a7", 21, [  # both branches of the Add (wb, wc) and its consumer wy: one group
        (7, "channels", 6, True, 3, "wa[0]", (0,)), (8, "channels", 3, False, 1, "wa[1]", (0,)),
        (13, "channels", 8, True, 3, "wb[0]", (0,)), (20, "channels", 2, False, 1, "wy[0]", (0,))]),
    "concat": ("459e2bde543e6d51", 17, [  # each input of the Concat its own group, wy's segments in it
        (7, "channels", 6, True, 2, "wb[0]", (0,)), (8, "channels", 4, True, 2, "wa[0]", (0,)),
        (9, "channels", 3, False, 2, "wa[1]", (0,)), (16, "channels", 2, False, 1, "wy[0]", (0,))]),
    "depthwise": ("73321e2f5e52f000", 18, [  # the depthwise conv's input and output channels together
        (7, "channels", 6, True, 3, "wa[0]", (0,)), (8, "channels", 3, False, 1, "wa[1]", (0,)),
        (17, "channels", 2, False, 1, "wy[0]", (0,))]),
    "residual_mlp": ("2da2a75088ec222f", 5, [  # each block's hidden units; the residual stream pinned by x and y
        (1, "channels", 6, True, 2, "d0[0]", (0,)), (2, "channels", 4, False, 6, "d0[1]", (0,)),
        (3, "channels", 6, True, 2, "d1[0]", (0,)), (4, "channels", 6, True, 2, "d2[0]", (0,))]),
    "attention": ("8d5892b0af0e87fa", 16, _BERT),
    "attention_head_dim": ("ff39965059a9a3e5", 15, _BERT_HEAD_DIM),
    # --hidden: the same groups; the hidden one no longer blocked by its LayerNorms (the digest), only by the output
    "attention_hidden": ("e17d20003b093e45", 16, _BERT),
    "grouped_query_attention": ("1fae610e7d83d148", 42, _GQA),
}


@pytest.mark.parametrize("name, make, options", CASES, ids=[c[0] for c in CASES])
def test_groups_are_as_pinned(name, make, options):
    groups = build_dependency_graph(make(), options=options).groups()
    want_digest, want_count, want_summaries = PINNED[name]
    assert [summary(g) for g in reported_groups(groups)] == want_summaries
    assert len(groups) == want_count
    assert digest(groups) == want_digest

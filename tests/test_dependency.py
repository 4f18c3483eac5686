"""Dependency analysis: which channels are coupled, through which index mapping, and what blocks."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.dependency import (
    DimKey,
    Expand,
    Identity,
    Offset,
    build_dependency_graph,
    register_rule,
    registered_ops,
    reported_groups,
)
from graphprune.dependency.index_mapping import MappingError
from graphprune.dependency.rules.layout import match_reshape_axes

RNG = np.random.default_rng(0)


def make_model(nodes, inputs, outputs, inits=(), opset=17):
    """A model from nodes, (name, shape) inputs/outputs and name -> array initializers."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def conv(x, y, weight, bias=None, **attrs):
    return helper.make_node("Conv", [x, weight] + ([bias] if bias else []), [y], name=y, pads=[1, 1, 1, 1], **attrs)


def group_of(dep, tensor, axis):
    """The channel group holding (tensor, axis) (the first if the dim is shared)."""
    for g in dep.groups():
        if any(m.dim == DimKey(tensor, axis) for m in g.members):
            return g
    raise AssertionError(f"no group holds {tensor}[{axis}]")


def member_tensors(group):
    return {m.dim.tensor for m in group.members}


# -- index mappings ---------------------------------------------------------------------------

def test_index_mappings_pair_the_right_indices():
    src, dst = Identity().pairs(3, 3)
    assert src.tolist() == dst.tolist() == [0, 1, 2]
    src, dst = Offset(4).pairs(2, 8)
    assert src.tolist() == [0, 1] and dst.tolist() == [4, 5]
    # channel c of [C=2, H*W=3] flattened is features 3c..3c+2
    src, dst = Expand(inner=3).pairs(2, 6)
    assert dict(zip(dst.tolist(), src.tolist())) == {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1}
    # per-group channel j of 2 groups of 3 is channels j and 3 + j
    src, dst = Expand(outer=2).pairs(3, 6)
    assert sorted(zip(src.tolist(), dst.tolist())) == [(0, 0), (0, 3), (1, 1), (1, 4), (2, 2), (2, 5)]
    with pytest.raises(MappingError):
        Expand(inner=3).pairs(2, 7)
    with pytest.raises(MappingError):
        Offset(5).pairs(4, 8)


def test_reshape_axes_match_in_runs_of_equal_product():
    assert match_reshape_axes(("N", 64, 7, 7), ("N", 3136)) == [([0], [0]), ([1, 2, 3], [1])]
    assert match_reshape_axes((1, 116, 7, 7), (1, 2, 58, 7, 7)) == [([1], [1, 2]), ([2], [3]), ([3], [4])]
    assert match_reshape_axes((6, 4), (4, 6)) == [([0, 1], [0, 1])]
    assert match_reshape_axes(("N", 8), ("M", 8)) is None


# -- groups -----------------------------------------------------------------------------------

def _conv_bn_relu_conv():
    nodes = [
        conv("x", "c1", "w1", "b1"),
        helper.make_node("BatchNormalization", ["c1", "s", "bb", "m", "v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        conv("r", "y", "w2"),
    ]
    inits = {"w1": w(8, 3, 3, 3), "b1": w(8), "s": w(8), "bb": w(8), "m": w(8), "v": np.abs(w(8)) + 1, "w2": w(4, 8, 3, 3)}
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])], inits)


def test_conv_bn_relu_conv_is_one_group_with_producer_and_consumer():
    dep = build_dependency_graph(_conv_bn_relu_conv())
    groups = reported_groups(dep.groups())
    prunable = [g for g in groups if g.prunable]
    assert len(prunable) == 1
    g = prunable[0]
    assert g.channels == 8
    assert set(g.param_names()) == {"w1", "b1", "s", "bb", "m", "v", "w2"}
    assert DimKey("w2", 1) in {m.dim for m in g.members} and DimKey("w1", 0) in {m.dim for m in g.members}
    # input channels (3) and output channels (4) are pinned by the graph boundary
    blocked = {tuple(g.param_names()): g.reasons for g in groups if g.blocked}
    assert any("graph input x" in r for r in blocked[("w1",)])
    assert any("graph output y" in r for r in blocked[("w2",)])


def test_residual_add_couples_both_branches():
    nodes = [
        conv("x", "a", "wa"),
        conv("a", "b", "wb"),
        conv("a", "c", "wc"),
        helper.make_node("Add", ["b", "c"], ["s"]),
        conv("s", "y", "wy"),
    ]
    inits = {"wa": w(6, 3, 3, 3), "wb": w(8, 6, 3, 3), "wc": w(8, 6, 3, 3), "wy": w(2, 8, 3, 3)}
    dep = build_dependency_graph(make_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 2, 5, 5])], inits))
    g = group_of(dep, "s", 1)
    assert g.prunable and g.channels == 8
    assert {"wb", "wc", "wy"} <= set(g.param_names())
    # the conv feeding both branches: its outputs are the inputs of wb and wc
    assert {"wa", "wb", "wc"} == set(group_of(dep, "a", 1).param_names())


def test_concat_inputs_keep_separate_groups_with_offsets():
    nodes = [
        conv("x", "a", "wa"),
        conv("x", "b", "wb"),
        helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
        conv("c", "y", "wy"),
    ]
    inits = {"wa": w(4, 3, 3, 3), "wb": w(6, 3, 3, 3), "wy": w(2, 10, 3, 3)}
    dep = build_dependency_graph(make_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 2, 5, 5])], inits))
    ga, gb = group_of(dep, "a", 1), group_of(dep, "b", 1)
    assert ga.id != gb.id and ga.channels == 4 and gb.channels == 6
    wy_a = next(m for m in ga.members if m.dim == DimKey("wy", 1))
    wy_b = next(m for m in gb.members if m.dim == DimKey("wy", 1))
    assert wy_a.positions.tolist() == [0, 1, 2, 3]
    assert wy_b.positions.tolist() == [4, 5, 6, 7, 8, 9]


def test_components_are_networkx_components_of_the_same_graph():
    """The analysis keeps its own adjacency; ``dep.graph`` (networkx) holds the same dims, infos
    and links, and ``components`` yields networkx's components in networkx's order (group ids
    follow that order)."""
    import networkx as nx

    nodes = [conv("x", "a", "wa"), conv("x", "b", "wb"), helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
             helper.make_node("Flatten", ["c"], ["f"], axis=1), helper.make_node("Gemm", ["f", "wf"], ["y"], transB=1)]
    inits = {"wa": w(4, 3, 3, 3), "wb": w(6, 3, 3, 3), "wf": w(5, 10 * 5 * 5)}
    dep = build_dependency_graph(make_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 5])], inits))
    graph = dep.graph
    assert list(graph.nodes) == list(dep.dims()) and len(graph) > 10
    assert all(graph.nodes[d]["info"] is dep.info(d) for d in dep.dims())
    assert all(graph.edges[a, b]["links"] is dep.neighbors(a)[b] for a, b in graph.edges)
    assert [sorted(c) for c in dep.components()] == [sorted(c) for c in nx.connected_components(graph)]
    assert len(list(dep.components())) > 3


def test_flatten_to_gemm_expands_each_channel_to_its_features():
    nodes = [
        conv("x", "a", "wa"),
        helper.make_node("Flatten", ["a"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ]
    inits = {"wa": w(4, 3, 3, 3), "wf": w(5, 4 * 2 * 2), "bf": w(5)}
    dep = build_dependency_graph(make_model(nodes, [("x", [1, 3, 2, 2])], [("y", [1, 5])], inits))
    g = group_of(dep, "a", 1)
    assert g.prunable and g.channels == 4
    gemm_in = next(m for m in g.members if m.dim == DimKey("wf", 1))
    # feature f of the flattened [4, 2, 2] belongs to channel f // 4
    assert (gemm_in.atoms == gemm_in.positions // 4).all() and len(gemm_in.positions) == 16


def test_depthwise_conv_couples_input_and_output_channels():
    nodes = [
        conv("x", "a", "wa"),
        helper.make_node("Conv", ["a", "wd"], ["d"], name="dw", group=6, pads=[1, 1, 1, 1]),
        conv("d", "y", "wy"),
    ]
    inits = {"wa": w(6, 3, 3, 3), "wd": w(6, 1, 3, 3), "wy": w(2, 6, 3, 3)}
    dep = build_dependency_graph(make_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 2, 5, 5])], inits))
    g = group_of(dep, "a", 1)
    assert g.prunable and g.channels == 6
    assert {"wa", "wd", "wy"} == set(g.param_names())
    assert len(dep.fixups) == 1  # the group attribute is rewritten


def test_group_conv_prunes_the_same_channels_in_every_group():
    nodes = [
        conv("x", "a", "wa"),
        helper.make_node("Conv", ["a", "wg"], ["g"], name="gc", group=2, pads=[1, 1, 1, 1]),
        conv("g", "y", "wy"),
    ]
    inits = {"wa": w(8, 3, 3, 3), "wg": w(8, 4, 3, 3), "wy": w(2, 8, 3, 3)}
    dep = build_dependency_graph(make_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 2, 5, 5])], inits))
    g_in = group_of(dep, "a", 1)
    assert g_in.channels == 4  # 4 per group, each removing one channel from both groups
    wa = next(m for m in g_in.members if m.dim == DimKey("wa", 0))
    assert (wa.atoms == wa.positions % 4).all()
    g_out = group_of(dep, "g", 1)
    assert g_out.channels == 4 and g_out.prunable


def test_se_block_couples_the_scale_with_the_features():
    nodes = [
        conv("x", "a", "wa"),
        helper.make_node("GlobalAveragePool", ["a"], ["p"]),
        helper.make_node("Conv", ["p", "w1"], ["s1"], name="fc1"),
        helper.make_node("Relu", ["s1"], ["s2"]),
        helper.make_node("Conv", ["s2", "w2"], ["s3"], name="fc2"),
        helper.make_node("HardSigmoid", ["s3"], ["s4"]),
        helper.make_node("Mul", ["a", "s4"], ["m"]),
        helper.make_node("Add", ["m", "k"], ["m2"]),
        conv("m2", "y", "wy"),
    ]
    inits = {"wa": w(8, 3, 3, 3), "w1": w(2, 8, 1, 1), "w2": w(8, 2, 1, 1), "k": w(8, 1, 1), "wy": w(2, 8, 3, 3)}
    dep = build_dependency_graph(make_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 2, 5, 5])], inits))
    g = group_of(dep, "a", 1)
    assert g.prunable and {"wa", "w1", "w2", "k", "wy"} == set(g.param_names())
    assert group_of(dep, "s1", 1).prunable  # the squeeze channels are a group of their own


@pytest.mark.parametrize(
    "node, reason",
    [
        (helper.make_node("Softmax", ["a"], ["b"], axis=1), "Softmax normalizes over this axis"),
        (helper.make_node("ReduceMean", ["a"], ["b"], axes=[1]), "reduced over by ReduceMean"),
        (helper.make_node("LRN", ["a"], ["b"], size=3), "LRN mixes neighbouring channels"),
        (helper.make_node("Foo", ["a"], ["b"], domain="custom"), "no pruning rule for op custom.Foo"),
    ],
)
def test_channel_mixing_and_unknown_ops_block_with_a_reason(node, reason):
    nodes = [conv("x", "a", "wa"), node, conv("b", "y", "wy")]
    inits = {"wa": w(4, 3, 3, 3), "wy": w(2, 4, 3, 3)}
    model = make_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 2, 5, 5])], inits)
    if node.domain:
        model.opset_import.append(helper.make_opsetid("custom", 1))
        model.graph.value_info.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4, 5, 5]))
    dep = build_dependency_graph(model)
    g = group_of(dep, "a", 1)
    assert g.blocked and not g.prunable
    assert any(reason in r for r in g.reasons), g.reasons


def test_shape_blocks_only_the_axes_it_reads():
    nodes = [
        conv("x", "a", "wa"),
        helper.make_node("Shape", ["a"], ["sh"]),
        helper.make_node("Gather", ["sh", "zero"], ["n"], axis=0),
        conv("a", "y", "wy"),
    ]
    inits = {"wa": w(4, 3, 3, 3), "wy": w(2, 4, 3, 3), "zero": np.array(0, dtype=np.int64)}
    model = make_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 2, 5, 5])], inits)
    model.graph.output.append(helper.make_tensor_value_info("n", TensorProto.INT64, []))
    assert group_of(build_dependency_graph(model), "a", 1).prunable  # only the batch size is read
    nodes[2] = helper.make_node("Gather", ["sh", "one"], ["n"], axis=0)
    model = make_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 2, 5, 5])], {**inits, "one": np.array(1, dtype=np.int64)})
    model.graph.output.append(helper.make_tensor_value_info("n", TensorProto.INT64, []))
    g = group_of(build_dependency_graph(model), "a", 1)
    assert any("its size is read by Shape" in r for r in g.reasons)


def test_split_outputs_are_separate_segments():
    nodes = [
        conv("x", "a", "wa"),
        helper.make_node("Split", ["a", "sizes"], ["p", "q"], axis=1),
        conv("p", "y1", "w1"),
        conv("q", "y2", "w2"),
    ]
    inits = {"wa": w(10, 3, 3, 3), "sizes": np.array([4, 6], dtype=np.int64), "w1": w(2, 4, 3, 3), "w2": w(2, 6, 3, 3)}
    model = make_model(nodes, [("x", [1, 3, 5, 5])], [("y1", [1, 2, 5, 5]), ("y2", [1, 2, 5, 5])], inits)
    dep = build_dependency_graph(model)
    gp, gq = group_of(dep, "p", 1), group_of(dep, "q", 1)
    assert (gp.channels, gq.channels) == (4, 6) and gp.prunable and gq.prunable
    wa_q = next(m for m in gq.members if m.dim == DimKey("wa", 0))
    assert wa_q.positions.tolist() == [4, 5, 6, 7, 8, 9]


def test_a_rule_added_to_the_registry_is_used():
    @register_rule("Twice", domain="test.graphprune")
    def twice(ctx):
        for axis in range(ctx.rank(ctx.input(0))):
            ctx.couple(DimKey(ctx.input(0), axis), DimKey(ctx.outputs[0], axis))

    assert "test.graphprune.Twice" in registered_ops()
    nodes = [conv("x", "a", "wa"), helper.make_node("Twice", ["a"], ["b"], domain="test.graphprune"), conv("b", "y", "wy")]
    model = make_model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 2, 5, 5])], {"wa": w(4, 3, 3, 3), "wy": w(2, 4, 3, 3)})
    model.opset_import.append(helper.make_opsetid("test.graphprune", 1))
    model.graph.value_info.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4, 5, 5]))
    g = group_of(build_dependency_graph(model), "a", 1)
    assert g.prunable and {"wa", "wy"} == set(g.param_names())

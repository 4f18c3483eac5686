"""canonicalize's shortcuts past onnx-graphsurgeon give graphsurgeon's answer: skipped when its round
trip changes nothing (``round_trip_keeps``), replayed on the proto when nothing folds (``gs_export``).

Oracle: ``CanonicalizePass`` with ``_shortcuts = False`` (always through graphsurgeon) on random small graphs
that mix what the round trip changes (dead nodes, unsorted or shallower-later nodes, initializers
out of read order or unread, foldable nodes, Shape nodes of static dims and Gathers and Slices of
them, Casts around shape arithmetic, node fields make_node drops) with what it keeps.  Whenever
the predicate says "kept", the pass's answer must be the round trip's, byte for byte.
"""

import random
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.gs_round_trip import replayable, round_trip_keeps
from graphprune.passes import CanonicalizePass
from tests.helpers import conv_model


def _random_model(seed: int) -> onnx.ModelProto:
    rng = random.Random(seed)
    dims = [rng.choice(["N", 2, None]), 4]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims if rng.random() < 0.9 else None)
    inits = [numpy_helper.from_array(np.full((4,), i + 1, np.float32), f"w{i}") for i in range(3)]
    inits.append(numpy_helper.from_array(np.eye(4, dtype=np.float32), "m"))
    inits.append(numpy_helper.from_array(np.array(rng.choice([0, 1, -1]), np.int64), "idx"))
    inits.append(numpy_helper.from_array(np.array([rng.choice([0, 1])], np.int64), "start"))
    inits.append(numpy_helper.from_array(np.array([2], np.int64), "end"))
    nodes, floats, ints, value_info = [], ["x"], [], []
    for i in range(rng.randint(2, 9)):
        out = f"t{i}"
        kind = rng.choice(["add", "relu", "matmul", "shape", "gather", "slice", "cast", "const", "neg", "split"])
        if kind == "add":
            nodes.append(helper.make_node("Add", [rng.choice(floats), rng.choice(["w0", "w1"])], [out]))
        elif kind in ("relu", "neg"):
            nodes.append(helper.make_node(kind.capitalize(), [rng.choice(floats)], [out]))
        elif kind == "matmul":
            nodes.append(helper.make_node("MatMul", [rng.choice(floats), "m"], [out]))
        elif kind == "shape":
            nodes.append(helper.make_node("Shape", [rng.choice(floats)], [out]))
            ints.append(out)
            continue
        elif kind in ("gather", "slice") and ints:
            src = rng.choice(ints)
            if kind == "gather":
                nodes.append(helper.make_node("Gather", [src, "idx"], [out], axis=0))
            else:
                nodes.append(helper.make_node("Slice", [src, "start", "end"], [out]))
            ints.append(out)
            continue
        elif kind == "cast" and ints:
            src = rng.choice(ints)
            nodes.append(helper.make_node("Cast", [src], [out + "f"], to=TensorProto.FLOAT))
            nodes.append(helper.make_node("Mul", [out + "f", "w2"], [out + "m"]))
            nodes.append(helper.make_node("Cast", [out + "m"], [out], to=TensorProto.INT64))
            ints.append(out)
            continue
        elif kind == "const":
            nodes.append(helper.make_node("Add", ["w0", "w1"], [out]))
        elif kind == "split":  # two outputs, the second maybe read by nothing; an omitted optional input
            nodes.append(helper.make_node("Split", [rng.choice(floats)], [out, out + "b"], axis=-1, num_outputs=2))
            nodes.append(helper.make_node("Clip", [out, "", ""], [out + "c"]))
            floats.append(out + "c")
        else:
            continue
        floats.append(out)
        if rng.random() < 0.3:
            value_info.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [rng.choice(["N", 2]), 4]))
    produced = [o for n in nodes for o in n.output]
    outputs = rng.sample(produced, k=min(len(produced), rng.randint(1, 3))) if produced else ["x"]
    if rng.random() < 0.8:  # usually everything feeds an output
        outputs = list(dict.fromkeys(outputs + [o for n in nodes for o in n.output if n.op_type != "Cast"]))
    for node in nodes:
        if rng.random() < 0.2:
            node.name = f"n{rng.randint(0, 99)}"
        if rng.random() < 0.03:
            node.doc_string = "dropped by make_node"
    if rng.random() < 0.2:
        rng.shuffle(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [t for t in inits if t.name in used or rng.random() < 0.1]
    if rng.random() < 0.3:
        rng.shuffle(kept)
    else:  # in the order nodes read them, as graphsurgeon writes them
        order = list(dict.fromkeys(i for n in nodes for i in n.input))
        kept.sort(key=lambda t: order.index(t.name) if t.name in order else len(order))
    if rng.random() < 0.1:
        outputs.append("w0")  # an initializer as a graph output
    if rng.random() < 0.2 and value_info:  # a second entry for a tensor: graphsurgeon merges them
        value_info.append(helper.make_tensor_value_info(value_info[0].name, TensorProto.FLOAT, None))
    if rng.random() < 0.1:
        value_info.insert(0, helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 4]))
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    graph = helper.make_graph(nodes, "g", [x], outs, kept, value_info=value_info)
    if rng.random() < 0.05:
        graph.ClearField("name")
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def _answer(call, model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call(model)
    return (result.modified, result.model is model, result.stats,
            result.model.SerializeToString(deterministic=True), [str(w.message) for w in caught])


def _through_graphsurgeon(**options) -> CanonicalizePass:
    oracle = CanonicalizePass(**options)
    oracle._shortcuts = False
    return oracle


@pytest.mark.parametrize("seed", range(40))
def test_the_shortcuts_answer_what_graphsurgeon_answers(seed):
    model = _random_model(seed)
    options = [{}, {"fold": False}, {"fuse": False}][seed % 3]
    # ``call``: the random graphs need not pass the checker the debug mode of ``__call__`` runs
    assert _answer(CanonicalizePass(**options).call, model) == _answer(_through_graphsurgeon(**options).call, model)


def test_the_shortcut_is_taken_on_canonical_graphs_and_not_on_the_others():
    model = CanonicalizePass()(conv_model()).model
    assert round_trip_keeps(model, replayable(model, True))
    dead = onnx.ModelProto()
    dead.CopyFrom(model)
    dead.graph.node.append(helper.make_node("Relu", [model.graph.input[0].name], ["unread"]))
    assert not round_trip_keeps(dead, replayable(dead, True))
    unsorted = onnx.ModelProto()
    unsorted.CopyFrom(model)
    unsorted.graph.node.reverse()
    assert not round_trip_keeps(unsorted, replayable(unsorted, True))
    # a graph any of whose nodes needs folding is left to graphsurgeon when folding is on
    foldable = onnx.ModelProto()
    foldable.CopyFrom(model)
    first = foldable.graph.node[0]
    weight = next(name for name in first.input if name in {i.name for i in foldable.graph.initializer})
    foldable.graph.node.insert(0, helper.make_node("Identity", [weight], [weight + "_id"]))
    first.input[list(first.input).index(weight)] = weight + "_id"
    assert not round_trip_keeps(foldable, replayable(foldable, True))
    assert round_trip_keeps(foldable, replayable(foldable, False))


def test_a_graph_with_dead_nodes_and_no_fold_is_replayed_as_graphsurgeon_writes_it():
    model = CanonicalizePass()(conv_model()).model
    model.graph.node.append(helper.make_node("Relu", ["x"], ["unread"]))
    model.graph.node.insert(0, helper.make_node("Neg", ["x"], ["unread_too"], name="first"))
    assert replayable(model, True) is not None and not round_trip_keeps(model, replayable(model, True))
    result = CanonicalizePass().call(model)
    assert result.modified and result.stats["nodes_removed"] == 2
    assert _answer(CanonicalizePass().call, model) == _answer(_through_graphsurgeon().call, model)

"""external_data.external_tensors: every record of a model, wherever it sits, in a fixed order."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from graphprune.external_data import external_tensors


def _tensor(name, external=True):
    tensor = numpy_helper.from_array(np.zeros(2, np.float32), name)
    if external:  # a record only: the walk reads no data
        tensor.data_location = TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value="w.bin")
    return tensor


def _sparse(tag):
    return helper.make_sparse_tensor(_tensor(tag + "v"), numpy_helper.from_array(np.array([0, 1], np.int64), tag + "i"), [4])


def _graph(tag, depth):
    nodes = [helper.make_node("Constant", [], [tag + "c"], value=_tensor(tag + "t"))]
    if depth:
        nodes.append(helper.make_node("If", ["b"], [tag + "o"], then_branch=_graph(tag + "T", depth - 1),
                                      else_branch=_graph(tag + "E", depth - 1)))
        nodes.append(helper.make_node("Foo", [], [tag + "z"], domain="x", ts=[_tensor(tag + "l"), _tensor(tag + "m", False)],
                                      gs=[_graph(tag + "G", depth - 1)], sp=_sparse(tag + "s")))
    return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(tag + "c", TensorProto.FLOAT, [2])],
                             initializer=[_tensor(tag + "a"), _tensor(tag + "b", False)], sparse_initializer=[_sparse(tag + "p")])


def test_records_in_subgraphs_functions_sparse_and_attribute_tensors_in_order():
    model = helper.make_model(_graph("M", 1))
    model.functions.append(helper.make_function("d", "F", [], ["y"], [
        helper.make_node("Constant", [], ["y"], value=_tensor("Ft")),
        helper.make_node("If", ["b"], ["q"], then_branch=_graph("FT", 0), else_branch=_graph("FE", 0))], []))
    names = [t.name for t in external_tensors(model)]
    # each graph: initializers, sparse initializers, node attributes in node order (make_node sorts
    # them by name: else_branch before then_branch, sp before ts); then its subgraphs depth first,
    # the last found first (functions come after the main graph on the stack: they come first)
    assert names == [
        "Ft", "FTa", "FTpv", "FTt", "FEa", "FEpv", "FEt",
        "Ma", "Mpv", "Mt", "Msv", "Ml",
        "MGa", "MGpv", "MGt", "MTa", "MTpv", "MTt", "MEa", "MEpv", "MEt",
    ]
    assert len(names) == len(set(names))
    # the sparse parts' indices (in memory) and the inline tensors are not records
    assert not any(n.endswith(("b", "m", "pi", "si")) for n in names)

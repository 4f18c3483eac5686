"""Models and data shared by the fine-tuning tests (no tests here).

``shrink_digits`` removes channels of the digits CNN by hand (largest-L1 filters kept, BatchNorm and
the next layer's inputs sliced to match): a pruned model without depending on the prune pass.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.data import InputSet, load_inputs
from graphprune.model_io import load

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
DIGITS = os.path.join(MODELS, "digits_cnn.onnx")
_LAYERS = (("conv1", "bn1", "conv2"), ("conv2", "bn2", "conv3"), ("conv3", "bn3", "fc"))


def digits():
    """(model, train InputSet, train labels, test InputSet, test labels)."""
    model = load(DIGITS)
    train, train_extra = load_inputs(os.path.join(MODELS, "digits_train.npz"), model, ["labels"])
    test, test_extra = load_inputs(os.path.join(MODELS, "digits_test.npz"), model, ["labels"])
    return model, train, train_extra["labels"], test, test_extra["labels"]


def subset(data: InputSet, labels: np.ndarray, count: int, seed: int = 0):
    """``count`` samples picked at random (seeded), with their labels."""
    picked = np.sort(np.random.default_rng(seed).permutation(len(labels))[:count])
    return data.subset(picked), labels[picked]


def shrink_digits(model: onnx.ModelProto, keep: float = 0.5) -> onnx.ModelProto:
    """The digits CNN with only ``keep`` of each conv's output channels (largest L1 norm first)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    weights = {init.name: numpy_helper.to_array(init) for init in result.graph.initializer}
    for conv, bn, following in _LAYERS:
        w = weights[f"{conv}.weight"]
        kept = np.sort(np.argsort(-np.abs(w).sum(axis=(1, 2, 3)))[: int(round(len(w) * keep))])
        for name in (f"{conv}.weight", f"{conv}.bias", f"{bn}.weight", f"{bn}.bias", f"{bn}.running_mean", f"{bn}.running_var"):
            weights[name] = weights[name][kept]
        weights[f"{following}.weight"] = weights[f"{following}.weight"][:, kept]
    for index, init in enumerate(result.graph.initializer):
        result.graph.initializer[index].CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    del result.graph.value_info[:]
    return result


def structure(model: onnx.ModelProto):
    """Everything about a model except its weight values: nodes, names, I/O, weight names/shapes/types."""
    def attrs(node):
        # Constant nodes hold weights: compare their tensors' shape and type, not their values.
        out = []
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                out.append((a.name, tuple(a.t.dims), a.t.data_type))
            else:
                out.append((a.name, a.SerializeToString()))
        return out

    graph = model.graph
    return {
        "nodes": [(n.name, n.op_type, n.domain, list(n.input), list(n.output), attrs(n)) for n in graph.node],
        "inputs": [vi.SerializeToString() for vi in graph.input],
        "outputs": [vi.SerializeToString() for vi in graph.output],
        "initializers": [(i.name, tuple(i.dims), i.data_type) for i in graph.initializer],
        "opsets": [(o.domain, o.version) for o in model.opset_import],
        "ir_version": model.ir_version,
    }


def weights_of(model: onnx.ModelProto):
    """Initializer and Constant-node values by name."""
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def no_weight_model() -> onnx.ModelProto:
    """x -> Relu -> Add(x): nothing to train."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Add", ["r", "x"], ["y"], name="add")],
        "no_weights",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model

"""Real architectures from onnx's bundled "light" test models, with seeded weights of a realistic scale.

onnx ships ``backend/test/data/light/light_*.onnx``: ResNet-50, ShuffleNet, DenseNet-121,
Inception v1/v2, SqueezeNet, VGG-19, AlexNet and ZFNet-512 as IR 3 / opset 9 graphs whose large
weights were replaced by ``ConstantOfShape`` nodes filling them with 0.02.  Such constants are
useless for pruning (every filter ties with every other) and make the outputs saturate, so
``load_light_model`` puts back seeded random initializers chosen by the role of each tensor:

* Conv / Gemm weights: He-normal (He-uniform above 4M values, where drawing normals dominates the
  load time) with a per-filter magnitude spread, rescaled so the layer's output has about unit
  variance given the estimated statistics of its input;
* biases and other tensors: small normal values;
* BatchNormalization: scale ~ U(0.5, 1.5), small bias, and running mean / variance set to the
  estimated statistics of the layer's input (variance times U(0.5, 1.5), always positive), as
  training would leave them.

Input statistics come from ``graphprune.testing.moments`` (inputs taken as standard normal), so
outputs stay finite and far from saturation without running the model.  The small tensors the
light models kept (trained values under onnx's size threshold) stay as they are, except BN running
statistics: those described activations of weights that are gone, and kept as they were they blow
the next layers up by orders of magnitude.  The result imports the same opset, has the same inputs
and outputs, lists no initializer as an input (so it is labelled IR 4, the first version that
allows this), and passes the full checker.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from graphprune.ir import get_attr, initializer_map
from graphprune.testing import moments as mo
from graphprune.testing.moments import Moments

__all__ = ["LIGHT_DIR", "light_model_names", "light_model_path", "load_light_model"]

LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")

# Ops that only relabel a constant's shape on its way to the op that uses it.
_RESHAPES = ("Reshape", "Unsqueeze", "Squeeze", "Flatten")
# Weights with more values than this (VGG / AlexNet classifiers) are drawn uniform, not normal.
_UNIFORM_ABOVE = 1 << 22
# IR 4 is the first version in which initializers need not be listed as graph inputs.
_IR_WITHOUT_INIT_INPUTS = 4


def light_model_names() -> List[str]:
    """Names accepted by ``load_light_model`` (``resnet50``, ``vgg19``...), sorted."""
    files = os.listdir(LIGHT_DIR) if os.path.isdir(LIGHT_DIR) else []
    return sorted(f[len("light_") : -len(".onnx")] for f in files if f.startswith("light_") and f.endswith(".onnx"))


def light_model_path(name: str) -> str:
    path = os.path.join(LIGHT_DIR, f"light_{name}.onnx")
    if not os.path.exists(path):
        raise ValueError(f"no light model {name!r} in {LIGHT_DIR} (have: {', '.join(light_model_names())})")
    return path


def load_light_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """The light model ``name`` with every constant-shaped ``ConstantOfShape`` turned into seeded weights.

    Args:
        name: one of ``light_model_names()``.
        seed: the same seed gives byte-identical models.
    """
    model = onnx.load(light_model_path(name))
    filler = _WeightFiller(model, np.random.default_rng(seed))
    weights = filler.run()
    return _rebuild(model, weights)


class _WeightFiller:
    """Walks the graph in order, estimating activation moments and choosing each weight on first use."""

    def __init__(self, model: onnx.ModelProto, rng: np.random.Generator):
        self.graph = model.graph
        self.rng = rng
        self.inits = initializer_map(self.graph)
        inferred = onnx.shape_inference.infer_shapes(model)
        self.shapes = {
            vi.name: tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
            for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
        }
        self.filled = self._constant_of_shape_outputs()
        # The tensor a parameter reaches its user as (past Reshape/Unsqueeze) -> the stored name.
        self.alias, self.alias_shape, self.relabel_nodes = self._follow_relabels()
        self.values: Dict[str, np.ndarray] = {}
        self.stats: Dict[str, Moments] = {}
        self.relu_inputs: Dict[str, str] = {}  # Relu output -> its input

    def _constant_of_shape_outputs(self) -> Dict[str, Tuple[int, ...]]:
        out = {}
        for node in self.graph.node:
            if node.op_type != "ConstantOfShape" or not node.input or node.input[0] not in self.inits:
                continue  # a shape computed at run time: not a weight
            value = get_attr(node, "value")
            if value is not None and value.data_type != onnx.TensorProto.FLOAT:
                continue  # integer fills are indices or masks, not weights
            out[node.output[0]] = tuple(int(d) for d in numpy_helper.to_array(self.inits[node.input[0]]))
        return out

    def _follow_relabels(self):
        consumers: Dict[str, List[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        kept = {n: tuple(i.dims) for n, i in self.inits.items() if i.data_type == onnx.TensorProto.FLOAT}
        alias, alias_shape, relabel_nodes = {}, {}, set()
        for name, shape in list(self.filled.items()) + list(kept.items()):
            current = name
            while len(consumers.get(current, [])) == 1 and consumers[current][0].op_type in _RESHAPES:
                node = consumers[current][0]
                if node.input[0] != current:
                    break
                relabel_nodes.add(node.output[0])
                current = node.output[0]
            alias[current] = name
            alias_shape[current] = tuple(self.shapes.get(current) or shape)
        return alias, alias_shape, relabel_nodes

    def run(self) -> Dict[str, np.ndarray]:
        for vi in self.graph.input:
            if vi.name not in self.inits:
                self.stats[vi.name] = mo.unit()  # callers feed standard-normal data
        for node in self.graph.node:
            if node.op_type == "ConstantOfShape" or node.output[0] in self.relabel_nodes:
                continue
            handler = _HANDLERS.get(node.op_type)
            if handler is None:
                raise NotImplementedError(f"light model uses {node.op_type}, which the weight filler does not model")
            self.stats[node.output[0]] = handler(self, node)
        for name in sorted(set(self.filled) - set(self.values)):  # filled tensors no modelled op used
            self.values[name] = self.small(self.filled[name], 0.05)
        return self.values

    # --- what a node reads ------------------------------------------------------------------------

    def channels(self, name: str) -> int:
        shape = self.shapes.get(name) or ()
        return int(shape[1]) if len(shape) > 1 and shape[1] > 0 else 1

    def activation(self, name: str) -> Moments:
        return self.stats.get(name, mo.unit()).expand(self.channels(name))

    def is_param(self, name: str) -> bool:
        return name in self.alias or name in self.inits

    def param(self, name: str, make: Callable[[Tuple[int, ...]], np.ndarray], replace_kept: bool = False) -> np.ndarray:
        """The value of parameter input ``name``: a kept initializer, or a new one from ``make``.

        ``replace_kept`` regenerates a kept initializer as well (statistics of weights that are gone).
        """
        source = self.alias.get(name, name)
        if source in self.filled or (replace_kept and source in self.inits):
            if source not in self.values:
                stored = self.filled.get(source) or tuple(self.inits[source].dims)
                value = make(self.alias_shape.get(name, stored)).astype(np.float32, copy=False)
                self.values[source] = value.reshape(stored)
            return self.values[source].reshape(self.alias_shape.get(name, self.values[source].shape))
        value = numpy_helper.to_array(self.inits[source]).astype(np.float64)
        return value.reshape(self.alias_shape.get(name, value.shape))

    def small(self, shape, std: float) -> np.ndarray:
        return (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    def he_weight(self, shape: Tuple[int, ...], x: Moments, tap_fraction: float = 1.0) -> np.ndarray:
        """He-normal, a per-filter spread (so magnitude criteria can rank filters), scaled to unit output."""
        fan_in = int(np.prod(shape[1:]))
        if int(np.prod(shape)) > _UNIFORM_ABOVE:
            # Unit-variance uniform (He-uniform, torch's default init): five times cheaper to draw.
            w = self.rng.random(shape, dtype=np.float32)
            w -= np.float32(0.5)
            w *= np.float32(np.sqrt(12.0))
        else:
            w = self.rng.standard_normal(shape, dtype=np.float32)
        spread = np.exp(self.rng.normal(0.0, 0.25, size=(shape[0],) + (1,) * (len(shape) - 1)))
        he_std = np.sqrt(2.0 / fan_in)
        # He-normal assumes an input of mean square 1/2 (a ReLU of unit variance); ours is estimated.
        gain = np.sqrt(0.5 / max(float(np.mean(x.meansq)) * tap_fraction, 1e-12))
        w *= (spread * (he_std * gain)).astype(np.float32)  # in place: VGG's classifier is 400 MB
        return w


# --- per-op handlers: each returns the moments of the node's first output ------------------------


def _conv(f: _WeightFiller, node: onnx.NodeProto) -> Moments:
    groups = get_attr(node, "group", 1)
    x = f.activation(node.input[0])
    taps = _tap_fraction(node, f.shapes.get(node.input[0]))
    w = f.param(node.input[1], lambda s: f.he_weight(s, x, taps))
    b = None
    if len(node.input) > 2 and node.input[2]:
        b = f.param(node.input[2], lambda s: f.small(s, 0.1))
    return mo.linear(x, w, b, groups=groups, tap_fraction=taps)


def _tap_fraction(node: onnx.NodeProto, in_shape) -> float:
    kernel = get_attr(node, "kernel_shape")
    if not in_shape or not kernel:
        return 1.0
    rank = len(kernel)
    strides = get_attr(node, "strides", [1] * rank)
    pads = get_attr(node, "pads", [0] * (2 * rank))
    dilations = get_attr(node, "dilations", [1] * rank)
    fraction = 1.0
    for axis in range(rank):
        size = in_shape[2 + axis]
        fraction *= mo.padding_fraction(size, kernel[axis], strides[axis], pads[axis], pads[axis + rank], dilations[axis])
    return fraction


def _gemm(f: _WeightFiller, node: onnx.NodeProto) -> Moments:
    trans_b = get_attr(node, "transB", 0)
    x = f.activation(node.input[0])

    def make(shape):
        w = f.he_weight(tuple(shape) if trans_b else tuple(shape[::-1]), x)
        return w if trans_b else w.T

    w = f.param(node.input[1], make)
    b = f.param(node.input[2], lambda s: f.small(s, 0.1)) if len(node.input) > 2 and node.input[2] else None
    return mo.linear(x, w if trans_b else w.T, b)


def _batch_norm(f: _WeightFiller, node: onnx.NodeProto) -> Moments:
    x = f.activation(node.input[0])
    eps = get_attr(node, "epsilon", 1e-5)
    scale = f.param(node.input[1], lambda s: f.rng.uniform(0.5, 1.5, s))
    bias = f.param(node.input[2], lambda s: f.small(s, 0.1))
    # Running statistics as training leaves them: close to what the layer actually sees.  Trained
    # values the light model kept described activations of weights that are gone: replace them too.
    mean = f.param(node.input[3], lambda s: x.mean + f.rng.normal(0.0, 0.1, s) * x.std, replace_kept=True)
    var = f.param(node.input[4], lambda s: x.var * f.rng.uniform(0.5, 1.5, s), replace_kept=True)
    a = scale / np.sqrt(var + eps)
    return mo.channel_affine(x, a, bias - a * mean)


def _binary(f: _WeightFiller, node: onnx.NodeProto) -> Moments:
    """Add / Mul / Sum: an activation with a per-channel parameter, or activations together."""
    params = [n for n in node.input if f.is_param(n)]
    acts = [f.activation(n) for n in node.input if not f.is_param(n)]
    if node.op_type == "Mul" and params and acts:
        s = f.param(params[0], lambda shape: f.rng.uniform(0.5, 1.5, shape))
        return mo.channel_affine(acts[0], s, np.zeros(s.size))
    if node.op_type == "Add" and params and acts:
        b = f.param(params[0], lambda shape: f.small(shape, 0.1))
        return mo.channel_affine(acts[0], np.ones(b.size), b)
    if node.op_type == "Mul":
        return mo.mul(*acts)
    return mo.add(*acts)


def _relu(f: _WeightFiller, node: onnx.NodeProto) -> Moments:
    f.relu_inputs[node.output[0]] = node.input[0]
    return mo.relu(f.activation(node.input[0]))


def _same(f: _WeightFiller, node: onnx.NodeProto) -> Moments:
    """Ops that keep values and channels (LRN with alpha 1e-4 is almost the identity)."""
    return f.activation(node.input[0])


def _relabel(f: _WeightFiller, node: onnx.NodeProto) -> Moments:
    """Reshape / Transpose / Flatten of an activation: follow where each channel's values go.

    The op is applied to a tensor holding each element's channel index; an output channel fed by a
    single input channel keeps its statistics (a channel shuffle permutes them, Flatten repeats each
    over its positions), one fed by several gets their average.
    """
    in_shape, out_shape = f.shapes.get(node.input[0]), f.shapes.get(node.output[0])
    x = f.activation(node.input[0])
    if not in_shape or not out_shape or len(in_shape) < 2 or len(out_shape) < 2 or 0 in in_shape:
        return x.averaged()
    ids = np.broadcast_to(np.arange(in_shape[1]).reshape((1, -1) + (1,) * (len(in_shape) - 2)), in_shape)
    if node.op_type == "Transpose":
        moved = np.transpose(ids, get_attr(node, "perm"))
    else:
        moved = ids.reshape(out_shape)
    rows = np.moveaxis(moved, 1, 0).reshape(moved.shape[1], -1)
    if (rows == rows[:, :1]).all():
        return Moments(x.mean[rows[:, 0]], x.meansq[rows[:, 0]])
    return Moments(x.mean[rows].mean(axis=1), x.meansq[rows].mean(axis=1))


def _kernel_area(node: onnx.NodeProto) -> int:
    return int(np.prod(get_attr(node, "kernel_shape", [1])))


def _max_pool(f: _WeightFiller, node: onnx.NodeProto) -> Moments:
    relu_input = f.relu_inputs.get(node.input[0])
    if relu_input is not None:
        # max(relu(z)) = relu(max(z)), and z is the Gaussian-like one.
        return mo.relu(mo.max_pool(f.activation(relu_input), _kernel_area(node)))
    return mo.max_pool(f.activation(node.input[0]), _kernel_area(node))


def _avg_pool(f: _WeightFiller, node: onnx.NodeProto) -> Moments:
    return mo.avg_pool(f.activation(node.input[0]), _kernel_area(node))


def _global_avg_pool(f: _WeightFiller, node: onnx.NodeProto) -> Moments:
    return mo.global_avg_pool(f.activation(node.input[0]))


def _concat(f: _WeightFiller, node: onnx.NodeProto) -> Moments:
    if get_attr(node, "axis", 1) != 1:
        return mo.concat([f.activation(n).averaged() for n in node.input], [1] * len(node.input)).averaged()
    return mo.concat([f.activation(n) for n in node.input], [f.channels(n) for n in node.input])


def _softmax(f: _WeightFiller, node: onnx.NodeProto) -> Moments:
    width = (f.shapes.get(node.output[0]) or (1,))[-1] or 1
    return mo.make(1.0 / width, 0.0)


_HANDLERS: Dict[str, Callable[[_WeightFiller, onnx.NodeProto], Moments]] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "BatchNormalization": _batch_norm,
    "Add": _binary,
    "Mul": _binary,
    "Sum": _binary,
    "Relu": _relu,
    "MaxPool": _max_pool,
    "AveragePool": _avg_pool,
    "GlobalAveragePool": _global_avg_pool,
    "Concat": _concat,
    "Softmax": _softmax,
    "LRN": _same,
    "Dropout": _same,
    "Reshape": _relabel,
    "Transpose": _relabel,
    "Flatten": _relabel,
    "Unsqueeze": _relabel,
    "Squeeze": _relabel,
}


def _rebuild(model: onnx.ModelProto, weights: Dict[str, np.ndarray]) -> onnx.ModelProto:
    """``model`` without the ConstantOfShape nodes, their shape inputs, and initializer inputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    was_initializer = {init.name for init in graph.initializer}
    nodes = [n for n in graph.node if not (n.op_type == "ConstantOfShape" and n.output[0] in weights)]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in graph.node for name in n.input}
    kept = [init for init in graph.initializer if init.name in used and init.name not in weights]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for name in sorted(weights):
        # Filled in place: building a TensorProto and extending would copy 500 MB twice for VGG-19.
        tensor = graph.initializer.add()
        tensor.name = name
        tensor.data_type = onnx.TensorProto.FLOAT
        tensor.dims.extend(weights[name].shape)
        tensor.raw_data = np.ascontiguousarray(weights[name], dtype="<f4").tobytes()
    real = [vi for vi in graph.input if vi.name not in was_initializer]
    del graph.input[:]
    graph.input.extend(real)
    out.ir_version = max(out.ir_version, _IR_WITHOUT_INIT_INPUTS)
    return out

"""Differentiable stand-ins for ops onnxruntime-training cannot differentiate, used only while training.

The gradient builders of onnxruntime-training 1.19 lack HardSigmoid, HardSwish, Softplus, Mish, Elu,
Selu, Celu, Softsign, PRelu, Sum, Mean, InstanceNormalization and GroupNormalization.  The training graph replaces
each such node by the same function written with ops that have gradients (Mul/Add/Clip/Relu/Exp/Log/
ReduceMean/Sqrt...); the inference model keeps the original node, and only trained weights are copied
back.  BatchNormalization is replaced too, by its inference form with *frozen* running statistics (see
``_batch_norm``).  LayerNormalization has a gradient but needs its optional mean / inv-std outputs.

LRN (no gradient) becomes a channel-window average of squares, and nearest-neighbour Resize by
integer factors (whose gradient has no CPU kernel) a broadcast into blocks.

Each stand-in is a function registered by op type that writes nodes through a ``StandinBuilder``;
it may return ``False`` to leave a node as it is.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune import ir
from graphprune.errors import UserError

__all__ = ["STANDINS", "StandinBuilder", "apply_standins"]

_PREFIX = "graphprune.train"


class StandinBuilder:
    """Writes the replacement nodes of one node; the last op must write ``self.y`` (the node's output).

    Args:
        node: the node being replaced.
        opset: the model's ai.onnx opset (decides attribute vs input forms of Clip / ReduceMean).
        constants: name -> value of the graph's constant tensors (to read BatchNorm statistics).
        shapes: tensor name -> inferred shape (None for unknown dims) where the rank is known.
    """

    def __init__(self, node: onnx.NodeProto, opset: int, constants: Dict[str, np.ndarray],
                 shapes: Dict[str, Tuple[Optional[int], ...]]):
        self.node = node
        self.shapes = shapes
        self.rank = len(shapes[node.input[0]]) if node.input[0] in shapes else None
        self.opset = opset
        self.constants = constants
        self.x = node.input[0]
        self.y = node.output[0]
        self.nodes: List[onnx.NodeProto] = []
        self.initializers: List[onnx.TensorProto] = []
        self._base = f"{_PREFIX}/{node.name or node.output[0]}"
        self._count = 0

    def _fresh(self, kind: str) -> str:
        self._count += 1
        return f"{self._base}/{kind}{self._count}"

    def attr(self, name: str, default):
        return ir.get_attr(self.node, name, default)

    def const(self, value) -> str:
        name = self._fresh("c")
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str = "", **attrs) -> str:
        out = out or self._fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self._fresh("n"), **attrs))
        return out

    def clip(self, x: str, low: float, high: float, out: str = "") -> str:
        if self.opset < 11:
            return self.op("Clip", x, out=out, min=float(low), max=float(high))
        return self.op("Clip", x, self.const(np.float32(low)), self.const(np.float32(high)), out=out)

    def reduce_mean(self, x: str, axes: List[int]) -> str:
        if self.opset < 18:
            return self.op("ReduceMean", x, axes=axes, keepdims=1)
        return self.op("ReduceMean", x, self.const(np.array(axes, np.int64)), keepdims=1)

    def min_zero(self, x: str) -> str:
        """min(x, 0) as -Relu(-x): both have gradients."""
        return self.op("Neg", self.op("Relu", self.op("Neg", x)))

    def softplus(self, x: str) -> str:
        """log(1 + e^x) without overflow: relu(x) + log(1 + e^-|x|)."""
        tail = self.op("Log", self.op("Add", self.const(np.float32(1)), self.op("Exp", self.op("Neg", self.op("Abs", x)))))
        return self.op("Add", self.op("Relu", x), tail)

    def known_rank(self) -> int:
        if self.rank is None:
            raise UserError(
                f"{self.node.op_type} node {self.node.name!r}: the rank of its input is unknown, "
                "which its training stand-in needs (give the model's input shapes)"
            )
        return self.rank

    def channel_shaped(self, vector: str, rank: int) -> str:
        """A [C] parameter reshaped to [C, 1, ..., 1] so that it broadcasts over [N, C, ...] of ``rank``."""
        return self.op("Reshape", vector, self.const(np.array([-1] + [1] * (rank - 2), np.int64)))

    def normalize(self, x: str, axes: List[int], eps: float) -> str:
        """(x - mean) / sqrt(var + eps) over ``axes``."""
        centered = self.op("Sub", x, self.reduce_mean(x, axes))
        var = self.reduce_mean(self.op("Mul", centered, centered), axes)
        return self.op("Div", centered, self.op("Sqrt", self.op("Add", var, self.const(np.float32(eps)))))


Standin = Callable[[StandinBuilder], Optional[bool]]
STANDINS: Dict[str, Standin] = {}


def _standin(*op_types: str):
    def register(fn: Standin) -> Standin:
        for op in op_types:
            STANDINS[op] = fn
        return fn

    return register


def _hard_sigmoid_of(b: StandinBuilder, x: str, alpha: float, beta: float, out: str = "") -> str:
    affine = b.op("Add", b.op("Mul", x, b.const(np.float32(alpha))), b.const(np.float32(beta)))
    return b.clip(affine, 0.0, 1.0, out=out)


@_standin("HardSigmoid")
def _hard_sigmoid(b):
    _hard_sigmoid_of(b, b.x, b.attr("alpha", 0.2), b.attr("beta", 0.5), out=b.y)


@_standin("HardSwish")
def _hard_swish(b):
    b.op("Mul", b.x, _hard_sigmoid_of(b, b.x, 1.0 / 6.0, 0.5), out=b.y)


@_standin("Softplus")
def _softplus(b):
    b.op("Identity", b.softplus(b.x), out=b.y)


@_standin("Mish")
def _mish(b):
    b.op("Mul", b.x, b.op("Tanh", b.softplus(b.x)), out=b.y)


def _exp_minus_one_of_negative_part(b: StandinBuilder, scale: float) -> str:
    """e^(min(x,0) / scale) - 1: the negative branch of Elu/Celu/Selu (0 for x >= 0)."""
    negative = b.min_zero(b.x)
    if scale != 1.0:
        negative = b.op("Mul", negative, b.const(np.float32(1.0 / scale)))
    return b.op("Sub", b.op("Exp", negative), b.const(np.float32(1)))


@_standin("Elu")
def _elu(b):
    alpha = b.attr("alpha", 1.0)
    tail = b.op("Mul", _exp_minus_one_of_negative_part(b, 1.0), b.const(np.float32(alpha)))
    b.op("Add", b.op("Relu", b.x), tail, out=b.y)


@_standin("Celu")
def _celu(b):
    alpha = b.attr("alpha", 1.0)
    tail = b.op("Mul", _exp_minus_one_of_negative_part(b, alpha), b.const(np.float32(alpha)))
    b.op("Add", b.op("Relu", b.x), tail, out=b.y)


@_standin("Selu")
def _selu(b):
    alpha = b.attr("alpha", 1.67326319217681884765625)
    gamma = b.attr("gamma", 1.05070102214813232421875)
    tail = b.op("Mul", _exp_minus_one_of_negative_part(b, 1.0), b.const(np.float32(alpha)))
    b.op("Mul", b.op("Add", b.op("Relu", b.x), tail), b.const(np.float32(gamma)), out=b.y)


@_standin("Softsign")
def _softsign(b):
    b.op("Div", b.x, b.op("Add", b.const(np.float32(1)), b.op("Abs", b.x)), out=b.y)


@_standin("PRelu")
def _prelu(b):
    slope = b.node.input[1]
    b.op("Sub", b.op("Relu", b.x), b.op("Mul", slope, b.op("Relu", b.op("Neg", b.x))), out=b.y)


@_standin("Sum", "Mean")
def _variadic_sum(b):
    # Old exporters write residual additions as Sum, which has no gradient builder; Add does.
    total = b.node.input[0]
    for other in b.node.input[1:]:
        total = b.op("Add", total, other)
    if b.node.op_type == "Mean" and len(b.node.input) > 1:
        total = b.op("Mul", total, b.const(np.float32(1.0 / len(b.node.input))))
    b.op("Identity", total, out=b.y)


@_standin("LRN")
def _lrn(b):
    """x / (bias + alpha / size * sum of x^2 over a window of ``size`` channels) ^ beta."""
    size = int(b.attr("size", 1))
    if b.known_rank() != 4:
        raise UserError(f"LRN node {b.node.name!r}: only 4-D inputs have a training stand-in")
    squares = b.op("Mul", b.x, b.x)
    if b.opset < 13:
        lifted = b.op("Unsqueeze", squares, axes=[1])
    else:
        lifted = b.op("Unsqueeze", squares, b.const(np.array([1], np.int64)))
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    window = b.op("AveragePool", lifted, kernel_shape=[size, 1, 1], pads=[before, 0, 0, after, 0, 0],
                  count_include_pad=1)
    if b.opset < 13:
        summed = b.op("Squeeze", window, axes=[1])
    else:
        summed = b.op("Squeeze", window, b.const(np.array([1], np.int64)))
    # AveragePool divides by size: alpha / size * sum == alpha * mean
    scaled = b.op("Add", b.const(np.float32(b.attr("bias", 1.0))), b.op("Mul", summed, b.const(np.float32(b.attr("alpha", 1e-4)))))
    b.op("Div", b.x, b.op("Pow", scaled, b.const(np.float32(b.attr("beta", 0.75)))), out=b.y)


def _nearest_repeats(node: onnx.NodeProto) -> bool:
    """Whether this nearest Resize copies each input pixel into an s x s block (integer factor s)."""
    transform = ir.get_attr(node, "coordinate_transformation_mode", b"half_pixel")
    rounding = ir.get_attr(node, "nearest_mode", b"round_prefer_floor")
    transform = transform.decode() if isinstance(transform, bytes) else transform
    rounding = rounding.decode() if isinstance(rounding, bytes) else rounding
    # x = k*s + j maps to k + (j + 0.5)/s - 0.5 (half_pixel), k + j/s (asymmetric), k + (j + 0.5)/s
    # (tf_half_pixel_for_nearest): k exactly when rounding resp. flooring.
    if transform in ("half_pixel", "pytorch_half_pixel"):
        return rounding in ("round_prefer_floor", "round_prefer_ceil")
    return transform in ("asymmetric", "tf_half_pixel_for_nearest") and rounding == "floor"


@_standin("Resize")
def _resize(b):
    """Nearest resizing by integer factors s: each pixel copied into an s x s block, written as
    Unsqueeze -> Mul by ones (broadcast) -> Reshape (ResizeGrad has no CPU kernel in ORT 1.19)."""
    mode = ir.get_attr(b.node, "mode", b"nearest")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "nearest" or not _nearest_repeats(b.node):
        return False
    before, after = b.shapes.get(b.x), b.shapes.get(b.y)
    if not before or not after or len(before) != len(after) or len(before) < 3 or None in before[1:] + after[1:]:
        return False
    if after[1] != before[1] or any(a % x for x, a in zip(before[2:], after[2:])):
        return False
    factors = [a // x for x, a in zip(before[2:], after[2:])]
    axes = [3 + 2 * i for i in range(len(factors))]  # a unit axis after every spatial axis
    if b.opset < 13:
        lifted = b.op("Unsqueeze", b.x, axes=axes)
    else:
        lifted = b.op("Unsqueeze", b.x, b.const(np.array(axes, np.int64)))
    ones = np.ones([1, 1] + [d for f in factors for d in (1, f)], np.float32)
    blocks = b.op("Mul", lifted, b.const(ones))
    b.op("Reshape", blocks, b.const(np.array([-1] + list(after[1:]), np.int64)), out=b.y)
    return None


@_standin("ConvTranspose")
def _conv_transpose(b):
    """ConvTranspose == Conv over the input with s-1 zeros inserted between pixels, with the kernel
    flipped and its in/out channels swapped (ConvTransposeGrad has no CPU kernel in ORT 1.19).

    Handles explicit pads (no auto_pad), strides, dilations, groups and output_padding below the stride.
    """
    weight = b.node.input[1]
    wshape, xshape = b.shapes.get(weight), b.shapes.get(b.x)
    if ir.get_attr(b.node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or not wshape or not xshape:
        return False
    spatial = len(wshape) - 2
    if len(xshape) != spatial + 2 or None in xshape[1:]:
        return False
    kernel = list(wshape[2:])
    strides = list(b.attr("strides", [1] * spatial))
    dilations = list(b.attr("dilations", [1] * spatial))
    pads = list(b.attr("pads", [0] * 2 * spatial))
    extra = list(b.attr("output_padding", [0] * spatial))
    group = int(b.attr("group", 1))
    if any(e >= s for e, s in zip(extra, strides)):  # onnxruntime places such padding its own way
        return False
    # Zero insertion: [N,C,H,W] -> [N,C,H,1,W,1] * one-hot [.., s, .., s] -> [N,C,H*s,W*s].
    axes = [3 + 2 * i for i in range(spatial)]
    lifted = (b.op("Unsqueeze", b.x, axes=axes) if b.opset < 13
              else b.op("Unsqueeze", b.x, b.const(np.array(axes, np.int64))))
    first = np.zeros([1, 1] + [d for s in strides for d in (1, s)], np.float32)
    first[(0, 0) + (0,) * (2 * spatial)] = 1.0
    spread = b.op("Reshape", b.op("Mul", lifted, b.const(first)),
                  b.const(np.array([-1, xshape[1]] + [x * s for x, s in zip(xshape[2:], strides)], np.int64)))
    # Conv padding of the zero-inserted input (its trailing s-1 zeros count against the end pad);
    # a negative pad is a crop, done by Slice.
    begin = [d * (k - 1) - p for d, k, p in zip(dilations, kernel, pads[:spatial])]
    end = [d * (k - 1) - p + e - (s - 1) for d, k, p, e, s in zip(dilations, kernel, pads[spatial:], extra, strides)]
    if min(begin) < 0 or min(end) < 0:
        sizes = [x * s for x, s in zip(xshape[2:], strides)]
        starts = [max(0, -p) for p in begin]
        stops = [n - max(0, -p) for n, p in zip(sizes, end)]
        spread = b.op("Slice", spread, b.const(np.array(starts, np.int64)), b.const(np.array(stops, np.int64)),
                      b.const(np.arange(2, 2 + spatial, dtype=np.int64)))
        begin, end = [max(0, p) for p in begin], [max(0, p) for p in end]
    # Kernel [Cin, Cout/g, k...] -> [Cout, Cin/g, k...], flipped in every spatial axis (in-graph, so the
    # gradient reaches the trained weight).
    cin, cout_g = wshape[0], wshape[1]
    grouped = b.op("Reshape", weight, b.const(np.array([group, cin // group, cout_g] + kernel, np.int64)))
    swapped = b.op("Transpose", grouped, perm=[0, 2, 1] + list(range(3, 3 + spatial)))
    flipped = b.op("Reshape", swapped, b.const(np.array([group * cout_g, cin // group] + kernel, np.int64)))
    for axis, size in enumerate(kernel):
        flipped = b.op("Gather", flipped, b.const(np.arange(size - 1, -1, -1, dtype=np.int64)), axis=2 + axis)
    inputs = [spread, flipped] + ([b.node.input[2]] if len(b.node.input) > 2 and b.node.input[2] else [])
    b.op("Conv", *inputs, out=b.y, group=group, dilations=dilations, kernel_shape=kernel,
         pads=begin + end, strides=[1] * spatial)
    return None


@_standin("InstanceNormalization")
def _instance_norm(b):
    scale, bias = b.node.input[1], b.node.input[2]
    rank = b.known_rank()
    normalized = b.normalize(b.x, list(range(2, rank)), b.attr("epsilon", 1e-5))
    affine = b.op("Mul", normalized, b.channel_shaped(scale, rank))
    b.op("Add", affine, b.channel_shaped(bias, rank), out=b.y)


@_standin("GroupNormalization")
def _group_norm(b):
    scale, bias = b.node.input[1], b.node.input[2]
    rank = b.known_rank()
    groups = int(b.attr("num_groups", 1))
    # [N, C, ...] -> [N, G, C/G * ...]: Shape/Slice keep N without Reshape's copy-dim zeros.
    batch = b.op("Slice", b.op("Shape", b.x), b.const(np.array([0], np.int64)), b.const(np.array([1], np.int64)))
    grouped_shape = b.op("Concat", batch, b.const(np.array([groups, -1], np.int64)), axis=0)
    normalized = b.normalize(b.op("Reshape", b.x, grouped_shape), [2], b.attr("epsilon", 1e-5))
    if b.opset >= 21:  # opset 21: one scale/bias per channel
        restored = b.op("Reshape", normalized, b.op("Shape", b.x))
        affine = b.op("Mul", restored, b.channel_shaped(scale, rank))
        b.op("Add", affine, b.channel_shaped(bias, rank), out=b.y)
    else:  # opset 18: one scale/bias per group, applied in the grouped layout
        affine = b.op("Add", b.op("Mul", normalized, b.channel_shaped(scale, 3)), b.channel_shaped(bias, 3))
        b.op("Reshape", affine, b.op("Shape", b.x), out=b.y)


@_standin("BatchNormalization")
def _batch_norm(b):
    """Inference-form BatchNorm with frozen running statistics and trainable scale / bias.

    Frozen statistics are the usual choice for fine-tuning on little data: batch statistics of small
    batches are noisy, and a per-channel affine map (scale, bias) can absorb any shift the pruning
    caused, so nothing is lost by not updating mean/var.  The trained model is used exactly as it was
    trained (same normalization at train and inference time).
    """
    scale, bias, mean, var = b.node.input[1:5]
    rank = b.known_rank()
    mean_value, var_value = b.constants.get(mean), b.constants.get(var)
    eps = b.attr("epsilon", 1e-5)
    shape = [-1] + [1] * (rank - 2)
    if mean_value is not None and var_value is not None:
        inv_std = (1.0 / np.sqrt(var_value.astype(np.float64) + eps)).astype(np.float32).reshape(shape)
        centered = b.op("Sub", b.x, b.const(mean_value.astype(np.float32).reshape(shape)))
        normalized = b.op("Mul", centered, b.const(inv_std))
    else:  # statistics computed in the graph: same formula with ops
        centered = b.op("Sub", b.x, b.channel_shaped(mean, rank))
        std = b.op("Sqrt", b.op("Add", b.channel_shaped(var, rank), b.const(np.float32(eps))))
        normalized = b.op("Div", centered, std)
    affine = b.op("Mul", normalized, b.channel_shaped(scale, rank))
    b.op("Add", affine, b.channel_shaped(bias, rank), out=b.y)


@_standin("LayerNormalization")
def _layer_norm(b):
    # The gradient needs the saved mean and inverse std-dev, optional outputs exporters leave out.
    outputs = list(b.node.output) + [""] * (3 - len(b.node.output))
    outputs[1] = outputs[1] or b._fresh("mean")
    outputs[2] = outputs[2] or b._fresh("inv_std")
    node = onnx.NodeProto()
    node.CopyFrom(b.node)
    del node.output[:]
    node.output.extend(outputs)
    b.nodes.append(node)


def apply_standins(graph: onnx.GraphProto, opset: int, shapes: Dict[str, Tuple[Optional[int], ...]]) -> Counter:
    """Replace, in place, every main-graph node that has a stand-in; returns counts by op type.

    Args:
        shapes: tensor name -> shape from shape inference (normalization and Resize stand-ins read it).
    """
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer
                 if init.data_type == onnx.TensorProto.FLOAT}
    replaced: Counter = Counter()
    nodes: List[onnx.NodeProto] = []
    for node in graph.node:
        standin = STANDINS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        # A multi-output node (training-mode BatchNorm) keeps its own op: the stand-ins write output 0.
        extra_outputs = node.op_type != "LayerNormalization" and any(node.output[1:])
        if standin is None or extra_outputs:
            nodes.append(node)
            continue
        builder = StandinBuilder(node, opset, constants, shapes)
        if standin(builder) is False:
            nodes.append(node)
            continue
        nodes.extend(builder.nodes)
        graph.initializer.extend(builder.initializers)
        replaced[node.op_type] += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return replaced

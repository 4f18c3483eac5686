"""Stand-ins for LRN, nearest Resize and ConvTranspose, whose gradients have no CPU kernel in onnxruntime 1.19."""

from __future__ import annotations

import numpy as np
import onnx

from graphprune import ir
from graphprune.errors import UserError
from graphprune.training.standins.builder import standin


@standin("LRN")
def _lrn(b):
    """x / (bias + alpha / size * sum of x^2 over a window of ``size`` channels) ^ beta."""
    size = int(b.attr("size", 1))
    if b.known_rank() != 4:
        raise UserError(f"LRN node {b.node.name!r}: only 4-D inputs have a training stand-in")
    squares = b.op("Mul", b.x, b.x)
    lifted = b.unsqueeze(squares, [1])
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    window = b.op("AveragePool", lifted, kernel_shape=[size, 1, 1], pads=[before, 0, 0, after, 0, 0],
                  count_include_pad=1)
    summed = b.squeeze(window, [1])
    # AveragePool divides by size: alpha / size * sum == alpha * mean
    scaled = b.op("Add", b.const(np.float32(b.attr("bias", 1.0))), b.op("Mul", summed, b.const(np.float32(b.attr("alpha", 1e-4)))))
    b.op("Div", b.x, b.op("Pow", scaled, b.const(np.float32(b.attr("beta", 0.75)))), out=b.y)


def _text_attr(node: onnx.NodeProto, name: str, default: str) -> str:
    value = ir.get_attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else value


def _nearest_repeats(node: onnx.NodeProto) -> bool:
    """Whether this nearest Resize copies each input pixel into an s x s block (integer factor s)."""
    transform = _text_attr(node, "coordinate_transformation_mode", "half_pixel")
    rounding = _text_attr(node, "nearest_mode", "round_prefer_floor")
    # x = k*s + j maps to k + (j + 0.5)/s - 0.5 (half_pixel), k + j/s (asymmetric), k + (j + 0.5)/s
    # (tf_half_pixel_for_nearest): k exactly when rounding resp. flooring.
    if transform in ("half_pixel", "pytorch_half_pixel"):
        return rounding in ("round_prefer_floor", "round_prefer_ceil")
    return transform in ("asymmetric", "tf_half_pixel_for_nearest") and rounding == "floor"


@standin("Resize")
def _resize(b):
    """Nearest resizing by integer factors s: each pixel copied into an s x s block, written as
    Unsqueeze -> Mul by ones (broadcast) -> Reshape (ResizeGrad has no CPU kernel in ORT 1.19)."""
    if _text_attr(b.node, "mode", "nearest") != "nearest" or not _nearest_repeats(b.node):
        return False
    before, after = b.shapes.get(b.x), b.shapes.get(b.y)
    if not before or not after or len(before) != len(after) or len(before) < 3 or None in before[1:] + after[1:]:
        return False
    if after[1] != before[1] or any(a % x for x, a in zip(before[2:], after[2:])):
        return False
    factors = [a // x for x, a in zip(before[2:], after[2:])]
    axes = [3 + 2 * i for i in range(len(factors))]  # a unit axis after every spatial axis
    lifted = b.unsqueeze(b.x, axes)
    ones = np.ones([1, 1] + [d for f in factors for d in (1, f)], np.float32)
    blocks = b.op("Mul", lifted, b.const(ones))
    b.op("Reshape", blocks, b.const(np.array([-1] + list(after[1:]), np.int64)), out=b.y)
    return None


@standin("ConvTranspose")
def _conv_transpose(b):
    """ConvTranspose == Conv over the input with s-1 zeros inserted between pixels, with the kernel
    flipped and its in/out channels swapped (ConvTransposeGrad has no CPU kernel in ORT 1.19).

    Handles explicit pads (no auto_pad), strides, dilations, groups and output_padding below the stride.
    """
    weight = b.node.input[1]
    wshape, xshape = b.shapes.get(weight), b.shapes.get(b.x)
    if _text_attr(b.node, "auto_pad", "NOTSET") != "NOTSET" or not wshape or not xshape:
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
    lifted = b.unsqueeze(b.x, axes)
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

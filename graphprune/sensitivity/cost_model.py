"""A model of CPU time from the graph: MACs at the runtime's channel blocking, plus per-element work.

MACs alone miss where a small CNN's time goes on ONNX Runtime's CPU provider (PP-OCR's orientation
classifier, profiled with HardSwish fused, 1 thread):

- convolutions run in a blocked channel layout (NCHWc) whose block is 16 channels on an AVX-512
  CPU (8 on AVX2): 24 channels compute as 32, so pruning 32 -> 24 saves MACs and no time, 32 -> 16
  saves half;
- elementwise work (HardSwish, residual adds, pooling) costs per element, not per MAC, and is
  largest on the wide expanded tensors at high resolution, where a 1x1 conv has few MACs;
- a squeeze-excitation block's scaling ``Mul`` (a ``[N,C,H,W] * [N,C,1,1]`` broadcast) runs outside
  the blocked layout, with a reorder out of it and back (19% of the classifier's kernel time).

``modeled_cost`` sums these in MAC-equivalents; a budget uses the fraction pruned / original to
prefer, among plans that meet a MAC budget, the ones that save time (``graphprune.pruning.budget``).
It ranks plans; it is no latency prediction (``--target-latency`` measures).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Tuple

import onnx

from graphprune.ir import get_attr
from graphprune.metrics import MAC_RULES
from graphprune.passes.fuse_hardswish import _find as _find_hardswish
from graphprune.shapes import concrete_shapes

__all__ = ["modeled_cost", "CHANNEL_BLOCK", "ELEMENT_MACS", "REORDER_ELEMENTS"]

# ONNX Runtime's NCHWc block on AVX-512 (the widest common x86 CPU; on AVX2 it is 8, which a
# multiple of 16 also fills).
CHANNEL_BLOCK = 16
# One element of elementwise work (or of a conv's output, written with its fused activation) costs
# about this many MACs of a blocked convolution: a least-squares fit of the classifier's NCHWc conv
# kernel times (ONNX Runtime's profiler, 1 thread) to padded MACs and output elements gave ~50.  The
# classifier's plans (60% budget, hand plan, 40% budget) rank alike from 16 to 96.
ELEMENT_MACS = 48.0
# A broadcast scaling outside the blocked layout: the op itself and a reorder on either side.
REORDER_ELEMENTS = 3.0
# Ops the runtime fuses into the convolution before them (BatchNormalization and activations: the
# classifier's optimized graph has no HardSwish kernel left), or that move no data (shape ops, views).
_FREE = {"BatchNormalization", "Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Identity", "Shape",
         "Constant", "Cast", "Slice", "Concat", "Gather", "Unsqueeze", "Squeeze", "Flatten", "Reshape", "Dropout"}


def _padded(channels: int, block: int) -> int:
    """Channels as the blocked layout computes them; below half a block (a stem conv's 3 input
    channels) the runtime reads the plain layout, unpadded."""
    return int(math.ceil(channels / block) * block) if channels >= block // 2 else channels


def _elements(shape, block: int) -> int:
    """Elements of an activation, its channel axis (1, for rank 4 and up) padded to the block."""
    if shape is None:
        return 0
    dims = list(shape)
    if len(dims) >= 4:
        dims[1] = _padded(dims[1], block)
    return math.prod(dims)


def _conv(node, shapes, block: int) -> Optional[Tuple[float, int]]:
    """(padded MACs, padded output elements) of a Conv."""
    out, w = shapes.get(node.output[0]), shapes.get(node.input[1])
    if out is None or w is None or len(out) < 3:
        return None
    group = int(get_attr(node, "group", 1))
    kernel = math.prod(w[2:])
    spatial = math.prod(out[2:]) * out[0]
    cout = _padded(out[1], block)
    if group > 1 and group == out[1] and w[1] == 1:  # depthwise: one input channel per output channel
        return float(spatial * cout * kernel), spatial * cout
    cin = _padded(w[1] * group, block) // group if group > 1 else _padded(w[1], block)
    return float(spatial * cout * cin * kernel), spatial * cout


def modeled_cost(model: onnx.ModelProto, input_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None,
                 block: int = CHANNEL_BLOCK, element_macs: float = ELEMENT_MACS) -> Optional[float]:
    """Modeled CPU cost of one run in MAC-equivalents (None when shapes do not resolve).

    Convolutions: MACs with channel counts padded up to ``block`` (depthwise ones by their
    channels), plus their output written; MatMul/Gemm: their MACs; every other op that computes:
    ``element_macs`` per element of its largest float tensor (channels padded), three times that for
    a broadcast multiply of a map by per-channel scales (squeeze-excitation: a reorder out of the
    blocked layout and back).
    """
    shapes = concrete_shapes(model, input_shapes)
    if shapes is None:
        return None
    weights = {init.name for init in model.graph.initializer}
    # HardSwish written out (Paddle's x * clip(x + 3, 0, 6) / 6) costs as the op canonicalize makes of
    # it, which ORT fuses into the conv before it (no HardSwish kernel left in its optimized graph):
    # time the model a user deploys, whichever form the budget prunes.  By output name: protobuf
    # wrappers' ids are not stable.
    written_out = {n.output[0] for match in _find_hardswish(model.graph) for n in match.interior}
    total = 0.0
    for node in model.graph.node:
        if node.op_type in _FREE or node.output[0] in written_out:
            continue
        if node.op_type == "Conv":
            conv = _conv(node, shapes, block)
            if conv is not None:
                total += conv[0] + element_macs * conv[1]
            continue
        rule = MAC_RULES.get(node.op_type)
        if rule is not None:
            total += rule(node, shapes) or 0
            continue
        tensors = [shapes.get(n) for n in list(node.input) + list(node.output) if n and n not in weights]
        tensors = [s for s in tensors if s is not None]
        if not tensors:
            continue
        elements = max(_elements(s, block) for s in tensors)
        total += element_macs * elements * (REORDER_ELEMENTS if _scales_channels(node, tensors) else 1.0)
    return total


def _scales_channels(node, tensors) -> bool:
    """A binary Mul of a ``[N,C,H,W]`` map by ``[N,C,1,1]`` scales (squeeze-excitation)."""
    if node.op_type != "Mul" or len(tensors) < 2:
        return False
    ranks4 = [s for s in tensors if len(s) == 4]
    return any(math.prod(s[2:]) == 1 for s in ranks4) and any(math.prod(s[2:]) > 1 for s in ranks4)

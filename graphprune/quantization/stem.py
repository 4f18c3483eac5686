"""Space-to-depth stems: a stride-2 int8 Conv on a thin (RGB) input rewritten so its kernel sees 4x the channels.

ORT's int8 convolution is slow on 3 input channels: the NHWC im2col gathers 3-byte runs and the
u8s8 GEMM gets a poorly shaped reduction (a 7x7/2 RGB stem runs at ~0.08 GMAC/ms, a third of the
rate of the other layers, slower than fp32).  A stride-2 convolution is exactly a stride-1
convolution over ``SpaceToDepth(x, 2)``: each 2x2 pixel block becomes 4C channels and a k x k
kernel a smaller one (7x7 -> 4x4) whose extra taps carry zero weights.  Measured on ORT
1.19 (1 thread, 224x224, with the float SpaceToDepth): 7x7/2 stem 945 -> 616 us, 5x5/2 687 ->
420 us, 3x3/2 524 -> 349 us.  The float SpaceToDepth runs before the QuantizeLinear (ORT has no
uint8 kernel for it) and costs ~30 us on a 224x224 RGB image.  Only stems that then beat fp32 are
rewritten (``MIN_REDUCTION``).

The rewrite works on the QDQ model: the int8 weights are rearranged, never re-quantized, so scales,
zero points and the integer arithmetic stay the same and the outputs are identical.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.ir import get_attr, initializer_map, producer_map

__all__ = ["space_to_depth_stems", "stem_check", "THIN_CHANNELS", "MIN_REDUCTION"]

# Fewer input channels than this (per group) makes ORT's int8 convolution slow (RGB, grey images).
THIN_CHANNELS = 8
# Only stems with this reduction length (C*k*k) or more are rewritten: those are the ones whose int8
# form then beats fp32 (7x7/2 RGB: 616 vs 772 us).  A 3x3/2 RGB stem (K=27) stays slower than fp32
# even rewritten (349 vs 243 us); making its int8 form faster only let MobileNetV2's measured choice
# flip to a placement with an int8 stem: same latency within noise, more error (0.2326 vs 0.2282).
MIN_REDUCTION = 64
_BLOCK = 2


def _ints(node: onnx.NodeProto, name: str, default) -> List[int]:
    value = get_attr(node, name, default)
    return [int(v) for v in value]


def _axis_plan(size: int, k: int, pad_begin: int, pad_end: int) -> Optional[Tuple[int, int, int, int]]:
    """(new kernel, new pad begin, new pad end, tap offset) of one spatial axis, None when impossible.

    Output ``o`` of the stride-2 conv reads rows ``2o - pad_begin + t``; row ``r`` lies in block
    ``r // 2`` at sub-position ``r % 2``, so the taps span blocks ``o + floor(-pad_begin/2)`` ..
    ``o + floor((k-1-pad_begin)/2)``.
    """
    if size % _BLOCK:
        return None
    first = -((pad_begin + 1) // 2)  # floor(-pad_begin / 2)
    last = (k - 1 - pad_begin) // 2
    kernel = last - first + 1
    out = (size + pad_begin + pad_end - k) // 2 + 1
    new_begin = -first
    new_end = out - 1 - size // 2 + kernel - new_begin
    if new_begin < 0 or new_end < 0:
        return None
    return kernel, new_begin, new_end, first


def stem_check(conv: onnx.NodeProto, x_shape: Optional[Tuple[int, ...]], weight_shape: Tuple[int, ...]) -> Optional[str]:
    """Why ``conv`` cannot become a space-to-depth stem (None when it can)."""
    if conv.op_type != "Conv":
        return f"{conv.op_type} is not a Conv"
    if len(weight_shape) != 4:
        return "not a 2-D convolution"
    if int(get_attr(conv, "group", 1)) != 1:
        return "grouped convolution"
    cin = int(weight_shape[1])
    if cin >= THIN_CHANNELS:
        return f"{cin} input channels: the int8 kernel is already efficient"
    reduction = cin * int(np.prod(weight_shape[2:]))
    if reduction < MIN_REDUCTION:
        return f"reduction length {reduction} < {MIN_REDUCTION}: float stays faster even rewritten"
    if _ints(conv, "strides", [1, 1]) != [_BLOCK, _BLOCK]:
        return "stride is not 2"
    if any(d != 1 for d in _ints(conv, "dilations", [1, 1])):
        return "dilated convolution"
    auto_pad = get_attr(conv, "auto_pad", b"NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET":
        return "auto_pad is set"
    if x_shape is None or len(x_shape) != 4 or not all(isinstance(d, int) and d > 0 for d in x_shape[2:]):
        return "input height/width unknown"
    pads = _ints(conv, "pads", [0, 0, 0, 0])
    for axis in range(2):
        if _axis_plan(x_shape[2 + axis], int(weight_shape[2 + axis]), pads[axis], pads[axis + 2]) is None:
            return "odd input size or padding the block layout cannot express"
    return None


def _rearranged_weight(w: np.ndarray, plans) -> np.ndarray:
    """w[cout, c, t, u] -> w'[cout, (by*2 + bx)*C + c, j, i]: SpaceToDepth's (DCR) channel order.

    ``plans`` holds (kernel, pad begin, pad end, first block offset, old pad begin) per axis; tap
    ``t`` reads row ``t - old pad begin`` relative to ``2o``, i.e. block ``r // 2``, sub-row ``r % 2``.
    """
    cout, cin, kh, kw = w.shape
    (kh2, _, _, first_h, pad_h), (kw2, _, _, first_w, pad_w) = plans
    out = np.zeros((cout, _BLOCK, _BLOCK, cin, kh2, kw2), dtype=w.dtype)
    for t in range(kh):
        r = t - pad_h
        for u in range(kw):
            s = u - pad_w
            out[:, r % 2, s % 2, :, r // 2 - first_h, s // 2 - first_w] = w[:, :, t, u]
    return out.reshape(cout, _BLOCK * _BLOCK * cin, kh2, kw2)


def space_to_depth_stems(model: onnx.ModelProto, x_shapes: Dict[str, Tuple[int, ...]]) -> List[str]:
    """Rewrite, in place, each int8 QDQ Conv of a QDQ model that ``stem_check`` accepts; the names rewritten.

    The pattern: ``x -> QuantizeLinear -> DequantizeLinear -> Conv`` with the weight a
    DequantizeLinear of an int8 initializer.  It becomes ``x -> SpaceToDepth -> QuantizeLinear ->
    DequantizeLinear -> Conv'`` with the same scales; the old QuantizeLinear/DequantizeLinear stay
    only when something else reads them.

    Args:
        model: a QDQ model (as ``insert_qdq_nodes`` builds it).
        x_shapes: tensor name -> shape, for the float inputs of the quantized convs.
    """
    graph = model.graph
    producer = producer_map(graph)
    inits = initializer_map(graph)
    rewritten: List[str] = []
    for conv in list(graph.node):
        if conv.op_type != "Conv" or len(conv.input) < 2:
            continue
        dq_x, dq_w = producer.get(conv.input[0]), producer.get(conv.input[1])
        if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        q_x = producer.get(dq_x.input[0])
        w_init = inits.get(dq_w.input[0])
        if q_x is None or q_x.op_type != "QuantizeLinear" or w_init is None:
            continue
        w = numpy_helper.to_array(w_init)
        x = q_x.input[0]
        if stem_check(conv, x_shapes.get(x), w.shape) is not None:
            continue
        pads = _ints(conv, "pads", [0, 0, 0, 0])
        shape = x_shapes[x]
        plans = []
        for axis in range(2):
            kernel, begin, end, first = _axis_plan(shape[2 + axis], w.shape[2 + axis], pads[axis], pads[axis + 2])
            plans.append((kernel, begin, end, first, pads[axis]))
        tag = conv.name or conv.output[0]
        new_w = numpy_helper.from_array(_rearranged_weight(w, plans), f"{w_init.name}_space_to_depth")
        graph.initializer.append(new_w)
        s2d, q_out, dq_out, w_out = (f"{tag}_space_to_depth{s}" for s in ("", "_quantized", "_dequantized", "_weight"))
        new_nodes = [
            helper.make_node("SpaceToDepth", [x], [s2d], name=f"{tag}_SpaceToDepth", blocksize=_BLOCK),
            helper.make_node("QuantizeLinear", [s2d, *q_x.input[1:]], [q_out], name=f"{tag}_space_to_depth_Q"),
            helper.make_node("DequantizeLinear", [q_out, *dq_x.input[1:]], [dq_out], name=f"{tag}_space_to_depth_DQ"),
            helper.make_node("DequantizeLinear", [new_w.name, *dq_w.input[1:]], [w_out], name=f"{tag}_space_to_depth_W",
                             axis=int(get_attr(dq_w, "axis", 1))),
        ]
        conv.input[0], conv.input[1] = dq_out, w_out
        _set_ints(conv, "kernel_shape", [plans[0][0], plans[1][0]])
        _set_ints(conv, "strides", [1, 1])
        _set_ints(conv, "pads", [plans[0][1], plans[1][1], plans[0][2], plans[1][2]])
        index = list(graph.node).index(conv)
        for offset, node in enumerate(new_nodes):
            graph.node.insert(index + offset, node)
        rewritten.append(conv.name)
    if rewritten:
        _drop_dead(graph)
    return rewritten


def _set_ints(node: onnx.NodeProto, name: str, values: List[int]) -> None:
    for attr in list(node.attribute):
        if attr.name == name:
            node.attribute.remove(attr)
    node.attribute.append(helper.make_attribute(name, values))


def _drop_dead(graph: onnx.GraphProto) -> None:
    """Remove nodes and initializers nothing reads (the stems' old QDQ pairs and weights)."""
    while True:
        used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(out in used for out in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {name for n in graph.node for name in n.input}
    for init in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(init)

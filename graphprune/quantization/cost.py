"""A latency cost model of int8 vs float per node, and placement by minimum cut over the graph.

Every node runs either in float or in int8; every activation edge whose two ends differ pays a
QuantizeLinear (float -> int8) or DequantizeLinear (int8 -> float), plus the layout transpose ORT's
NHWC int8 kernels add at region borders.  Choosing labels that minimise the summed node and
border costs is a binary labelling with pairwise costs that only charge *different* labels, which
a minimum s-t cut solves exactly (source side = float, sink side = int8).

The unit costs are per MAC and per element, measured with ONNX Runtime 1.19's MLAS kernels on one
x86 thread (AVX-512 VNNI class machine): the ratios matter, not the absolute numbers, and the
chosen placement is then checked by measured latency (``measure.py``).  Observations behind them:
dense int8 convolution gains with its reduction length K (x0.85 at K=16, x1.5 at K=32, x2-3 from
K=64); depthwise int8 convolution is *slower* than fp32 NCHWc (x0.55-0.9); a 3-channel stem conv is
3x slower in int8 (a 7x7/2 one x1.3 faster once rewritten over SpaceToDepth, ``stem.py``); a uint8 MaxPool outside an int8 region runs in NCHW, 80x slower; batch-1 Gemm/MatMul is bound by reading the weights, 4x fewer bytes in int8.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Iterable, Mapping, Optional, Set, Tuple

import numpy as np
import onnx

from graphprune.ir import consumer_map, get_attr
from graphprune.quantization.rules import rule_for
from graphprune.quantization.stem import stem_check

__all__ = ["NodeCost", "estimate_costs", "place", "Placement", "Q_NS_PER_ELEM", "DQ_NS_PER_ELEM"]

# Nanoseconds.  Border conversions include the NCHW<->NHWC transpose of the int8 region.
Q_NS_PER_ELEM = 0.40
DQ_NS_PER_ELEM = 0.35
_DENSE_FP32_NS_PER_MAC = 0.009
_DEPTHWISE_FP32_NS_PER_MAC = 0.016
_WEIGHT_FP32_NS_PER_ELEM = 0.16  # streaming fp32 weights from memory (batch-1 Gemm/MatMul)
_WEIGHT_INT8_NS_PER_ELEM = 0.04
_DEPTHWISE_INT8_SPEEDUP = 0.6
_THIN_INPUT_INT8_SPEEDUP = 0.4  # fewer than 8 input channels per group and K < 64 (3x3 RGB stems)
_THIN_INPUT_LARGE_K_SPEEDUP = 0.8  # the same with K >= 64 (7x7 RGB stems: x0.7-1.1 measured)
# Stride-2 thin-input convs with K >= 64 run in int8 over SpaceToDepth (stem.py), which makes the
# 7x7/2 RGB stem pay: 772 us fp32 vs 616 us int8 with its SpaceToDepth and QuantizeLinear.  A 3x3/2
# stem stays slower in int8 even so (243 vs 349 us) and keeps the thin-input price above: pricing
# it nearer (x0.75) moved MobileNetV2's stem into int8 with no measured gain and more error.
_SPACE_TO_DEPTH_LARGE_K_SPEEDUP = 1.3
# An int8 pool fed from float stays in NCHW layout, where ORT's uint8 MaxPool is ~6 ns per element
# (80x its NHWC form, which it only gets inside an int8 region).
_NCHW_INT8_POOL_NS_PER_ELEM = 6.0
_POOLS = {"MaxPool", "AveragePool"}
# (largest reduction length K, int8 speedup over fp32) for dense Conv/Gemm/MatMul
_DENSE_SPEEDUP = ((24, 0.85), (48, 1.4), (96, 2.0), (192, 2.5), (math.inf, 3.0))
# per-element (float, int8) costs of the non-compute roles, by op type
_ELEMENTWISE_NS = {
    "Add": (0.30, 0.30),
    "Mul": (0.25, 0.25),  # same-shape QLinearMul (SiLU); broadcasting is slower, see below
    "Sigmoid": (0.9, 0.25),  # float SiLU fuses into QuickGelu, ~0.9 ns/element with its Mul
    "LeakyRelu": (0.30, 0.20),
    "Relu": (0.20, 0.0),
    "Clip": (0.20, 0.0),
    "MaxPool": (0.30, 0.15),
    "AveragePool": (0.30, 0.20),
    "GlobalAveragePool": (0.30, 0.20),
    "Concat": (0.20, 0.15),
    "Split": (0.20, 0.10),
    "Transpose": (0.50, 0.25),
    "Resize": (1.0, 0.5),
}
# QLinearMul that broadcasts (squeeze-excite scaling) runs ~0.9 ns per element
_BROADCAST_QLINEAR_MUL_NS = 0.90
_FREE = {"Reshape", "Squeeze", "Unsqueeze"}
# ORT 1.19 (CPU) runs a QDQ ConvTranspose in float between its DequantizeLinear nodes: measured 1.5x
_UNFUSED_CONV_TRANSPOSE_SLOWDOWN = 1.5  # ORT aliases the buffer: no work in either type
_HUGE = 1e12


@dataclasses.dataclass
class NodeCost:
    """Estimated nanoseconds of one node in float and in int8 (``inf`` when int8 is impossible)."""

    float_ns: float
    int8_ns: float
    note: str = ""  # what makes int8 slow here, for the report ("depthwise Conv"...)


def _elems(shapes: Mapping[str, Tuple[int, ...]], name: str) -> Optional[int]:
    shape = shapes.get(name)
    return int(np.prod(shape)) if shape is not None else None


def _dense_speedup(k: int) -> float:
    for limit, speedup in _DENSE_SPEEDUP:
        if k < limit:
            return speedup
    return _DENSE_SPEEDUP[-1][1]  # pragma: no cover - the table ends with inf


def _compute_cost(node: onnx.NodeProto, shapes, constants) -> Optional[NodeCost]:
    out = _elems(shapes, node.output[0])
    w = shapes.get(node.input[1]) if len(node.input) > 1 else None
    x = shapes.get(node.input[0])
    if out is None or w is None or x is None:
        return None
    weight_elems = int(np.prod(w))
    if node.op_type == "ConvTranspose":
        fp32 = int(np.prod(x)) * int(np.prod(w[1:])) * _DENSE_FP32_NS_PER_MAC
        return NodeCost(fp32, fp32 * _UNFUSED_CONV_TRANSPOSE_SLOWDOWN, "ConvTranspose (no fused int8 kernel on ORT CPU)")
    if node.op_type == "Conv":
        group = int(get_attr(node, "group", 1))
        k = int(np.prod(w[1:]))
        macs = out * k
        cin_per_group = int(w[1])
        if group > 1 and cin_per_group < 8:
            fp32 = macs * _DEPTHWISE_FP32_NS_PER_MAC
            return NodeCost(fp32, fp32 / _DEPTHWISE_INT8_SPEEDUP, "depthwise Conv")
        fp32 = macs * _DENSE_FP32_NS_PER_MAC
        if cin_per_group < 8 and stem_check(node, x, tuple(w)) is None:
            speedup = _SPACE_TO_DEPTH_LARGE_K_SPEEDUP
            note = f"Conv with {cin_per_group} input channels (as SpaceToDepth stem)"
        elif cin_per_group < 8:
            speedup = _THIN_INPUT_INT8_SPEEDUP if k < 64 else _THIN_INPUT_LARGE_K_SPEEDUP
            note = f"Conv with {cin_per_group} input channels"
        else:
            speedup = _dense_speedup(k)
            note = f"Conv with reduction length {k}"
        return NodeCost(fp32, fp32 / speedup, note)
    # Gemm / MatMul: K is the contracted length
    trans_b = node.op_type == "Gemm" and get_attr(node, "transB", 0)
    k = int(w[-1] if trans_b else (w[-2] if len(w) >= 2 else w[0]))
    macs = out * k
    compute = macs * _DENSE_FP32_NS_PER_MAC
    streamed = node.input[1] in constants
    fp32 = max(compute, weight_elems * _WEIGHT_FP32_NS_PER_ELEM if streamed else 0.0)
    int8 = max(compute / _dense_speedup(k), weight_elems * _WEIGHT_INT8_NS_PER_ELEM if streamed else 0.0)
    return NodeCost(fp32, int8, f"{node.op_type} with reduction length {k}")


def estimate_costs(
    model: onnx.ModelProto, shapes: Mapping[str, Tuple[int, ...]], constants: Iterable[str]
) -> Dict[str, NodeCost]:
    """Node name -> ``NodeCost`` for every node a rule covers (others have no int8 form)."""
    constants = set(constants)
    costs: Dict[str, NodeCost] = {}
    for node in model.graph.node:
        rule = rule_for(node)
        if rule is None:
            continue
        if rule.role == "compute":
            cost = _compute_cost(node, shapes, constants)
        elif node.op_type in _FREE:
            cost = NodeCost(0.0, 0.0)
        else:
            n = _elems(shapes, node.input[0]) if node.input else None
            f, i = _ELEMENTWISE_NS.get(node.op_type, (0.3, 0.3))
            if node.op_type == "Mul" and len(node.input) > 1 and shapes.get(node.input[0]) != shapes.get(node.input[1]):
                n = _elems(shapes, node.output[0])
                i = _BROADCAST_QLINEAR_MUL_NS
            cost = None if n is None else NodeCost(n * f, n * i)
        # Unknown shapes: no estimate, so the node follows its neighbours at zero cost.
        costs[node.name] = cost or NodeCost(0.0, 0.0)
    return costs


def _pool_fed_nodes(graph: onnx.GraphProto) -> Set[str]:
    """Pools, and the Relu/Clip chains right before them: entering int8 there leaves the pool in NCHW.

    ORT gives a uint8 pool its fast NHWC form only when an NHWC int8 op (QLinearConv) feeds it;
    a QuantizeLinear in front of a Relu -> MaxPool stem does not, whatever the Relu's label.
    """
    consumers = consumer_map(graph)
    found: Set[str] = set()

    def feeds_pool(node: onnx.NodeProto, depth: int = 0) -> bool:
        if node.op_type in _POOLS:
            return True
        if node.op_type not in ("Relu", "Clip") or depth > 3:
            return False
        return any(feeds_pool(c, depth + 1) for c in consumers.get(node.output[0], []))

    for node in graph.node:
        if feeds_pool(node):
            found.add(node.name)
    return found


@dataclasses.dataclass
class Placement:
    """Which nodes run in int8, the estimated saving, and why each eligible node stays float."""

    int8: Set[str]
    estimated_saving_ns: float
    float_reasons: Dict[str, str]


def place(
    model: onnx.ModelProto,
    costs: Mapping[str, NodeCost],
    allowed: Set[str],
    shapes: Mapping[str, Tuple[int, ...]],
    constants: Iterable[str],
) -> Placement:
    """Minimum-cost labelling of ``allowed`` nodes as int8 or float (everything else is float).

    Args:
        costs: per-node estimates from ``estimate_costs``.
        allowed: nodes that may run in int8 (eligible, not excluded).
        shapes: concrete tensor shapes (border costs scale with tensor size).
        constants: names of constant tensors (weights cross no border).
    """
    import networkx as nx  # here: every command imports this module, only placement needs networkx (0.15 s)

    constants = set(constants)
    graph = model.graph
    g = nx.DiGraph()
    src, snk = "__float__", "__int8__"
    g.add_node(src)
    g.add_node(snk)

    def add(u: str, v: str, capacity: float) -> None:
        if capacity <= 0:
            return
        if g.has_edge(u, v):
            g[u][v]["capacity"] += capacity
        else:
            g.add_edge(u, v, capacity=capacity)

    producer: Dict[str, str] = {}
    pool_input: Dict[str, int] = {}  # pool output -> elements of the pool's input
    for node in graph.node:
        if node.op_type in _POOLS and node.input:
            pool_input[node.output[0]] = _elems(shapes, node.input[0]) or 0
        key = "n:" + node.name
        g.add_node(key)
        cost = costs.get(node.name)
        if node.name in allowed and cost is not None:
            add(src, key, cost.int8_ns)  # cut when the node is int8
            add(key, snk, cost.float_ns)  # cut when the node is float
        else:
            add(src, key, _HUGE)  # pinned to float
        for out in node.output:
            producer[out] = key
    for vi in graph.input:
        producer.setdefault(vi.name, src)
    outputs = {vi.name for vi in graph.output}
    pool_fed = _pool_fed_nodes(graph)
    for node in graph.node:
        key = "n:" + node.name
        for name in node.input:
            if not name or name in constants:
                continue
            n = _elems(shapes, name) or 0
            u = producer.get(name, src)
            entry = Q_NS_PER_ELEM + (_NCHW_INT8_POOL_NS_PER_ELEM if node.name in pool_fed else 0.0)
            # ORT moves a QuantizeLinear up through a float pool, which then runs on uint8 in NCHW
            moved = pool_input.get(name, 0) * _NCHW_INT8_POOL_NS_PER_ELEM
            add(u, key, n * entry + moved)  # u float, node int8: quantize on the way in
            add(key, u, n * DQ_NS_PER_ELEM)  # u int8, node float: dequantize on the way out
    for name in outputs:
        u = producer.get(name)
        if u is not None and u != src:
            add(src, u, (_elems(shapes, name) or 0) * DQ_NS_PER_ELEM)  # outputs leave as float
    _, (float_side, _) = nx.minimum_cut(g, src, snk)
    int8 = {n.name for n in graph.node if "n:" + n.name not in float_side}
    saving = sum(costs[n].float_ns - costs[n].int8_ns for n in int8 if n in costs)
    reasons: Dict[str, str] = {}
    for name in allowed - int8:
        cost = costs.get(name)
        if cost is not None and cost.int8_ns >= cost.float_ns and cost.float_ns > 0:
            what = cost.note or "kernel"
            reasons[name] = (
                f"cost model: int8 {what} slower than float (est. {cost.int8_ns / 1e3:.3g} vs "
                f"{cost.float_ns / 1e3:.3g} us)"
            )
        else:
            reasons[name] = "cost model: QuantizeLinear/DequantizeLinear at its borders cost more than int8 saves"
    return Placement(int8, saving, reasons)

"""Which weights weight-only quantization stores quantized, in which format, and why the others stay float."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto

from graphprune.ir import get_attr
from graphprune.quantization import weight_only as wo

__all__ = ["Target", "find_targets", "constant_tensors", "gemm_is_matmul", "NODE_BYTES", "FLOAT_TYPES"]

# What a quantized weight costs in the file besides its values and scales: the dequantizing
# nodes and their tensor names (measured: 80-150 bytes a weight on PP-OCR cls).  A weight whose
# int8 form plus this is not smaller than its float bytes stays float (biases, tiny weights).
NODE_BYTES = 128
FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


@dataclasses.dataclass
class Target:
    """One weight to quantize: its initializer, how its readers use it, and the format it gets."""

    name: str
    kind: str  # "matmul", "gemm", "conv" or "embedding"
    bits: int
    uses: List[Tuple[int, int]]  # (node index, input index) of every reader
    k: int  # the reduction length (MatMul/Gemm), the row width (embedding)
    transposed: bool = False  # Gemm transB: stored [N, K]
    input: Optional[str] = None  # the activation all readers multiply (None: they differ)


def _role(node: onnx.NodeProto, index: int, dims) -> Optional[str]:
    """How ``node`` reads a weight at input ``index``, or None when not as a quantizable weight."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "MatMul" and index == 1 and len(dims) == 2:
        return "matmul"
    if node.op_type == "Gemm" and index == 1 and len(dims) == 2:
        return "gemm"
    if node.op_type == "Conv" and index == 1:
        return "conv"
    if node.op_type == "Gather" and index == 0 and len(dims) == 2 and get_attr(node, "axis", 0) == 0:
        return "embedding"
    return None


def constant_tensors(model: onnx.ModelProto) -> Dict[str, TensorProto]:
    """Name -> tensor of every constant a weight can be: initializers that are not graph inputs
    (those are overridable at run time) and ``Constant`` nodes' tensors (exporters such as
    Paddle's write every weight as one), neither being a graph output."""
    graph = model.graph
    excluded = {i.name for i in graph.input} | {o.name for o in graph.output}
    found = {t.name: t for t in graph.initializer if t.name not in excluded}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in excluded:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    found[node.output[0]] = attr.t
    return found


def _int8_pays(tensor: TensorProto, axis: int) -> bool:
    """Whether int8 values, one scale per index of ``axis`` and the dequantizing nodes take fewer
    bytes than the float weight (int4 is smaller still, so this decides for both)."""
    count = int(np.prod(tensor.dims))
    itemsize = np.dtype(FLOAT_TYPES[tensor.data_type]).itemsize
    channels = int(tensor.dims[axis]) if len(tensor.dims) > axis else 1
    return count + channels * itemsize + NODE_BYTES < count * itemsize


def gemm_is_matmul(node: onnx.NodeProto) -> bool:
    """MatMulNBits and DynamicQuantizeMatMul compute A @ B (+ C added after): only Gemm without
    transA, alpha 1 and beta 1 fits."""
    return (get_attr(node, "transA", 0) == 0 and get_attr(node, "alpha", 1.0) == 1.0
            and (len(node.input) < 3 or not node.input[2] or get_attr(node, "beta", 1.0) == 1.0))


def find_targets(model: onnx.ModelProto, bits: int, block_size: int, embeddings: bool):
    """(name -> ``Target`` in graph order, name -> reason a weight stays float)."""
    graph = model.graph
    inits = constant_tensors(model)
    uses: Dict[str, List[Tuple[int, int]]] = {}
    for i, node in enumerate(graph.node):
        for j, name in enumerate(node.input):
            if name in inits:
                uses.setdefault(name, []).append((i, j))
    targets: Dict[str, Target] = {}
    skipped: Dict[str, str] = {}
    for name, readers in uses.items():
        tensor = inits[name]
        if tensor.data_type not in FLOAT_TYPES:
            continue
        roles = {_role(graph.node[i], j, tensor.dims) for i, j in readers}
        if roles == {None}:
            continue
        if len(roles) > 1:
            ops = sorted({graph.node[i].op_type for i, _ in readers})
            skipped[name] = f"read by {', '.join(ops)} in different roles (one format cannot serve them all)"
            continue
        kind = roles.pop()
        nodes = [graph.node[i] for i, _ in readers]
        if kind == "embedding" and not embeddings:
            continue
        transposed = kind == "gemm" and get_attr(nodes[0], "transB", 0) == 1
        if not _int8_pays(tensor, 0 if kind in ("conv", "embedding") or transposed else 1):
            continue
        if kind == "gemm" and any(get_attr(n, "transB", 0) != int(transposed) for n in nodes):
            skipped[name] = "read by Gemms with different transB"
            continue
        k = int(tensor.dims[1] if transposed or kind == "embedding" else tensor.dims[0])
        width = bits
        if bits == 4 and kind == "conv":
            width = 8  # no int4 convolution kernel: int8 per channel still shrinks the file 4x
        elif bits == 4 and kind == "gemm" and not all(gemm_is_matmul(n) for n in nodes):
            width = 8
            skipped[name] = "int8, not int4: Gemm with transA, alpha or beta (MatMulNBits computes A @ B only)"
        elif bits == 4 and kind == "embedding" and (k % block_size or not wo.runtime_has("GatherBlockQuantized")):
            width = 8
            skipped[name] = (f"int8 per row, not int4: width {k} is not a multiple of block {block_size}" if k % block_size
                             else "int8 per row, not int4: the runtime has no GatherBlockQuantized")
        activations = {n.input[0] for n in nodes}
        shared = activations.pop() if len(activations) == 1 and kind in ("matmul", "gemm") else None
        if kind == "gemm" and get_attr(nodes[0], "transA", 0):
            shared = None
        targets[name] = Target(name, kind, width, readers, k, transposed, shared)
    return targets, skipped

"""Peephole clean-up of emitted gradient nodes: chains of scalings by constants become one Mul.

Rules are written one op at a time, so a chain rule through ``y = erf(x / sqrt(2))`` gives the
Erf rule's ``* 2 / sqrt(pi)`` followed by the Div rule's ``/ sqrt(2)``: two passes over a tensor
where one Mul by the product does.  onnxruntime folds such a scaling into a following MatMul, but
not into another elementwise node, so the gradient graph does it itself.  Only a scaling whose
result has no other reader is folded, and the product of the constants is computed in float64, so
the gradient changes by rounding only.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["fold_constant_scalings"]


def _scaling(node: onnx.NodeProto, scalars: Dict[str, np.ndarray]) -> Optional[Tuple[str, np.ndarray]]:
    """``(tensor, constant)`` when ``node`` is ``tensor * c``, ``c * tensor`` or ``tensor / c``, c a scalar."""
    if node.domain not in ("", "ai.onnx") or len(node.input) != 2 or len(node.output) != 1:
        return None
    a, b = node.input
    if node.op_type == "Mul":
        if b in scalars and a not in scalars:
            return a, scalars[b]
        if a in scalars and b not in scalars:
            return b, scalars[a]
    if node.op_type == "Div" and b in scalars and a not in scalars and scalars[b].item() != 0:
        return a, np.asarray(1.0, np.float64) / scalars[b].astype(np.float64)
    return None


def fold_constant_scalings(nodes: List[onnx.NodeProto], initializers: List[onnx.TensorProto],
                           keep: Sequence[str], constants: Optional[Dict[str, np.ndarray]] = None,
                           ) -> Tuple[List[onnx.NodeProto], List[onnx.TensorProto]]:
    """``nodes`` with each ``(t * a) * b`` chain (Mul or Div by scalar constants) as one ``t * (a b)``.

    Args:
        nodes: gradient nodes in topological order.
        initializers: the constants they read (scalar constants are looked up here).
        keep: tensor names read from outside ``nodes`` (the gradients returned): never folded away.
        constants: the forward graph's constant values (a Div rule divides by the forward's divisor).

    Returns the new node list and the initializers with the folded products appended.
    """
    floats = (np.float32, np.float64)
    scalars = {name: value for name, value in (constants or {}).items()
               if isinstance(value, np.ndarray) and value.dtype in floats and value.size == 1}
    scalars.update({init.name: numpy_helper.to_array(init) for init in initializers
                    if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE) and int(np.prod(init.dims)) == 1})
    readers: Dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    producer = {node.output[0]: node for node in nodes if node.output}
    kept: Set[str] = set(keep)
    removed: Set[int] = set()
    added: List[onnx.TensorProto] = []
    for node in nodes:
        outer = _scaling(node, scalars)
        if outer is None:
            continue
        inner_node = producer.get(outer[0])
        inner = _scaling(inner_node, scalars) if inner_node is not None else None
        if inner is None or id(inner_node) in removed or readers.get(outer[0], 0) != 1 or outer[0] in kept:
            continue
        dtype = scalars[[i for i in node.input if i in scalars][0]].dtype
        shape = max((scalars[i].shape for n in (node, inner_node) for i in n.input if i in scalars), key=len)
        product = (inner[1].astype(np.float64) * outer[1].astype(np.float64)).astype(dtype).reshape(shape)
        name = f"{node.output[0]}/folded_scale"
        added.append(numpy_helper.from_array(product, name))
        scalars[name] = product
        node.op_type = "Mul"
        node.input[:] = [inner[0], name]
        removed.add(id(inner_node))
    return [node for node in nodes if id(node) not in removed], list(initializers) + added

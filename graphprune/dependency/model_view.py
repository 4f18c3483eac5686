"""What the analysis reads of the model: constants (initializers, Constant nodes), producers, consumers."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from graphprune import ir
from graphprune.weights_on_disk import forget_kept

__all__ = ["ModelView", "NodeFields"]

# (node, op_type, domain, inputs, outputs): a plain tuple, made once per node of the graph
NodeFields = Tuple[onnx.NodeProto, str, str, List[str], List[str]]

# Ops that only relabel their input's values (a weight reshaped or transposed before use).
_RELABEL_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast")


# Element types whose raw bytes numpy reads as they are (little-endian, as ONNX stores them).
_RAW_DTYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
}


_EXTERNAL = onnx.TensorProto.EXTERNAL  # looked up once: ``forget`` runs for each of 10,000 weights

# Constants up to this size are cached by ``ModelView.const``; larger ones (weights) are not.
_CACHE_BYTES = 2**20


def _tensor_array(tensor: onnx.TensorProto, source_dir: Optional[str] = None) -> np.ndarray:
    """The tensor's values; a read-only view of the bytes ``raw_data`` returns when possible (upb
    hands out a fresh copy of them at each access: no second conversion on top).  A record left on
    disk (model loaded without its external data) is read, that tensor's bytes only, from ``source_dir``."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL and source_dir is not None:
        from graphprune.weights_on_disk import read_tensor

        return read_tensor(tensor, source_dir)
    dtype = _RAW_DTYPES.get(tensor.data_type)
    if dtype is not None and tensor.HasField("raw_data") and tensor.data_location != onnx.TensorProto.EXTERNAL:
        return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


class ModelView:
    """The model as the rules read it (``DependencyGraph`` builds on it).

    Attributes:
        model: the analysed model.
        shapes: tensor name -> inferred shape.
        source_dir: the folder of the model's file when it was loaded without its external data:
            ``const`` reads those weights from there, one at a time (None: all in memory).
        opset: the model's ai.onnx opset.
        graph_outputs: names of the graph's outputs.
    """

    def __init__(self, model: onnx.ModelProto, shapes: Optional[Dict[str, Tuple]] = None, source_dir: Optional[str] = None):
        """``shapes``: tensor name -> shape when known; else ``tensor_shapes``' (see ``_shapes``)."""
        self.model = model
        self.source_dir = source_dir
        self.opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 1)
        graph = model.graph
        # Every initializer is a constant, also one the graph's inputs list (old-style graphs list
        # them all).  (Until 2a8e175 a loop here meant to drop such initializers, but it dropped
        # names of ``ir.real_inputs``, which are no initializers: it never dropped anything.)
        self._inits = {init.name: init for init in graph.initializer}
        # the graph inputs the user feeds (``ir.real_inputs``, without reading every initializer's name again)
        self.real_inputs = [vi for vi in graph.input if vi.name not in self._inits]
        # Every node's fields read once: each read of a proto field builds new Python objects, and
        # the producers, the Constant nodes and the rules' contexts all need them.
        self.node_fields: List[NodeFields] = [(n, n.op_type, n.domain, n.input[:], n.output[:]) for n in graph.node]
        self._producers = {out: n for n, _, _, _, outputs in self.node_fields for out in outputs if out}
        self._const_nodes = {
            outputs[0]: n for n, op, domain, _, outputs in self.node_fields if op == "Constant" and domain in ("", "ai.onnx")
        }
        self._values: Dict[str, np.ndarray] = {}
        self._consumers = None
        self.graph_outputs = {vi.name for vi in graph.output}
        self._derived: Dict[str, bool] = {}
        self.shapes = shapes if shapes is not None else self._shapes()

    def _shapes(self) -> Dict[str, Tuple]:
        """The shapes the model's full check inferred when they cover every real input and node
        output (``shapes.covers``, here on the fields read above: no second pass over 20,000
        nodes), else ``tensor_shapes``."""
        from graphprune.dependency.shape_info import tensor_shapes
        from graphprune.shapes import checked_shapes

        checked = checked_shapes(self.model)
        if checked is not None and all(vi.name in checked for vi in self.real_inputs) and all(
                not name or name in checked for _, _, _, _, outputs in self.node_fields for name in outputs):
            return dict(checked)
        return tensor_shapes(self.model)

    def is_const(self, name: str) -> bool:
        return name in self._inits or name in self._const_nodes

    def is_derived_const(self, name: str) -> bool:
        """A constant, or a relabelling (Reshape, Transpose...) of constants only: its values are
        the constants' values, so deleting or zeroing the source channels prunes it too."""
        known = self._derived.get(name)
        if known is not None:
            return known
        self._derived[name] = False  # cycles cannot occur in a valid graph; this also ends recursion
        node = self._producers.get(name)
        result = self.is_const(name) or (
            node is not None
            and node.op_type in _RELABEL_OPS
            and all(not i or self.is_derived_const(i) for i in node.input)
        )
        self._derived[name] = result
        return result

    def const(self, name: str) -> Optional[np.ndarray]:
        """The value of constant ``name`` (read-only), or None when it is not a constant.

        Values below ``_CACHE_BYTES`` are kept (rules read shape vectors again and again); larger
        ones are read afresh at each call and dropped by the caller: reading a tensor's bytes
        copies them (upb), so a cache of every weight was a second copy of the model.
        """
        cached = self._values.get(name)
        if cached is not None:
            return cached
        if name in self._inits:
            value = _tensor_array(self._inits[name], self.source_dir)
        elif name in self._const_nodes:
            value = ir.constant_node_value(self._const_nodes[name])
        else:
            return None
        if value.nbytes < _CACHE_BYTES:
            self._values[name] = value
        return value

    def forget(self, name: str) -> None:
        """Drop what is kept of constant ``name``'s value, here and by ``weights_on_disk`` (a weight
        on disk read once for the door's finite check and the scoring): its pruned form exists, so
        the input's copy can go before the rest of the result is built.  Asked again, it is read again."""
        self._values.pop(name, None)
        if self.source_dir is not None:
            init = self._inits.get(name)
            if init is not None and init.data_location == _EXTERNAL:
                forget_kept(init, self.source_dir)

    def consumers(self, name: str) -> List[onnx.NodeProto]:
        if self._consumers is None:
            self._consumers = ir.consumer_map(self.model.graph)
        return self._consumers.get(name, [])

    def producer(self, name: str) -> Optional[onnx.NodeProto]:
        return self._producers.get(name)

"""Step-model forward rewrite: exported linear layers as 2-D Gemms, GELU's constant scalings inside them.

Exporters write a linear layer on a [batch, seq, K] activation as ``MatMul(x, W)`` + ``Add(bias)``,
and exact GELU as ``x * (erf(x / c) + b) * h``.  Between the FFN's two products that is six
elementwise passes over its [batch, seq, 4 * hidden] tensor (bias Add, Div, Erf, Add, Mul, Mul),
three of them only scalings and the bias, which a Gemm does for free while it writes its output
(``alpha``, ``C``).  For the training step the forward is rewritten, exactly up to rounding:

    x = x3 @ W1 + b1; y = x * (erf(x / c) + b) * h; z = y @ W2 + b2
 -> u = Gemm(x2, W1, b1 / c, alpha=1/c); p = u * (erf(u) + b); z = Gemm(p, W2, b2, alpha=c h)

(``x2`` the activation as a [rows, K] view, ``z`` viewed back in its [..., N] shape; ``b1 / c`` is a
Mul on the bias vector).  The GELU gradient (``composites.gelu_gradient``, a pattern with ``u`` as its
own input) and the Gemm rule then put every scaling into the Gemms of the backward pass as well.
Linear layers without GELU become Gemms with the bias in ``C`` (one elementwise pass fewer each).

Only the step model is rewritten (its eval model keeps the exported graph); a MatMul qualifies when
its weight is a 2-D float initializer or trainable weight and its activation's rank is known, a
bias Add when its other input is a 1-D weight of the product's output width and the product feeds
nothing else.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.autodiff.composites import GeluPattern, find_gelu_patterns
from graphprune.autodiff.gradient import ForwardFacts

__all__ = ["linear_layers_as_gemm"]

_PREFIX = "graphprune.step/gemm/"


class _Rewriter:
    """Replacement nodes for a forward graph, keyed by the node they replace (kept in order)."""

    def __init__(self, graph: onnx.GraphProto, shapes: Dict[str, Tuple[int, ...]], ranks: Dict[str, int],
                 dtypes: Dict[str, int]):
        self.graph = graph
        self.shapes = shapes  # 2-D / 1-D weights (trainable inputs and initializers)
        self.ranks = ranks
        self.dtypes = dtypes
        self.consumers: Dict[str, List[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {vi.name for vi in graph.output}
        self.replaced: Dict[int, List[onnx.NodeProto]] = {}  # id(node) -> nodes emitted in its place
        self.removed: set = set()
        self.constants: List[onnx.TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{_PREFIX}{hint}_{self._count}"

    def const(self, value: np.ndarray, hint: str) -> str:
        name = self.name(hint)
        self.constants.append(numpy_helper.from_array(value, name))
        return name

    def sole_reader(self, name: str) -> Optional[onnx.NodeProto]:
        readers = self.consumers.get(name, [])
        return readers[0] if len(readers) == 1 and name not in self.outputs else None

    def linear(self, node: onnx.NodeProto) -> Optional[Tuple[str, str, Optional[onnx.NodeProto], str]]:
        """``(x, W, bias Add or None, output)`` when ``node`` is a MatMul by a 2-D weight."""
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            return None
        x, w = node.input
        shape = self.shapes.get(w)
        if shape is None or len(shape) != 2 or self.ranks.get(x, 0) < 2 or x in self.shapes:
            return None
        add = self.sole_reader(node.output[0])
        if add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx"):
            bias = add.input[1] if add.input[0] == node.output[0] else add.input[0]
            if self.shapes.get(bias) == (shape[1],) and add.input[0] != add.input[1]:
                return x, w, add, add.output[0]
        return x, w, None, node.output[0]

    def emit_gemm(self, at: onnx.NodeProto, x: str, w: str, bias: Optional[str], alpha: float, out: str) -> None:
        """``out = alpha * x @ w + bias`` over x's rows, in x's leading shape, in place of ``at``."""
        k, n = self.shapes[w]
        rank = self.ranks[x]
        nodes: List[onnx.NodeProto] = []
        x2, y2 = (x, out) if rank == 2 else (self.name("rows"), self.name("gemm"))
        if rank != 2:
            nodes.append(helper.make_node("Reshape", [x, self.const(np.array([-1, k], np.int64), "rows_shape")], [x2],
                                          name=self.name("Reshape")))
        inputs = [x2, w] + ([bias] if bias else [])
        nodes.append(helper.make_node("Gemm", inputs, [y2], name=self.name("Gemm"), alpha=float(alpha)))
        if rank != 2:
            full, lead, shape = self.name("shape"), self.name("lead"), self.name("shape")
            ints = lambda v, hint: self.const(np.array(v, np.int64), hint)
            nodes += [
                helper.make_node("Shape", [x], [full], name=self.name("Shape")),
                helper.make_node("Slice", [full, ints([0], "start"), ints([-1], "end")], [lead],
                                 name=self.name("Slice")),
                helper.make_node("Concat", [lead, ints([n], "width")], [shape], axis=0, name=self.name("Concat")),
                helper.make_node("Reshape", [y2, shape], [out], name=self.name("Reshape")),
            ]
        self.replaced.setdefault(id(at), []).extend(nodes)

    def scaled_bias(self, at: onnx.NodeProto, bias: str, scale: float) -> str:
        """``bias * scale`` (a Mul on the bias vector, so a trainable bias still gets its gradient)."""
        out = self.name("bias")
        value = np.asarray(scale, helper.tensor_dtype_to_np_dtype(self.dtypes.get(bias, onnx.TensorProto.FLOAT)))
        self.replaced.setdefault(id(at), []).append(
            helper.make_node("Mul", [bias, self.const(value, "bias_scale")], [out], name=self.name("Mul")))
        return out


def _scalar(constants: Dict[str, np.ndarray], name: Optional[str]) -> Optional[float]:
    value = constants.get(name) if name else None
    return float(value.reshape(())) if value is not None and value.size == 1 else None


def _gelu_fold(rw: _Rewriter, pattern: GeluPattern, constants: Dict[str, np.ndarray]) -> Optional[Tuple[float, float]]:
    """``(f, c h)`` (``u = f x``) when ``pattern`` can run on ``u`` with its scalings moved into the two Gemms."""
    if pattern.u == pattern.x:  # nothing to move
        return None
    scale_node = pattern.inner[0]
    f = _scalar(constants, scale_node.input[1] if scale_node.input[0] == pattern.x else scale_node.input[0])
    h = 1.0 if pattern.scale is None else _scalar(constants, pattern.scale)
    if f is None or h is None or f == 0:
        return None
    f = 1.0 / f if scale_node.op_type == "Div" else f
    inside = {id(n) for n in pattern.inner} | {id(pattern.final)}
    if pattern.x in rw.outputs or any(id(reader) not in inside for reader in rw.consumers.get(pattern.x, [])):
        return None  # x is read elsewhere: it must still be computed
    return f, h / f


def _rewrite_gelu(rw: _Rewriter, pattern: GeluPattern) -> None:
    """The pattern on ``u``, which the Gemm writes under x's name: no scaling node, no constant factor."""
    scale_node, erf = pattern.inner[0], pattern.inner[1]
    rw.removed.add(id(scale_node))
    erf.input[0] = pattern.x
    # The product x * E (or (x h) * E) becomes u * E and writes the pattern's output; h moved to the Gemm.
    rest = pattern.inner[3:] + [pattern.final]
    product = next(node for node in rest if pattern.e in node.input)
    product.input[:] = [pattern.x, pattern.e]
    product.output[0] = pattern.final.output[0]
    rw.removed.update(id(node) for node in rest if node is not product)


def linear_layers_as_gemm(model: onnx.ModelProto, weights: Dict[str, np.ndarray], facts: ForwardFacts) -> int:
    """Rewrite ``model``'s linear layers (and the GELU between two of them) as described above, in place.

    Args:
        model: the step's forward model (trainable weights already graph inputs).
        weights: trainable weight name -> value (for shapes); initializers are read from the graph.
        facts: ``forward_facts(model)`` (ranks, element types, constant values).

    Returns the number of MatMuls rewritten.
    """
    graph = model.graph
    constants = facts.constants
    ranks = {name: len(shape) for name, shape in facts.shapes.items() if shape is not None}
    dtypes = facts.types
    shapes = {name: tuple(value.shape) for name, value in weights.items()}
    for init in graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE) and len(init.dims) in (1, 2):
            shapes.setdefault(init.name, tuple(init.dims))
    rw = _Rewriter(graph, shapes, ranks, dtypes)
    gelus = {p.x: p for p in find_gelu_patterns(model, constants).values()}
    alphas: Dict[int, float] = {}  # id(second MatMul) -> its alpha (c h) after a folded GELU
    count = 0
    for node in list(graph.node):
        found = rw.linear(node)
        if found is None or id(node) in rw.removed:
            continue
        x, w, add, out = found
        alpha = alphas.get(id(node), 1.0)
        bias = None if add is None else add.input[1] if add.input[0] == node.output[0] else add.input[0]
        pattern = gelus.get(out)
        second = rw.sole_reader(pattern.final.output[0]) if pattern is not None else None
        fold = _gelu_fold(rw, pattern, constants) if second is not None and rw.linear(second) is not None else None
        if fold is not None and second.input[0] == pattern.final.output[0] and alpha == 1.0:
            factor, outer = fold
            if bias is not None:
                bias = rw.scaled_bias(node, bias, factor)
            rw.emit_gemm(node, x, w, bias, factor, out)
            _rewrite_gelu(rw, pattern)
            alphas[id(second)] = outer
        else:
            rw.emit_gemm(node, x, w, bias, alpha, out)
        if add is not None:
            rw.removed.add(id(add))
        count += 1
    if not count:
        return 0
    nodes: List[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) in rw.replaced:
            nodes.extend(rw.replaced[id(node)])
        elif id(node) not in rw.removed:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(rw.constants)
    return count

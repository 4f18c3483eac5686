"""FuseHardSwishPass: HardSwish written out as elementwise ops (x * relu6(x + 3) / 6) becomes one HardSwish."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune import ir
from graphprune.errors import UserError
from graphprune.opset_upgrade import raise_opset
from graphprune.passes.base import Pass, PassResult, register_pass

__all__ = ["FuseHardSwishPass", "fuse_hardswish", "has_hardswish", "HARDSWISH_OPSET"]

HARDSWISH_OPSET = 14  # the first ai.onnx opset with HardSwish
_SIXTH = 1.0 / 6.0
_TOLERANCE = 1e-6  # float32 rounding of 1/6 and of products of scalars
_MAX_PRODUCT_NODES = 4  # Mul/Div nodes one product may span (Paddle and torch use 2)
_GATES = frozenset({"Clip", "HardSigmoid"})  # the op of relu6(x + 3) / 6 in each pattern


@dataclass
class _Match:
    root: onnx.NodeProto  # the last node: its output becomes HardSwish's
    x: str
    interior: List[onnx.NodeProto]  # every node replaced, root included


@register_pass
class FuseHardSwishPass(Pass):
    """Replace HardSwish written out as elementwise ops by the HardSwish op (one kernel instead of four).

    Handles, on the main graph (operands of Add and Mul in either order):
      - Paddle's ``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)``, and the same with the 1/6 as ``Mul`` by a
        scalar, anywhere in the product (``Mul(x, Div(Clip(...), 6))``...): any product of ``x``,
        ``Clip(Add(x, 3), 0, 6)`` and scalar constants whose product is 1/6;
      - torch's opset < 14 export ``Mul(x, HardSigmoid(x, alpha=1/6, beta=0.5))``;
      - Clip's bounds as inputs (opset >= 11) or attributes (opset < 11); scalars as initializers or
        Constant nodes.
    Every replaced node other than the last must feed only the pattern (an intermediate read
    elsewhere, or a graph output, leaves the pattern alone).  HardSwish needs opset 14: a model
    importing an older ai.onnx opset is raised first (``opset_upgrade.raise_opset``) when a pattern is
    found; when that fails (an op onnx's converter cannot convert) nothing changes and the reason is
    in the ``skipped`` stat.  Outputs equal the original's within float rounding.

    Args:
        raise_opset: set False to fuse only in models that already import opset 14 or later.
    """

    name = "fuse-hardswish"

    def __init__(self, raise_opset: bool = True):
        self.raise_opset = bool(raise_opset)

    def call(self, model: onnx.ModelProto) -> PassResult:
        stats = {"hardswish_fused": 0, "opset_raised": None, "skipped": None}
        if not _find(model.graph):
            return PassResult(model, False, stats)
        opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), None)
        if opset is None or opset < HARDSWISH_OPSET:
            if not self.raise_opset or opset is None:
                stats["skipped"] = f"opset {opset} has no HardSwish"
                return PassResult(model, False, stats)
            try:
                work = raise_opset(model, HARDSWISH_OPSET)
            except UserError as exc:
                stats["skipped"] = str(exc)
                return PassResult(model, False, stats)
            stats["opset_raised"] = f"{opset} -> {HARDSWISH_OPSET}"
        else:
            work = ir.clone(model)
        stats["hardswish_fused"] = _rewrite(work.graph, _find(work.graph))
        return PassResult(work, True, stats)


def fuse_hardswish(model: onnx.ModelProto, raise_opset: bool = True) -> onnx.ModelProto:
    """Functional form of ``FuseHardSwishPass``."""
    return FuseHardSwishPass(raise_opset=raise_opset)(model).model


def has_hardswish(graph: onnx.GraphProto) -> bool:
    """Whether ``graph`` holds a HardSwish written out that ``FuseHardSwishPass`` would fuse."""
    return bool(_find(graph))


def _find(graph: onnx.GraphProto) -> List[_Match]:
    """Non-overlapping matches, in graph order."""
    if not any(node.op_type in _GATES for node in graph.node):
        return []  # every pattern has a gate: no need for the finder's maps (a 20,000-node graph: 0.1 s)
    finder = _Finder(graph)
    matches, used = [], set()
    for node in graph.node:
        if node.op_type in ("Mul", "Div") and node.domain in ("", "ai.onnx") and id(node) not in used:
            match = finder.match(node)
            if match and not any(id(n) in used for n in match.interior):
                matches.append(match)
                used.update(id(n) for n in match.interior)
    return matches


class _Finder:
    def __init__(self, graph: onnx.GraphProto):
        self.producer = {out: node for node in graph.node for out in node.output if out}
        self.scalars = _scalar_constants(graph)
        reads: Dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                reads[name] = reads.get(name, 0) + 1
        for name in _subgraph_reads(graph):
            reads[name] = reads.get(name, 0) + 2  # read where a rewrite cannot see: never interior
        for out in graph.output:
            reads[out.name] = reads.get(out.name, 0) + 2
        self.reads = reads

    def _private(self, name: str) -> Optional[onnx.NodeProto]:
        """The producer of ``name`` when the pattern alone reads it (it may then be replaced)."""
        node = self.producer.get(name)
        return node if node is not None and self.reads.get(name, 0) == 1 else None

    def match(self, root: onnx.NodeProto) -> Optional[_Match]:
        product = self._product(root, [])
        if product is None:
            return None
        factors, scale, nodes = product
        if len(factors) != 2:
            return None
        for x, other in (factors, factors[::-1]):
            gate = self._private(other)
            if gate is None:
                continue
            gate_nodes = self._gate(gate, x, scale)
            if gate_nodes is not None:
                return _Match(root, x, nodes + gate_nodes)
        return None

    def _product(self, node, nodes) -> Optional[Tuple[List[str], float, list]]:
        """(tensor factors, scalar factor, nodes) of a tree of Mul/Div rooted at ``node``; None when a
        tensor divides, or the tree is larger than ``_MAX_PRODUCT_NODES``."""
        nodes = nodes + [node]
        if len(nodes) > _MAX_PRODUCT_NODES or len(node.input) != 2:
            return None
        factors, scale = [], 1.0
        for slot, name in enumerate(node.input):
            if name in self.scalars:
                value = self.scalars[name]
                if node.op_type == "Div" and slot == 1:
                    if value == 0.0:
                        return None
                    value = 1.0 / value
                scale *= value
                continue
            if node.op_type == "Div" and slot == 1:
                return None
            inner = self._private(name)
            if inner is not None and inner.op_type in ("Mul", "Div") and inner.domain in ("", "ai.onnx"):
                sub = self._product(inner, nodes)
                if sub is None:
                    return None
                factors += sub[0]
                scale *= sub[1]
                nodes = sub[2]
            else:
                factors.append(name)
        return factors, scale, nodes

    def _gate(self, gate: onnx.NodeProto, x: str, scale: float) -> Optional[list]:
        """The nodes of relu6(x + 3) (with ``scale`` 1/6) or HardSigmoid(x, 1/6, 0.5) (with ``scale`` 1)."""
        if gate.domain not in ("", "ai.onnx"):
            return None
        if gate.op_type == "HardSigmoid" and gate.input[0] == x and _near(scale, 1.0):
            if _near(ir.get_attr(gate, "alpha", 0.2), _SIXTH) and _near(ir.get_attr(gate, "beta", 0.5), 0.5):
                return [gate]
            return None
        if gate.op_type != "Clip" or not _near(scale, _SIXTH) or self._clip_bounds(gate) != (0.0, 6.0):
            return None
        add = self._private(gate.input[0])
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
            return None
        for a, b in (tuple(add.input), tuple(add.input)[::-1]):
            if a == x and b in self.scalars and _near(self.scalars[b], 3.0):
                return [gate, add]
        return None

    def _clip_bounds(self, clip: onnx.NodeProto) -> Optional[Tuple[float, float]]:
        if len(clip.input) == 1 and not clip.attribute:
            return None
        if any(a.name in ("min", "max") for a in clip.attribute):  # Clip-6 and before
            return float(ir.get_attr(clip, "min", -np.inf)), float(ir.get_attr(clip, "max", np.inf))
        names = list(clip.input[1:3]) + [""] * (3 - len(clip.input))
        if not all(n in self.scalars for n in names[:2]):
            return None
        return self.scalars[names[0]], self.scalars[names[1]]


def _rewrite(graph: onnx.GraphProto, matches: List[_Match]) -> int:
    """Replace each match by one HardSwish at its last node's place; drop constants left unread."""
    replaced = {id(n) for m in matches for n in m.interior}
    roots = {id(m.root): m for m in matches}
    read_before = {name for m in matches for n in m.interior for name in n.input}
    nodes = []
    for node in graph.node:
        match = roots.get(id(node))
        if match is not None:
            name = node.name or node.output[0]
            nodes.append(helper.make_node("HardSwish", [match.x], [node.output[0]], name=f"{name}/hardswish"))
        elif id(node) not in replaced:
            nodes.append(node)
    still_read = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
    still_read |= _subgraph_reads(graph)
    unread = read_before - still_read
    nodes = [n for n in nodes if not (n.op_type == "Constant" and n.output[0] in unread)]
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [init for init in graph.initializer if init.name not in unread]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)
    stale = [vi for vi in graph.value_info if vi.name in read_before and vi.name not in still_read]
    for vi in stale:  # shapes of tensors that no longer exist
        graph.value_info.remove(vi)
    return len(matches)


def _scalar_constants(graph: onnx.GraphProto) -> Dict[str, float]:
    """Name -> value of single-element float constants of rank <= 1 (a higher rank could broadcast x up)."""
    tensors = [(init.name, init) for init in graph.initializer]
    tensors += [(n.output[0], n.attribute[0].t) for n in graph.node
                if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"]
    scalars = {}
    for name, tensor in tensors:
        if len(tensor.dims) <= 1 and math.prod(tensor.dims) == 1 and tensor.data_type in (
                onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                scalars[name] = float(numpy_helper.to_array(tensor).reshape(()))
    return scalars


def _subgraph_reads(graph: onnx.GraphProto) -> set:
    names = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                names.update(i for n in sub.node for i in n.input)
                names |= _subgraph_reads(sub)
    return names


def _near(value: float, expected: float) -> bool:
    return abs(float(value) - expected) <= _TOLERANCE * max(1.0, abs(expected))

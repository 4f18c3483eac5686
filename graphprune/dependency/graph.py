"""Building the dependency graph: every node's rule, then graph inputs/outputs, then merged axes."""

from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Set, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from graphprune import ir
from graphprune.dependency.components import UnionFind, as_networkx, connected_components
from graphprune.dependency.dims import DimInfo, DimKey
from graphprune.dependency.index_mapping import Expand, Identity, IndexMapping, MappingError
from graphprune.dependency.options import AnalysisOptions
from graphprune.dependency.rules import MissingShape, RuleContext, rule_for
from graphprune.dependency.shape_info import tensor_shapes

__all__ = ["DependencyGraph", "build_dependency_graph", "outer_names"]

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


# Constants up to this size are cached by ``DependencyGraph.const``; larger ones (weights) are not.
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


class DependencyGraph:
    """Channel dims of a model and how pruning one prunes the others.

    Attributes:
        model: the analysed model.
        graph: the same as a ``networkx.Graph`` (built when asked for; the analysis keeps its own
            adjacency): nodes are ``DimKey``s with attribute ``info`` (``DimInfo``), edges carry
            ``links``: a list of (source dim, target dim, ``IndexMapping``).
        shapes: tensor name -> inferred shape.
        fixups: (node index, fn) rewrites registered by rules, applied when channels are removed.
        roles: constant name -> role (see ``graphprune.dependency.rules.ROLES``).
        options: what the rules couple beyond the default (``AnalysisOptions``).
        source_dir: the folder of the model's file when it was loaded without its external data:
            ``const`` reads those weights from there, one at a time (None: all in memory).
    """

    def __init__(self, model: onnx.ModelProto, shapes: Dict[str, Tuple], options: Optional[AnalysisOptions] = None,
                 source_dir: Optional[str] = None):
        self.model = model
        self.source_dir = source_dir
        self.options = options or AnalysisOptions()
        self.shapes = shapes
        self.fixups: List[Tuple[int, object]] = []
        self.roles: Dict[str, str] = {}
        self.opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 1)
        self._inits = {init.name: init for init in model.graph.initializer}
        fed = {vi.name for vi in ir.real_inputs(model.graph)}
        for name in fed:
            self._inits.pop(name, None)  # an overridable initializer is an input, not a constant
        self._const_nodes = {
            n.output[0]: n for n in model.graph.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
        }
        self._values: Dict[str, np.ndarray] = {}
        self._virtual: Dict[DimKey, int] = {}
        self._factors: List[Tuple[DimKey, List[DimKey], Optional[int], str]] = []
        self._groups = None
        self._consumers = None
        self.graph_outputs = {vi.name for vi in model.graph.output}
        self._producers = ir.producer_map(model.graph)
        self._derived: Dict[str, bool] = {}
        # dim -> its info, and dim -> neighbour -> the links between them, in the order dims were seen
        # (no networkx graph: see graphprune.dependency.components)
        self._infos: Dict[DimKey, DimInfo] = {}
        self._adj: Dict[DimKey, Dict[DimKey, list]] = {}

    # -- constants -------------------------------------------------------------------------
    def is_const(self, name: str) -> bool:
        return name in self._inits or name in self._const_nodes

    def is_derived_const(self, name: str) -> bool:
        """A constant, or a relabelling (Reshape, Transpose...) of constants only: its values are
        the constants' values, so deleting or zeroing the source channels prunes it too."""
        if name in self._derived:
            return self._derived[name]
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

    def consumers(self, name: str) -> List[onnx.NodeProto]:
        if self._consumers is None:
            self._consumers = ir.consumer_map(self.model.graph)
        return self._consumers.get(name, [])

    def producer(self, name: str) -> Optional[onnx.NodeProto]:
        return self._producers.get(name)

    # -- building (called by RuleContext) --------------------------------------------------
    def info(self, dim: DimKey) -> DimInfo:
        return self._ensure(dim)

    def known(self, dim: DimKey) -> Optional[DimInfo]:
        """``dim``'s info when the analysis saw it, else None (nothing is added)."""
        return self._infos.get(dim)

    def _ensure(self, dim: DimKey) -> DimInfo:
        info = self._infos.get(dim)
        if info is not None:
            return info
        if dim in self._virtual:
            size = self._virtual[dim]
        else:
            shape = self.shapes.get(dim.tensor)
            size = shape[dim.axis] if shape is not None and dim.axis < len(shape) else None
        info = DimInfo(size=size, param=self.is_const(dim.tensor), role=self.roles.get(dim.tensor))
        self._adj[dim] = {}
        self._infos[dim] = info
        return info

    def add_coupling(self, a: DimKey, b: DimKey, mapping: IndexMapping, ctx: Optional[RuleContext] = None) -> None:
        # the lookups and ``concrete`` inlined: called for every coupling (60,000 on a 20,000-node graph)
        infos = self._infos
        size_a = (infos.get(a) or self._ensure(a)).size
        size_b = (infos.get(b) or self._ensure(b)).size
        if isinstance(size_a, int) and isinstance(size_b, int) and size_a >= 0 and size_b >= 0:
            try:
                mapping.check(size_a, size_b)
            except MappingError as exc:
                where = f"{ctx.label}: " if ctx else ""
                for d in (a, b):
                    self.add_reason(d, f"{where}{mapping!r} does not fit {a} and {b}: {exc}")
                return
        adj = self._adj
        links = adj[a].get(b)
        if links is None:  # one list shared by both directions
            adj[a][b] = adj[b][a] = [(a, b, mapping)]
        else:
            links.append((a, b, mapping))
        self._groups = None

    def add_reason(self, dim: DimKey, reason: str) -> None:
        info = self._ensure(dim)
        if reason not in info.reasons:
            info.reasons.append(reason)
        self._groups = None

    def set_fixed(self, dim: DimKey, what: str) -> None:
        info = self._ensure(dim)
        info.fixed = info.fixed or what
        self._groups = None

    def set_role(self, name: str, role: str) -> None:
        self.roles[name] = role
        for axis in range(len(self.shapes.get(name) or ())):
            info = self._infos.get(DimKey(name, axis))
            if info is not None:
                info.role = role

    def add_virtual(self, key: DimKey, size: int) -> None:
        self._virtual[key] = int(size)
        self._ensure(key)

    def add_factor(self, merged: DimKey, factors: List[DimKey], prefer: Optional[int], label: str) -> None:
        for d in [merged, *factors]:
            self._ensure(d)
        self._factors.append((merged, factors, prefer, label))

    # -- results ---------------------------------------------------------------------------
    def dims(self) -> Iterator[DimKey]:
        """Every dim the analysis saw, in the order it saw them."""
        return iter(self._infos)

    def neighbors(self, dim: DimKey) -> Dict[DimKey, list]:
        """Neighbour -> the links (source dim, target dim, ``IndexMapping``) between it and ``dim``."""
        return self._adj[dim]

    def components(self) -> Iterator[Set[DimKey]]:
        """The connected components (sets of dims), in the order of their first dim (as
        ``networkx.connected_components`` yields them)."""
        return connected_components(self._adj)

    @property
    def graph(self):
        """The dependency graph as a ``networkx.Graph`` (see the class docstring), built at each call."""
        return as_networkx(self._infos, self._adj)

    def groups(self):
        """The coupled groups (computed once; see ``graphprune.dependency.group``)."""
        if self._groups is None:
            from graphprune.dependency.group import find_groups

            self._groups = find_groups(self)
        return self._groups

    # -- steps of build --------------------------------------------------------------------
    def _apply_rule(self, index: int, node: onnx.NodeProto) -> None:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            return  # its output is a constant; the consumers' rules say what its axes are
        ctx = RuleContext(self, node, index)
        outer = outer_names(node)
        if outer:  # a subgraph reads these tensors without listing them as the node's inputs
            for name in sorted(outer):
                ctx.block_tensor(name, f"read inside a subgraph of {node.op_type} {node.name or node.output[0]!r}")
        rule = rule_for(node.op_type, node.domain)
        if rule is None:
            domain = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
            self._block_node(ctx, f"no pruning rule for op {domain}{node.op_type}")
            return
        try:
            rule(ctx)
        except MissingShape as exc:
            self._block_node(ctx, f"shape of {exc} unknown")
            return
        mentioned = ctx.mentioned
        for name in ctx.inputs + ctx.outputs:
            if not name or name in ctx.ignored:
                continue
            for axis in range(len(self.shapes.get(name) or ())):
                if (name, axis) not in mentioned:  # a plain tuple finds its DimKey: no named tuple built per axis
                    ctx.block(DimKey(name, axis), f"the rule does not map axis {axis} of {name}")

    def _block_node(self, ctx: RuleContext, reason: str) -> None:
        for name in ctx.inputs + ctx.outputs:
            if name:
                ctx.block_tensor(name, reason)

    def _pin_boundary(self) -> None:
        for vi in ir.real_inputs(self.model.graph):
            for axis in range(len(self.shapes.get(vi.name) or ())):
                self.add_reason(DimKey(vi.name, axis), f"graph input {vi.name}")
        for vi in self.model.graph.output:
            for axis in range(len(self.shapes.get(vi.name) or ())):
                self.add_reason(DimKey(vi.name, axis), f"graph output {vi.name}")

    def _resolve_factors(self) -> None:
        """Couple each merged axis to one of its factors (see ``RuleContext.factor``)."""
        if not self._factors:
            return
        # periodic merges first: the axes they size become known before components are judged
        firsts: Dict[int, Optional[int]] = {}
        for k, (merged, factors, _, _) in enumerate(self._factors):
            infos = [self._infos[f] for f in factors]
            if not self._infos[merged].concrete or not all(i.concrete for i in infos):
                firsts[k] = self._periodic_merge(merged, infos)
        comp_of: Dict[DimKey, int] = {}
        blocked: Dict[int, bool] = {}
        for i, comp in enumerate(self.components()):
            infos = [self._infos[d] for d in comp]
            blocked[i] = any(x.reasons or x.fixed or not x.concrete for x in infos)
            comp_of.update(dict.fromkeys(comp, i))
        union = UnionFind()

        def is_blocked(dim: DimKey) -> bool:
            return blocked[union[comp_of[dim]]]

        for k, (merged, factors, prefer, label) in enumerate(self._factors):
            infos = [self._infos[f] for f in factors]
            first = firsts.get(k, 0)
            if first is None:
                for d in [merged, *factors]:
                    self.add_reason(d, f"{label}: merges axes of dynamic size")
                continue
            sizes = [i.size if i.concrete else 1 for i in infos]
            big = [i for i, s in enumerate(sizes) if s > 1 and i >= first]
            if not big:
                continue
            free = [i for i in big if not is_blocked(factors[i])]
            if prefer is not None and prefer in free:
                chosen = prefer
            else:  # the largest factor; on a tie the innermost (channels within a shuffle group)
                chosen = max(free or big, key=lambda i: (sizes[i], i))
            mapping = Expand(outer=math.prod(sizes[first:chosen]), inner=math.prod(sizes[chosen + 1:]))
            self.add_coupling(factors[chosen], merged, mapping)
            root_a, root_b = union[comp_of[factors[chosen]]], union[comp_of[merged]]
            either = blocked[root_a] or blocked[root_b]
            union.union(root_a, root_b)
            blocked[union[root_a]] = either
            for i in big:
                if i != chosen:
                    self.add_reason(
                        factors[i], f"{label}: merged with {factors[chosen]} into {merged} (one axis of a merge is pruned)"
                    )
                    blocked[union[comp_of[factors[i]]]] = True


    def _periodic_merge(self, merged: DimKey, infos: List[DimInfo]) -> Optional[int]:
        """A merge of dynamic outer axes with sizes known inside them, ``[batch, heads] -> batch*heads``
        (torch's dynamo exporter batches attention so): the merged index is ``b * P + j`` for the
        period ``P`` (the inner sizes' product), so pruning index ``j`` of the inner axes prunes it
        in every period alike.  The merged axis, and every axis of the same symbolic size it is tied
        to 1:1, is then tracked by its period.  Returns the first inner factor's index, or None when
        the merge is not of this form."""
        dynamic = [i for i, info in enumerate(infos) if not info.concrete]
        if not dynamic or dynamic != list(range(len(dynamic))):
            return None
        first = len(dynamic)
        period = math.prod(info.size for info in infos[first:])
        if period <= 1:
            return None
        info = self._infos[merged]
        if info.concrete:  # made periodic by an earlier merge (split back here)
            return first if info.size == period else None
        symbol = info.size
        if not isinstance(symbol, str) or symbol.startswith("unk__"):
            return None
        frontier, seen = [merged], {merged}
        while frontier:  # the axes tied 1:1 to it (Transpose, the batched MatMul, Softmax...)
            dim = frontier.pop()
            self._infos[dim].size = period
            for other, links in self._adj[dim].items():
                if (other not in seen and self._infos[other].size == symbol
                        and all(isinstance(m, Identity) for _, _, m in links)):
                    seen.add(other)
                    frontier.append(other)
        self._groups = None
        return first


def outer_names(node: onnx.NodeProto) -> set:
    """Tensors a node's subgraphs (If/Loop/Scan bodies) read from the enclosing graph."""
    names: set = set()
    if not node.attribute:
        return names
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            defined = {vi.name for vi in g.input} | {i.name for i in g.initializer}
            for inner in g.node:
                defined.update(inner.output)
            for inner in g.node:
                names.update(n for n in inner.input if n and n not in defined)
                names.update(outer_names(inner) - defined)
    return names


def build_dependency_graph(
    model: onnx.ModelProto, shapes: Optional[Dict[str, Tuple]] = None, options: Optional[AnalysisOptions] = None,
    source_dir: Optional[str] = None,
) -> DependencyGraph:
    """Analyse ``model``: which channel dims are coupled, and which must not be pruned.

    Args:
        model: the model; Constant nodes are read as constants, shapes come from onnx inference.
        shapes: tensor name -> shape, when already known (skips inference).
        options: head-dim or hidden-size coupling (``AnalysisOptions``; default: neither).
        source_dir: where the weights of a model loaded without its external data are (``DependencyGraph``).
    """
    dep = DependencyGraph(model, shapes if shapes is not None else tensor_shapes(model), options, source_dir)
    for index, node in enumerate(model.graph.node):
        dep._apply_rule(index, node)
    dep._pin_boundary()
    dep._resolve_factors()
    return dep


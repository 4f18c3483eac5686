"""The dependency graph: channel dims and their couplings, and building it (every node's rule, then
graph inputs/outputs, then merged axes)."""

from __future__ import annotations

from typing import Dict, Iterator, List, NamedTuple, Optional, Set, Tuple, Union

import numpy as np
import onnx

from graphprune.dependency.components import as_networkx, components_in_order
from graphprune.dependency.dims import DimInfo, DimKey, is_concrete
from graphprune.dependency.factors import resolve_factors
from graphprune.dependency.index_mapping import IDENTITY, IndexMapping, MappingError
from graphprune.dependency.model_view import ModelView, NodeFields
from graphprune.dependency.options import AnalysisOptions
from graphprune.dependency.rules import MissingShape, RuleContext, rule_for

__all__ = ["DependencyGraph", "Component", "build_dependency_graph", "outer_names"]


class Component(NamedTuple):
    """A connected component of the dependency graph, as ``find_groups`` reads it.

    Attributes:
        dims: its dims, sorted.
        infos: their infos, in the same order.
        mapped: a link that is no identity (``IndexMapping.is_identity``) joins two of its dims;
            when False and the sizes agree, index i of every dim is index i of every other.
    """

    dims: List[DimKey]
    infos: List[DimInfo]
    mapped: bool


class DependencyGraph(ModelView):
    """Channel dims of a model and how pruning one prunes the others.

    Attributes (beyond ``ModelView``'s: model, shapes, source_dir, opset, graph_outputs):
        graph: the same as a ``networkx.Graph`` (built when asked for; the analysis keeps its own
            adjacency): nodes are ``DimKey``s with attribute ``info`` (``DimInfo``), edges carry
            ``links``: a list of (source dim, target dim, ``IndexMapping``).
        fixups: (node index, fn) rewrites registered by rules, applied when channels are removed.
        roles: constant name -> role (see ``graphprune.dependency.rules.ROLES``).
        options: what the rules couple beyond the default (``AnalysisOptions``).
        factors: the merged axes rules recorded, (merged dim, factor dims, preferred factor, node
            label), resolved once every node is seen (``graphprune.dependency.factors``).
    """

    def __init__(self, model: onnx.ModelProto, shapes: Optional[Dict[str, Tuple]] = None,
                 options: Optional[AnalysisOptions] = None, source_dir: Optional[str] = None):
        super().__init__(model, shapes, source_dir)
        self.options = options or AnalysisOptions()
        self.fixups: List[Tuple[int, object]] = []
        self.roles: Dict[str, str] = {}
        self.factors: List[Tuple[DimKey, List[DimKey], Optional[int], str]] = []
        self._groups = None
        # No networkx graph (see graphprune.dependency.components): dim -> its info in the order dims
        # were seen, and by ``DimInfo.index`` the neighbour -> links of each dim.  Edges and the
        # dims at a link that is no identity are kept as indices: components are labelled over
        # arrays of them, without hashing a (tensor, axis) key per edge.
        self._infos: Dict[DimKey, DimInfo] = {}
        self._adj: List[Dict[DimKey, list]] = []
        self._edge_a: List[int] = []  # the two ends of each pair of adjacent dims
        self._edge_b: List[int] = []
        self._mapped: Set[int] = set()

    # -- building (called by RuleContext) --------------------------------------------------
    def info(self, dim: DimKey) -> DimInfo:
        return self._ensure(dim)

    def known(self, dim: DimKey) -> Optional[DimInfo]:
        """``dim``'s info when the analysis saw it, else None (nothing is added)."""
        return self._infos.get(dim)

    def _ensure(self, dim: DimKey) -> DimInfo:
        info = self._infos.get(dim)
        return info if info is not None else self._new_dim(dim)

    def _new_dim(self, dim: DimKey, size: Union[int, str, None] = None) -> DimInfo:
        """Record a dim seen for the first time; its size, unless given (virtual dims), from the shapes."""
        tensor, axis = dim
        if size is None:
            shape = self.shapes.get(tensor)
            size = shape[axis] if shape is not None and axis < len(shape) else None
        # positional: keywords make the call build a dict, half the cost of a dim (60,000 on a
        # 20,000-node graph); ``is_const`` inlined for the same reason
        param = tensor in self._inits or tensor in self._const_nodes
        info = DimInfo(size, param, self.roles.get(tensor))
        info.index = len(self._adj)
        self._adj.append({})
        self._infos[dim] = info
        return info

    def add_coupling(self, a: DimKey, b: DimKey, mapping: IndexMapping, ctx: Optional[RuleContext] = None) -> None:
        # called for every coupling (60,000 on a 20,000-node graph): each key hashed as few times as can be
        infos = self._infos
        info_a = infos.get(a) or self._new_dim(a)
        info_b = infos.get(b) or self._new_dim(b)
        # the identity between equal sizes, most couplings, fits whatever the sizes are: no check
        if mapping is not IDENTITY or info_a.size != info_b.size:
            if not self._fits(a, b, info_a.size, info_b.size, mapping, ctx):
                return
            if not mapping.is_identity:
                self._mapped.update((info_a.index, info_b.index))
        around_a = self._adj[info_a.index]
        links = around_a.get(b)
        if links is None:  # one list shared by both directions
            around_a[b] = self._adj[info_b.index][a] = [(a, b, mapping)]
            self._edge_a.append(info_a.index)
            self._edge_b.append(info_b.index)
        else:
            links.append((a, b, mapping))
        self._groups = None

    def _fits(self, a: DimKey, b: DimKey, size_a, size_b, mapping: IndexMapping, ctx: Optional[RuleContext]) -> bool:
        """Whether ``mapping`` can relate dims of these sizes (always, when one is dynamic); blocks
        both dims with the reason when it cannot."""
        if not (is_concrete(size_a) and is_concrete(size_b)):
            return True
        try:
            mapping.check(size_a, size_b)
        except MappingError as exc:
            where = f"{ctx.label}: " if ctx else ""
            for d in (a, b):
                self.add_reason(d, f"{where}{mapping!r} does not fit {a} and {b}: {exc}")
            return False
        return True

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
        infos = self._infos
        for axis in range(len(self.shapes.get(name) or ())):
            info = infos.get((name, axis))  # a plain tuple finds its DimKey: no named tuple built per axis
            if info is not None:
                info.role = role

    def add_virtual(self, key: DimKey, size: int) -> None:
        if key not in self._infos:  # a dim's size is set once, when it is first seen
            self._new_dim(key, int(size))

    def add_factor(self, merged: DimKey, factors: List[DimKey], prefer: Optional[int], label: str) -> None:
        for d in [merged, *factors]:
            self._ensure(d)
        self.factors.append((merged, factors, prefer, label))

    # -- results ---------------------------------------------------------------------------
    def dims(self) -> Iterator[DimKey]:
        """Every dim the analysis saw, in the order it saw them."""
        return iter(self._infos)

    def neighbors(self, dim: DimKey) -> Dict[DimKey, list]:
        """Neighbour -> the links (source dim, target dim, ``IndexMapping``) between it and ``dim``."""
        return self._adj[self._infos[dim].index]

    def components(self) -> Iterator[Set[DimKey]]:
        """The connected components (sets of dims), in the order of their first dim (as
        ``networkx.connected_components`` yields them)."""
        keys = list(self._infos)
        return ({keys[i] for i in chunk} for chunk in self._component_indices())

    def sorted_components(self) -> Iterator[Component]:
        """The same components, each as its dims in sorted order with their infos (``Component``)."""
        keys, infos = list(self._infos), list(self._infos.values())
        for chunk in self._component_indices():
            mapped = not self._mapped.isdisjoint(chunk)
            chunk.sort(key=keys.__getitem__)  # as sorted(dims): compares the keys, hashes none
            yield Component([keys[i] for i in chunk], [infos[i] for i in chunk], mapped)

    def _component_indices(self) -> Iterator[List[int]]:
        return components_in_order(len(self._adj), np.asarray(self._edge_a, np.int64), np.asarray(self._edge_b, np.int64))

    @property
    def graph(self):
        """The dependency graph as a ``networkx.Graph`` (see the class docstring), built at each call."""
        return as_networkx(self._infos, {d: self._adj[i.index] for d, i in self._infos.items()})

    def groups(self):
        """The coupled groups (computed once; see ``graphprune.dependency.group``)."""
        if self._groups is None:
            from graphprune.dependency.group import find_groups

            self._groups = find_groups(self)
        return self._groups

    # -- steps of build --------------------------------------------------------------------
    def _apply_rule(self, index: int, fields: NodeFields) -> None:
        node, op_type, domain, _, _ = fields
        if op_type == "Constant" and domain in ("", "ai.onnx"):
            return  # its output is a constant; the consumers' rules say what its axes are
        ctx = RuleContext(self, fields, index)
        outer = outer_names(node)
        if outer:  # a subgraph reads these tensors without listing them as the node's inputs
            for name in sorted(outer):
                ctx.block_tensor(name, f"read inside a subgraph of {op_type} {node.name or node.output[0]!r}")
        rule = rule_for(op_type, domain)
        if rule is None:
            domain = f"{domain}." if domain not in ("", "ai.onnx") else ""
            self._block_node(ctx, f"no pruning rule for op {domain}{op_type}")
            return
        try:
            rule(ctx)
        except MissingShape as exc:
            self._block_node(ctx, f"shape of {exc} unknown")
            return
        # every axis the rule left unmapped is blocked; one comprehension over the node's axes (a
        # plain tuple finds its DimKey in ``mentioned``: no named tuple built per axis)
        shapes, mentioned, ignored = self.shapes, ctx.mentioned, ctx.ignored
        unmapped = [(name, axis) for name in ctx.inputs + ctx.outputs if name and name not in ignored
                    for axis in range(len(shapes.get(name) or ())) if (name, axis) not in mentioned]
        for name, axis in dict.fromkeys(unmapped):  # a tensor read twice (Add(x, x)) is blocked once
            ctx.block(DimKey(name, axis), f"the rule does not map axis {axis} of {name}")

    def _block_node(self, ctx: RuleContext, reason: str) -> None:
        for name in ctx.inputs + ctx.outputs:
            if name:
                ctx.block_tensor(name, reason)

    def _pin_boundary(self) -> None:
        for vi in self.real_inputs:
            for axis in range(len(self.shapes.get(vi.name) or ())):
                self.add_reason(DimKey(vi.name, axis), f"graph input {vi.name}")
        for vi in self.model.graph.output:
            for axis in range(len(self.shapes.get(vi.name) or ())):
                self.add_reason(DimKey(vi.name, axis), f"graph output {vi.name}")

    def _resolve_factors(self) -> None:
        resolve_factors(self)
        self._groups = None  # a periodic merge sets sizes


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
    dep = DependencyGraph(model, shapes, options, source_dir)
    for index, fields in enumerate(dep.node_fields):
        dep._apply_rule(index, fields)
    dep.node_fields = []  # read by the rules only: their lists need not outlive the analysis
    dep._pin_boundary()
    dep._resolve_factors()
    return dep

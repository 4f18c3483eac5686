"""The rule registry and ``RuleContext``, the only interface a per-op rule sees."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from graphprune.dependency.dims import VIRTUAL_PREFIX, DimKey
from graphprune.dependency.index_mapping import IDENTITY, IndexMapping
from graphprune.dependency.kinds import stronger
from graphprune.ir import get_attr

__all__ = ["RuleContext", "Rule", "register_rule", "rule_for", "registered_ops", "MissingShape", "ROLES"]

# How pruning treats a constant's values (``RuleContext.param``):
#   weight/bias/scale/shift: deleted by `remove`, zeroed by `mask` (a masked channel outputs 0);
#   norm_scale: the scale of a normalization (what `--criterion bn` ranks), deleted or zeroed;
#   stat: BatchNorm running mean/var: deleted by `remove`, left alone by `mask` (scale is zeroed);
#   divisor: the right side of a Div: deleted by `remove`, never zeroed (x / 0 would be inf).
ROLES = ("weight", "bias", "norm_scale", "scale", "shift", "stat", "divisor")

Rule = Callable[["RuleContext"], None]
_RULES: Dict[Tuple[str, str], Rule] = {}


class MissingShape(Exception):
    """A rule needs a tensor's shape and shape inference did not provide it."""


def register_rule(*op_types: str, domain: str = "") -> Callable[[Rule], Rule]:
    """Decorator: ``rule`` handles nodes of these op types in ``domain`` ("" is ai.onnx)."""

    def decorate(rule: Rule) -> Rule:
        for op in op_types:
            _RULES[(_norm_domain(domain), op)] = rule
        return rule

    return decorate


def rule_for(op_type: str, domain: str = "") -> Optional[Rule]:
    if not domain:  # ai.onnx as most nodes write it: no call to normalize it (once per node)
        return _RULES.get(("", op_type))
    return _RULES.get((_norm_domain(domain), op_type))


def registered_ops() -> List[str]:
    return sorted(f"{d + '.' if d else ''}{op}" for d, op in _RULES)


def _norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


class RuleContext:
    """What a rule may know and do for one node.

    Knowledge: ``node``, ``inputs``/``outputs`` (absent optional inputs are ""), ``attr``, ``shape``,
    ``const`` (value of an initializer / Constant output), ``is_param``.
    Actions: ``couple`` two dims through an index mapping, ``block`` a dim with a reason, ``ignore``
    an input that carries no channels (shape vectors, scalars), ``param`` to set how pruning treats a
    constant, ``virtual`` for a dim that is no tensor's axis, ``factor`` for an axis merged from
    several (Reshape/Flatten), ``fixup`` to rewrite the node when channels are removed.

    Every axis of every input and output the rule neither couples, blocks, factors nor ignores is
    blocked afterwards ("rule does not map axis k"): forgetting an axis can never prune it silently.
    """

    def __init__(self, builder: Any, fields: Tuple[onnx.NodeProto, str, str, List[str], List[str]], index: int):
        """``fields``: the node, its op_type, domain, inputs and outputs, read from the proto once
        (``graphprune.dependency.model_view.NodeFields``)."""
        self._b = builder
        self.node, self.op_type, _, self.inputs, self.outputs = fields
        self.index = index
        self.mentioned: set = set()
        self.ignored: set = set()

    # -- knowledge -------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """How messages name this node: ``Conv 'conv1'``."""
        return f"{self.op_type} {self.node.name or self.outputs[0]!r}"

    @property
    def opset(self) -> int:
        return self._b.opset

    @property
    def options(self):
        """What the analysis was asked for (``graphprune.dependency.options.AnalysisOptions``)."""
        return self._b.options

    def input(self, i: int) -> Optional[str]:
        """Name of input ``i``, or None when absent."""
        return self.inputs[i] if i < len(self.inputs) and self.inputs[i] else None

    def attr(self, name: str, default: Any = None) -> Any:
        return get_attr(self.node, name, default)

    def shape(self, name: str) -> Optional[Tuple]:
        """Inferred shape (ints, symbol names, None for unknown dims), or None if unknown."""
        return self._b.shapes.get(name)

    def require_shape(self, name: str) -> Tuple:
        shape = self._b.shapes.get(name)  # as ``shape`` does, without its call: rules ask for most tensors
        if shape is None:
            raise MissingShape(name)
        return shape

    def rank(self, name: str) -> int:
        return len(self.require_shape(name))

    def const(self, name: Optional[str]) -> Optional[np.ndarray]:
        return self._b.const(name) if name else None

    def is_param(self, name: str) -> bool:
        return self._b.is_const(name)

    def is_constant(self, name: str) -> bool:
        """A constant or a reshape/transpose of constants (``is_param`` only for the former)."""
        return self._b.is_derived_const(name)

    def consumers(self, name: str) -> List[onnx.NodeProto]:
        """Nodes that read tensor ``name``."""
        return self._b.consumers(name)

    def producer(self, name: Optional[str]) -> Optional[onnx.NodeProto]:
        """The node that writes tensor ``name`` (None for graph inputs and initializers)."""
        return self._b.producer(name) if name else None

    def is_graph_output(self, name: str) -> bool:
        return name in self._b.graph_outputs

    def used(self, name: Optional[str]) -> bool:
        """Whether tensor ``name`` is read by a node or is a graph output (an unused optional
        output, like Dropout's mask, can be ignored)."""
        return bool(name) and (bool(self._b.consumers(name)) or name in self._b.graph_outputs)

    # -- actions ---------------------------------------------------------------------------
    def dim(self, name: str, axis: int) -> DimKey:
        """The dim of ``name`` at ``axis`` (negative axes count from the end)."""
        if axis < 0:
            axis += self.rank(name)
        return DimKey(name, int(axis))

    def couple(self, a: DimKey, b: DimKey, mapping: IndexMapping = IDENTITY) -> None:
        """Index i of ``a`` is the same channel as index/indices mapping(i) of ``b``."""
        self.mentioned.update((a, b))
        self._b.add_coupling(a, b, mapping, self)

    def block(self, dim: DimKey, reason: str) -> None:
        self.mentioned.add(dim)
        self._b.add_reason(dim, f"{self.label}: {reason}")

    def fix(self, dim: DimKey, what: str) -> None:
        """``dim`` is no channel axis (a kernel axis, a spatial axis a window slides over)."""
        self.mentioned.add(dim)
        self._b.set_fixed(dim, f"{self.label}: {what}")

    def own(self, dim: DimKey) -> None:
        """This node sets ``dim``'s size from a constant it rewrites (Expand, ConstantOfShape)."""
        self.mentioned.add(dim)
        self._b.info(dim)

    def leave(self, dim: DimKey) -> None:
        """This node neither couples nor constrains ``dim`` (a broadcast axis of size 1, an axis
        whose size a Shape node does not read)."""
        self.mentioned.add(dim)

    def block_tensor(self, name: str, reason: str) -> None:
        """Block every axis of ``name`` (nothing happens when its shape is unknown)."""
        for axis in range(len(self.shape(name) or ())):
            self.block(DimKey(name, axis), reason)

    def tag(self, dim: DimKey, kind: str) -> None:
        """Name what ``dim`` is (``graphprune.dependency.kinds``: heads, ffn, hidden...); the
        strongest tag among a group's dims is the group's kind.  Tagging maps nothing."""
        info = self._b.info(dim)
        info.kind = stronger(info.kind, kind)

    def ignore(self, *names: Optional[str]) -> None:
        """These inputs carry no channels (shape vectors, scalars, indices): leave them out."""
        self.ignored.update(n for n in names if n)

    def param(self, name: str, role: str) -> None:
        """How pruning treats constant ``name``'s values: one of ``ROLES``."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        self._b.set_role(name, role)

    def virtual(self, what: str, size: int) -> DimKey:
        """A dim that is no tensor's axis, e.g. channels per group of a group convolution."""
        key = DimKey(f"{VIRTUAL_PREFIX}{self.node.name or self.outputs[0]}:{what}", 0)
        self._b.add_virtual(key, size)
        self.mentioned.add(key)
        return key

    def factor(self, merged: DimKey, factors: Sequence[DimKey], prefer: Optional[int] = None) -> None:
        """``merged`` is ``factors`` flattened row-major (e.g. Flatten's C*H*W from C, H, W).

        Only one factor can be coupled to the merged axis (coupling two would tie every channel of
        each to every channel of the other); the builder picks it once all nodes are seen: the
        ``prefer``-th factor if prunable, else the largest prunable one, and blocks the others.
        """
        self.mentioned.add(merged)
        self.mentioned.update(factors)
        self._b.add_factor(merged, list(factors), prefer, self.label)

    def fixup(self, fn: Callable[[Any, onnx.NodeProto], None]) -> None:
        """``fn(editor, node)`` rewrites this node's copy once channels are removed (remove mode).

        The editor (``graphprune.pruning.apply.Editor``) offers ``new_size(dim)``, ``kept(dim)``
        (boolean mask of kept indices), ``set_input(node, i, array)`` and ``set_attr(node, name, v)``.
        """
        self._b.fixups.append((self.index, fn))

"""Coupled-channel dependency analysis of an ONNX graph: which channels must be pruned together.

The graph (``graph.DependencyGraph``) has one node per channel dimension, a
(tensor, axis) pair (``dims.DimKey``), and an edge wherever pruning index i of one dim means pruning
index f(i) of another (``index_mapping``: identity, concat/split/slice offsets, flatten/group
expansion).  Small per-op rules (``rules/``) add those edges.  ``group.find_groups`` turns the graph
into groups: the channels pruned together, each with the reasons it must not be pruned.

Blocking is the default: an op without a rule blocks every axis it touches ("no pruning rule for op
X"), and an axis a rule forgets is blocked too.  Graph inputs and outputs pin their dims.

Adding a rule
-------------
Write a function of a ``RuleContext`` and register it for op types (and a domain)::

    from graphprune.dependency.dims import DimKey
    from graphprune.dependency.rules import register_rule

    @register_rule("BiasGelu", domain="com.microsoft")
    def bias_gelu(ctx):                                    # Y = Gelu(X + bias), bias [hidden]
        x, bias, y = ctx.input(0), ctx.input(1), ctx.outputs[0]
        for axis in range(ctx.rank(x)):
            ctx.couple(DimKey(x, axis), DimKey(y, axis))   # elementwise: index i is index i
        if ctx.is_param(bias):
            ctx.param(bias, "shift")                       # deleted with its channels, zeroed by mask
        ctx.couple(DimKey(bias, 0), ctx.dim(x, -1))      # the bias runs along X's last axis

The context knows the node (``attr``, ``input(i)``, ``outputs``), inferred shapes (``shape``,
``rank``), constants (``const``, ``is_param``) and the graph (``consumers``).  It can:

- ``couple(a, b, mapping)``: index i of ``a`` is index/indices mapping(i) of ``b``
  (``Identity``, ``Offset(start, step)`` for segments, ``Expand(outer, inner)`` when ``b`` is ``a``
  flattened with other axes: an attention [B,S,H*D] -> [B,S,H,D] reshape couples the head axis H
  to the hidden axis H*D with ``Expand(inner=D)``);
- ``block(dim, reason)``: never prune the group holding ``dim``; the reason is reported;
- ``fix(dim, what)``: the axis is no channel axis (kernel, spatial window);
- ``factor(merged, factors, prefer)``: an axis merged from several (Reshape/Flatten): one factor is
  chosen (``prefer`` if it is prunable) and the others blocked;
- ``virtual(what, size)``: a dim that is no tensor's axis (channels per group of a group conv,
  the groups of a GroupNormalization, heads of a fused attention op);
- ``param(name, role)``: how pruning treats a constant (see ``rules.ROLES``);
- ``fixup(fn)``: rewrite the node once channels are removed (``fn(editor, node)``, with
  ``editor.new_size(dim)``, ``editor.kept(dim)``, ``editor.set_input``, ``editor.set_attr``):
  Reshape targets, Split sizes, Slice bounds, ``group``/``num_groups`` attributes.

Rules raise nothing for odd cases: they block with a reason.  A missing shape (``MissingShape``
from ``require_shape``/``rank``) blocks every axis of the node.
"""

from graphprune.dependency.dims import DimInfo, DimKey
from graphprune.dependency.graph import DependencyGraph, build_dependency_graph
from graphprune.dependency.group import Group, Member, find_groups, reported_groups
from graphprune.dependency.index_mapping import IDENTITY, Expand, Identity, IndexMapping, Offset
from graphprune.dependency.kinds import KINDS
from graphprune.dependency.options import AnalysisOptions
from graphprune.dependency.rules import ROLES, RuleContext, register_rule, registered_ops, rule_for

__all__ = [
    "DimKey",
    "DimInfo",
    "DependencyGraph",
    "build_dependency_graph",
    "Group",
    "Member",
    "find_groups",
    "reported_groups",
    "IndexMapping",
    "Identity",
    "Offset",
    "Expand",
    "IDENTITY",
    "KINDS",
    "AnalysisOptions",
    "ROLES",
    "RuleContext",
    "register_rule",
    "registered_ops",
    "rule_for",
]

"""Shape vectors: the target of a Reshape or Expand, a constant or built at run time by a Concat.

torch.onnx exports ``x.view(b, s, heads, hd)`` and Hugging Face's ``repeat_kv`` with targets
built from sizes read by ``Shape`` (batch, sequence) and constants (heads, head dim):
``Concat(Unsqueeze(Gather(Shape(x), 0)), Unsqueeze(Gather(Shape(x), 1)), [heads], [hd])``.  The
constant entries can be rewritten when heads are pruned; the entries read at run time follow
whatever tensor they read (the Shape rule keeps the axes it reads unpruned), so the axis such an
entry sizes is blocked by the rule using the vector.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from onnx import numpy_helper

from graphprune.dependency.rules.registry import RuleContext

__all__ = ["ShapeVector", "SizeSource", "foldable_slice", "read_shape_vector", "size_flows_to_targets", "static_ints"]


@dataclasses.dataclass
class ShapeVector:
    """A 1-D int shape operand: its entries, None for those computed at run time.

    Attributes:
        name: the tensor.
        values: entry values (None when computed at run time).
        dtype: element type of the constant parts.
        parts: for a Concat-built vector, (Concat input index, first entry, length, is constant) per
            input; None for a constant vector.
        shared: how many nodes read the Concat-built vector (torch's dynamo exporter builds one
            ``[batch, sequence, -1, head_dim]`` for every Q/K/V view of the model); a node whose
            entries change gets its own copy of the Concat.
    """

    name: str
    values: List[Optional[int]]
    dtype: np.dtype
    parts: Optional[List[Tuple[int, int, int, bool]]] = None
    shared: int = 1
    sources: List[Optional["SizeSource"]] = dataclasses.field(default_factory=list)
    forced: set = dataclasses.field(default_factory=set)  # Concat inputs always written as constants

    def fold(self, ctx: RuleContext, k: int) -> bool:
        """Make run-time entry ``k`` a constant written at pruning (its value known from the sizes in
        the graph, as canonicalize would fold it): True when its Concat input folds as a whole."""
        if not self.parts:
            return False
        for n, (index, first, length, constant) in enumerate(self.parts):
            if first <= k < first + length and not constant:
                value = static_ints(ctx, ctx.producer(self.name).input[index])
                if value is None:
                    return False
                self.values[first:first + length] = [int(v) for v in value.reshape(-1)]
                self.parts[n] = (index, first, length, True)
                self.forced.add(index)
                return True
        return False

    def source(self, k: int) -> Optional["SizeSource"]:
        """Where run-time entry ``k`` reads its size (None: a constant, or not understood)."""
        return self.sources[k] if k < len(self.sources) else None

    @property
    def runtime_entries(self) -> List[int]:
        return [k for k, v in enumerate(self.values) if v is None]

    @property
    def fixed_entries(self) -> List[int]:
        """Entries whose size cannot follow pruning by a rewrite of the constant: those computed at
        run time, and constants inside a vector computed otherwise than by Concat (a vector other
        nodes read too is copied for the node whose entries change)."""
        frozen = self.parts is not None and not self.parts
        return [k for k, v in enumerate(self.values) if v is None or (frozen and v > 1)]

    def write(self, editor, node, input_index: int, new: Sequence[Optional[int]]) -> None:
        """Fixup: give the constant entries the values ``new`` (run-time entries are left alone).

        ``node`` reads the vector as input ``input_index``; a Concat-built vector's constant parts
        are rewritten in the Concat node itself (found in ``editor.graph`` by its output).
        """
        if self.parts is None:
            editor.set_input(node, input_index, np.asarray(new, dtype=self.dtype))
            return
        changed = [constant and (index in self.forced or list(new[first:first + length]) != self.values[first:first + length])
                   for index, first, length, constant in self.parts]
        if not any(changed):
            return
        concat = next(n for n in editor.graph.node if self.name in n.output)
        if self.shared > 1:  # other nodes read the vector too: this node gets its own copy
            concat = editor.copy_producer(node, input_index, concat)
        for index, first, length, constant in self.parts:
            if constant:
                editor.set_input(concat, index, np.asarray(new[first:first + length], dtype=self.dtype))


@dataclasses.dataclass(frozen=True)
class SizeSource:
    """A run-time shape entry that is ``factor`` times the size of ``tensor``'s axis ``axis``
    (``Unsqueeze(Gather(Shape(t), k))``, ``Slice(Shape(t), k, k+1)``, times a constant): it follows
    that axis when the axis is pruned."""

    tensor: str
    axis: int
    factor: int = 1


# Ops a size read by Shape passes through on its way into a Reshape target, unchanged or scaled.
_SIZE_OPS = ("Gather", "Slice", "Unsqueeze", "Squeeze", "Cast", "Identity", "Mul", "Concat")


def _shape_axes(ctx: RuleContext, node) -> Optional[List[int]]:
    """The axes of its input that a Shape node reads, in order (None without the input's rank)."""
    rank = len(ctx.shape(node.input[0]) or ()) if ctx.shape(node.input[0]) is not None else None
    if rank is None:
        return None
    start = next((a.i for a in node.attribute if a.name == "start"), 0)
    end = next((a.i for a in node.attribute if a.name == "end"), rank)
    return list(range(rank))[slice(start, end)]


def _only_sources(found) -> List[Optional[SizeSource]]:
    return [f if isinstance(f, SizeSource) else None for f in found]


def _size_sources(ctx: RuleContext, name: str, depth: int = 8) -> Optional[List[Union[SizeSource, int, None]]]:
    """Per entry of the 1-D int tensor ``name``: the axis size it is, or its value where it is a
    constant (None where not understood)."""
    node = ctx.producer(name)
    if node is None or depth == 0:
        return None
    op = node.op_type
    if op == "Shape":
        axes = _shape_axes(ctx, node)
        return None if axes is None else [SizeSource(node.input[0], a) for a in axes]
    if op in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
        return _size_sources(ctx, node.input[0], depth - 1)
    if op == "Reshape" and len(ctx.shape(name) or ()) == 1 and len(ctx.shape(node.input[0]) or ()) == 1:
        return _size_sources(ctx, node.input[0], depth - 1)
    if op == "Concat":
        found: List[Union[SizeSource, int, None]] = []
        for part in node.input:
            shape = ctx.shape(part)
            if shape is None or len(shape) > 1 or (shape and not isinstance(shape[0], int)):
                return None
            value = ctx.const(part)
            inner = [int(v) for v in np.asarray(value).reshape(-1)] if value is not None else _size_sources(ctx, part, depth - 1)
            found.extend(inner if inner is not None else [None] * (shape[0] if shape else 1))
        return found
    if op == "Where" and _never_equal_to_a_size(ctx, node):
        return _size_sources(ctx, node.input[2], depth - 1)
    if op == "Mul":
        for a, b in ((0, 1), (1, 0)):
            c = ctx.const(node.input[b])
            if c is not None and np.asarray(c).size == 1:
                inner = _size_sources(ctx, node.input[a], depth - 1)
                scale = int(np.asarray(c).reshape(-1)[0])
                return None if inner is None else [
                    s * scale if isinstance(s, int) else None if s is None else SizeSource(s.tensor, s.axis, s.factor * scale)
                    for s in inner]
        return None
    if op in ("Gather", "Slice"):
        inner = _size_sources(ctx, node.input[0], depth - 1)
        if inner is None:
            return None
        if op == "Gather":
            idx = ctx.const(node.input[1])
            if idx is None or next((a.i for a in node.attribute if a.name == "axis"), 0) != 0:
                return None
            return [inner[int(i)] for i in np.asarray(idx).reshape(-1)]
        bounds = [ctx.const(i) if i else None for i in node.input[1:]]
        if len(bounds) < 2 or any(b is None for b in bounds) or any(np.asarray(b).size != 1 for b in bounds):
            return None
        start, end = (int(np.asarray(b).reshape(-1)[0]) for b in bounds[:2])
        step = int(np.asarray(bounds[3]).reshape(-1)[0]) if len(bounds) > 3 else 1
        return inner[slice(start, end, step)]
    return None


_ARITHMETIC = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}


def static_ints(ctx: RuleContext, name: Optional[str]) -> Optional[np.ndarray]:
    """The value of the int tensor ``name`` when shape arithmetic on sizes known in the graph computes
    it (TorchScript's ``chunk``: ``Div(Add(Gather(Shape(x), 1), 1), 2)`` on a 48-channel x is 24), as
    canonicalize's constant folding would if the shapes were static; None otherwise."""
    value = _static(ctx, name, 10) if name else None
    if value is None or any(v is None for v in value.reshape(-1)):
        return None
    return value.astype(np.int64)


def foldable_slice(ctx: RuleContext, node) -> bool:
    """Whether the Slice rule folds ``node``'s run-time bounds (and writes them back as constants):
    starts and ends known from the sizes in the graph, constant axes and steps, and the sliced axes
    of its output of known size."""
    if len(node.input) < 3 or static_ints(ctx, node.input[1]) is None or static_ints(ctx, node.input[2]) is None:
        return False
    if any(i and ctx.const(i) is None for i in node.input[3:]):
        return False
    rank = len(ctx.shape(node.input[0]) or ())
    ys = ctx.shape(node.output[0]) or ()
    axes = ctx.const(node.input[3]) if len(node.input) > 3 and node.input[3] else range(len(static_ints(ctx, node.input[1]).reshape(-1)))
    return rank > 0 and len(ys) == rank and all(isinstance(ys[int(a) % rank], int) for a in np.asarray(list(axes)).reshape(-1))


def _static(ctx: RuleContext, name: str, depth: int) -> Optional[np.ndarray]:
    """``static_ints`` as an object array: None for the entries of dynamic size (a Gather may drop them)."""
    value = ctx.const(name)
    if value is not None:
        return np.asarray(value).astype(object)
    node = ctx.producer(name)
    if node is None or depth == 0:
        return None
    op = node.op_type
    if op == "Shape":
        axes = _shape_axes(ctx, node)
        sizes = ctx.shape(node.input[0])
        return None if axes is None else np.array([sizes[a] if isinstance(sizes[a], int) else None for a in axes],
                                                  dtype=object)
    inputs = [_static(ctx, i, depth - 1) if i else None for i in node.input]
    if inputs[0] is None or any(v is None for v in inputs[1:]):
        return None
    try:
        if op in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape"):
            shape = ctx.shape(name)
            if shape is None or any(not isinstance(d, int) for d in shape):
                return None
            return inputs[0].reshape(shape)
        if op == "Gather" and next((a.i for a in node.attribute if a.name == "axis"), 0) == 0:
            return np.asarray(np.take(inputs[0], inputs[1].astype(np.int64), axis=0), dtype=object)
        if op == "Concat":
            return np.concatenate([v.reshape(-1) for v in inputs])
        if op in _ARITHMETIC:
            return np.asarray(_ARITHMETIC[op](inputs[0], inputs[1]), dtype=object)
        if op == "Div" and np.all(inputs[1] != 0):  # ONNX's integer Div truncates toward zero
            return np.asarray(np.vectorize(lambda a, b: int(a / b) if a is not None and b is not None else None,
                                           otypes=[object])(inputs[0], inputs[1]), dtype=object)
        if op == "Slice" and inputs[0].ndim == 1 and all(v.size == 1 for v in inputs[1:]):
            bounds = [int(v.reshape(-1)[0]) for v in inputs[1:]]
            return inputs[0][slice(bounds[0], bounds[1], bounds[3] if len(bounds) > 3 else 1)]
    except (TypeError, ValueError, AttributeError):  # arithmetic on an entry of dynamic size
        return None
    return None


def _negative(ctx: RuleContext, name: str) -> bool:
    """Whether every value of ``name`` is negative: a constant, or ``ConstantOfShape(v) * c``."""
    value = ctx.const(name)
    if value is not None:
        return bool(np.all(np.asarray(value) < 0))
    node = ctx.producer(name)
    if node is None or node.op_type != "Mul":
        return False
    for a, b in ((0, 1), (1, 0)):
        fill, c = ctx.producer(node.input[a]), ctx.const(node.input[b])
        if fill is not None and fill.op_type == "ConstantOfShape" and c is not None and np.asarray(c).size == 1:
            attr = next((x.t for x in fill.attribute if x.name == "value"), None)
            v = numpy_helper.to_array(attr).reshape(-1)[0] if attr is not None else 0
            return bool(v * np.asarray(c).reshape(-1)[0] < 0)
    return False


def _never_equal_to_a_size(ctx: RuleContext, node) -> bool:
    """``Where(Equal(v, negative), other, v)``: torch's ``expand`` keeps a ``-1`` size; sizes are never
    negative, so the Where yields ``v``."""
    cond = ctx.producer(node.input[0])
    return (cond is not None and cond.op_type == "Equal" and node.input[2] in cond.input
            and _negative(ctx, cond.input[1 - list(cond.input).index(node.input[2])]))


def _follows_expand_pattern(ctx: RuleContext, node, tensor: str) -> bool:
    """``node`` is a step of torch's ``expand()`` target that ``_size_sources`` sees through: the
    1-D Reshape, the Equal with -1 and the Where that keeps the sizes."""
    if node.op_type == "Reshape":
        return node.input[0] == tensor and len(ctx.shape(tensor) or ()) == 1
    if node.op_type == "Where":
        return _never_equal_to_a_size(ctx, node)
    if node.op_type == "Equal":
        users = ctx.consumers(node.output[0])
        return bool(users) and all(u.op_type == "Where" and _never_equal_to_a_size(ctx, u) for u in users)
    return False


def _fully_traced(ctx: RuleContext, name: str) -> bool:
    """Whether every run-time entry of target ``name`` is traced to the axis it reads (so that the
    rule reading the target can couple or block each of them)."""
    target = read_shape_vector(ctx, name)
    return target is not None and all(target.source(k) is not None for k in target.runtime_entries)


def size_flows_to_targets(ctx: RuleContext, name: str) -> bool:
    """Whether the sizes in ``name`` (a Shape output) reach nothing but Reshape/Expand targets and
    Resize sizes, through ops ``_size_sources`` follows: then the rule reading the target couples each
    entry to the axis it reads, or blocks it, and that axis may be pruned (the entry reads the new
    size at run time)."""
    frontier, seen = [name], set()
    while frontier:
        tensor = frontier.pop()
        if ctx.is_graph_output(tensor):
            return False
        for node in ctx.consumers(tensor):
            if node.op_type in ("Reshape", "Expand") and list(node.input).index(tensor) == 1:
                if not _fully_traced(ctx, tensor):
                    return False
                continue
            if node.op_type == "Slice" and list(node.input).index(tensor) >= 1:
                if not foldable_slice(ctx, node):
                    return False
                continue  # the Slice rule folds the bounds and writes them as constants
            if node.op_type == "Resize" and list(node.input).index(tensor) == 3:
                if not _fully_traced(ctx, tensor):  # the Resize rule blocks the entries it cannot follow
                    return False
                continue
            if node.op_type == "Shape":
                continue  # reads the vector's length, not its sizes
            folded = node.op_type in ("Add", "Sub", "Div") and static_ints(ctx, node.output[0]) is not None
            if not folded and not _follows_expand_pattern(ctx, node, tensor) and (
                    node.op_type not in _SIZE_OPS or (node.input[0] != tensor and node.op_type != "Concat")):
                return False
            if node.op_type in ("Add", "Sub", "Div") and static_ints(ctx, node.output[0]) is not None:
                pass  # arithmetic on known sizes: folded where it is read (Slice bounds, Reshape targets)
            elif node.op_type == "Mul" and not any(ctx.const(i) is not None for i in node.input):
                return False
            for out in node.output:
                if out not in seen:
                    seen.add(out)
                    frontier.append(out)
    return True


def read_shape_vector(ctx: RuleContext, name: Optional[str]) -> Optional[ShapeVector]:
    """The shape vector ``name``: a constant, or a Concat (axis 0) of constants and 1-D sizes computed
    at run time; None when it is neither."""
    if not name:
        return None
    value = ctx.const(name)
    if value is not None:
        return ShapeVector(name, [int(v) for v in np.asarray(value).reshape(-1)], np.asarray(value).dtype)
    concat = ctx.producer(name)
    if concat is None:
        return None
    if concat.op_type != "Concat":  # sizes only, e.g. torch's expand(): Where(Equal(v, -1), 1, v)
        found = _size_sources(ctx, name)
        if found is None or not any(isinstance(f, SizeSource) for f in found):
            return None
        values = [f if isinstance(f, int) else None for f in found]
        return ShapeVector(name, values, np.dtype(np.int64), [], sources=_only_sources(found))
    if next((a.i for a in concat.attribute if a.name == "axis"), 0) != 0:
        return None
    values: List[Optional[int]] = []
    sources: List[Optional[SizeSource]] = []
    parts = []
    dtype = np.dtype(np.int64)
    for index, part in enumerate(concat.input):
        shape = ctx.shape(part)
        if not part or shape is None or len(shape) not in (0, 1) or (shape and not isinstance(shape[0], int)):
            return None
        length = shape[0] if shape else 1
        constant = ctx.const(part)
        if constant is None:
            found = _size_sources(ctx, part)
            if found is None or len(found) != length or any(f is None for f in found):
                constant = static_ints(ctx, part)  # sizes computed from known sizes: rewritten as a constant
        parts.append((index, len(values), length, constant is not None))
        if constant is not None:
            dtype = np.asarray(constant).dtype
            values.extend(int(v) for v in np.asarray(constant).reshape(-1))
            sources.extend([None] * length)
        else:
            values.extend([None] * length)
            found = _size_sources(ctx, part)
            sources.extend(_only_sources(found) if found is not None and len(found) == length else [None] * length)
    return ShapeVector(name, values, dtype, parts, shared=len(ctx.consumers(name)), sources=sources)

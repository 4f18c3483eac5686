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
from typing import List, Optional, Sequence, Tuple

import numpy as np

from graphprune.dependency.rules.registry import RuleContext

__all__ = ["ShapeVector", "read_shape_vector"]


@dataclasses.dataclass
class ShapeVector:
    """A 1-D int shape operand: its entries, None for those computed at run time.

    Attributes:
        name: the tensor.
        values: entry values (None when computed at run time).
        dtype: element type of the constant parts.
        parts: for a Concat-built vector, (Concat input index, first entry, length, is constant) per
            input; None for a constant vector.
    """

    name: str
    values: List[Optional[int]]
    dtype: np.dtype
    parts: Optional[List[Tuple[int, int, int, bool]]] = None

    @property
    def runtime_entries(self) -> List[int]:
        return [k for k, v in enumerate(self.values) if v is None]

    def write(self, editor, node, input_index: int, new: Sequence[Optional[int]]) -> None:
        """Fixup: give the constant entries the values ``new`` (run-time entries are left alone).

        ``node`` reads the vector as input ``input_index``; a Concat-built vector's constant parts
        are rewritten in the Concat node itself (found in ``editor.graph`` by its output).
        """
        if self.parts is None:
            editor.set_input(node, input_index, np.asarray(new, dtype=self.dtype))
            return
        concat = next(n for n in editor.graph.node if self.name in n.output)
        for index, first, length, constant in self.parts:
            if constant:
                editor.set_input(concat, index, np.asarray(new[first:first + length], dtype=self.dtype))


def read_shape_vector(ctx: RuleContext, name: Optional[str]) -> Optional[ShapeVector]:
    """The shape vector ``name``: a constant, or a Concat (axis 0, read by this node only) of
    constants and 1-D sizes computed at run time; None when it is neither."""
    if not name:
        return None
    value = ctx.const(name)
    if value is not None:
        return ShapeVector(name, [int(v) for v in np.asarray(value).reshape(-1)], np.asarray(value).dtype)
    concat = ctx.producer(name)
    if concat is None or concat.op_type != "Concat" or len(ctx.consumers(name)) != 1:
        return None  # a vector shared by several nodes cannot be rewritten for one of them
    if next((a.i for a in concat.attribute if a.name == "axis"), 0) != 0:
        return None
    values: List[Optional[int]] = []
    parts = []
    dtype = np.dtype(np.int64)
    for index, part in enumerate(concat.input):
        shape = ctx.shape(part)
        if not part or shape is None or len(shape) != 1 or not isinstance(shape[0], int):
            return None
        constant = ctx.const(part)
        parts.append((index, len(values), shape[0], constant is not None))
        if constant is not None:
            dtype = np.asarray(constant).dtype
            values.extend(int(v) for v in np.asarray(constant).reshape(-1))
        else:
            values.extend([None] * shape[0])
    return ShapeVector(name, values, dtype, parts)

"""Step-model forward rewrite: positions the loss never reads are not computed (a Gather moved upstream).

A sequence classifier reads one position of its last hidden state (BERT's pooler: ``x[:, 0]``), yet
its last layer is written for every position.  Everything after the last layer's key and value
projections is position-wise along the sequence axis (the query projection, attention rows,
softmax, output projection, residual Adds, LayerNorms, the FFN), so selecting the position first
gives the same values and the same gradients, for 1/S of the work.  This pass moves a ``Gather``
with constant indices up through such ops, one producer at a time, while the gathered tensor feeds
nothing else (several identical Gathers of one tensor count as one):

  - elementwise ops (unary, binary with broadcasting, Where): the operands that have the axis,
    unless they broadcast along it;
  - Softmax / LogSoftmax over the last axis (another one), LayerNormalization over trailing axes after it;
  - Transpose (the axis is permuted), Reshape whose shape copies (0) every dim up to the axis;
  - MatMul when the axis is the row axis of its first operand (a product row by row).

A scalar index (which drops the axis) becomes a 1-D index and a Squeeze left where the Gather was.
Only the step model is rewritten (the eval model keeps the exported graph); the values are the
same up to float rounding (the same ops run on fewer rows).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune import ir
from graphprune.autodiff.gradient import ForwardFacts

__all__ = ["gather_before_positionwise"]

_PREFIX = "graphprune.step/select/"
_UNARY = {"Abs", "Cast", "Cos", "Elu", "Erf", "Exp", "Gelu", "HardSigmoid", "HardSwish", "Identity", "LeakyRelu",
          "Log", "Mish", "Neg", "Reciprocal", "Relu", "Selu", "Sigmoid", "Sin", "Softplus", "Sqrt", "Tanh"}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Where", "PRelu"}


class _Pushdown:
    def __init__(self, model: onnx.ModelProto, facts: ForwardFacts):
        self.graph = model.graph
        self.facts = facts
        self.outputs = {vi.name for vi in self.graph.output}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{_PREFIX}{hint}_{self._count}"

    def rank(self, name: str) -> Optional[int]:
        shape = self.facts.shapes.get(name)
        if name in self.facts.constants:
            return self.facts.constants[name].ndim
        return None if shape is None else len(shape)

    def dim(self, name: str, axis: int) -> Tuple[Optional[int], Optional[str]]:
        if name in self.facts.constants:
            return self.facts.constants[name].shape[axis], None
        shape = self.facts.shapes.get(name) or ()
        names = self.facts.dim_names.get(name) or (None,) * len(shape)
        return (shape[axis], names[axis]) if axis < len(shape) else (None, None)

    def indices(self, node: onnx.NodeProto) -> Optional[np.ndarray]:
        value = self.facts.constants.get(node.input[1])
        return value if value is not None and value.dtype.kind in "iu" else None

    def input_axes(self, node: onnx.NodeProto, out: str, axis: int) -> Optional[List[Optional[int]]]:
        """For each input of ``node``: the axis to gather (None: read whole), or None if the op is not position-wise."""
        op, rank = node.op_type, self.rank(out)
        if node.domain not in ("", "ai.onnx") or rank is None or len(node.output) != 1:
            return None
        if op in _UNARY:
            return [axis] + [None] * (len(node.input) - 1)
        if op in _BINARY:
            size, symbol = self.dim(out, axis)
            axes: List[Optional[int]] = []
            for name in node.input:
                own = self.rank(name)
                if own is None:
                    return None
                at = axis - (rank - own)
                dim, dim_name = self.dim(name, at) if at >= 0 else (1, None)
                if at < 0 or dim == 1:
                    axes.append(None)  # broadcast along the axis: read whole
                elif (dim is not None and dim == size) or (dim_name is not None and dim_name == symbol):
                    axes.append(at)
                else:
                    return None
            return axes if any(a is not None for a in axes) else None
        if op in ("Softmax", "LogSoftmax"):  # over the last axis only (before opset 13 it meant a 2-D view)
            return [axis] if int(ir.get_attr(node, "axis", -1)) % rank == rank - 1 != axis else None
        if op == "LayerNormalization":
            return [axis, None, None][: len(node.input)] if axis < int(ir.get_attr(node, "axis", -1)) % rank else None
        if op == "Transpose":
            perm = ir.get_attr(node, "perm") or list(reversed(range(rank)))
            return [perm[axis]]
        if op == "Reshape":
            shape = self.facts.constants.get(node.input[1])
            if shape is None or ir.get_attr(node, "allowzero", 0) or len(shape) <= axis or any(shape[: axis + 1] != 0):
                return None
            return [axis, None]
        if op == "MatMul" and rank >= 2 and axis == rank - 2 and (self.rank(node.input[0]) or 0) >= 2:
            return [axis - (rank - self.rank(node.input[0])), None]
        return None

    def step(self) -> bool:
        """Move one Gather (or one group of identical Gathers) past its data's producer; whether it did."""
        producers = {out: node for node in self.graph.node for out in node.output}
        consumers: Dict[str, List[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        for gather in self.graph.node:
            if gather.op_type != "Gather" or gather.domain not in ("", "ai.onnx"):
                continue
            data, index = gather.input[0], self.indices(gather)
            producer, rank = producers.get(data), self.rank(data)
            if index is None or index.ndim > 1 or producer is None or rank is None or data in self.outputs:
                continue  # (a 2-D index would add an axis: the moved ops' axes would no longer line up)
            axis = int(ir.get_attr(gather, "axis", 0)) % rank
            readers = consumers.get(data, [])
            same = [r for r in readers if r.op_type == "Gather" and self.indices(r) is not None
                    and int(ir.get_attr(r, "axis", 0)) % rank == axis and np.array_equal(self.indices(r), index)]
            if len(same) != len(readers):
                continue
            axes = self.input_axes(producer, data, axis)
            if axes is None:
                continue
            self._move(gather, same, producer, axes, index)
            return True
        return False

    def _move(self, gather, same, producer, axes, index) -> None:
        nodes = list(self.graph.node)
        new_nodes: List[onnx.NodeProto] = []
        vector = index.reshape(-1) if index.ndim == 0 else index
        indices = self.name("indices")
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(vector, np.int64), indices))
        self.facts.constants[indices] = np.asarray(vector, np.int64)
        inputs = []
        for name, at in zip(producer.input, axes + [None] * (len(producer.input) - len(axes))):
            if at is None or not name:
                inputs.append(name)
                continue
            picked = self.name("rows")
            new_nodes.append(helper.make_node("Gather", [name, indices], [picked], axis=at, name=self.name("Gather")))
            inputs.append(picked)
        # A 1-D index keeps the axis: the moved node writes the (first) Gather's output itself.
        selected = same[0].output[0] if index.ndim else self.name("selected")
        moved = onnx.NodeProto()
        moved.CopyFrom(producer)
        moved.name = self.name(producer.op_type)
        del moved.input[:]
        moved.input.extend(inputs)
        moved.output[0] = selected
        new_nodes.append(moved)
        rank = self.rank(gather.input[0])
        axis = int(ir.get_attr(gather, "axis", 0)) % rank
        renamed: Dict[str, str] = {}
        for reader in same:  # the other former Gathers read the selected rows (a Squeeze for a scalar index)
            if index.ndim == 0 and self.opset < 13:  # Squeeze's axes were an attribute before opset 13
                new_nodes.append(helper.make_node("Squeeze", [selected], list(reader.output), axes=[axis],
                                                  name=self.name("Squeeze")))
            elif index.ndim == 0:
                new_nodes.append(helper.make_node("Squeeze", [selected, self._ints([axis])], list(reader.output),
                                                  name=self.name("Squeeze")))
            elif reader.output[0] != selected and reader.output[0] in self.outputs:
                new_nodes.append(helper.make_node("Identity", [selected], list(reader.output),
                                                  name=self.name("Identity")))
            elif reader.output[0] != selected:  # one name for the rows (patterns such as GELU's see one tensor)
                renamed[reader.output[0]] = selected
        gone = {id(producer)} | {id(r) for r in same}
        first = min(i for i, n in enumerate(nodes) if id(n) in gone)
        kept = [n for n in nodes if id(n) not in gone]
        kept[first:first] = new_nodes  # the producer's inputs are all computed before its position
        for node in kept:
            node.input[:] = [renamed.get(name, name) for name in node.input]
        del self.graph.node[:]
        self.graph.node.extend(kept)
        # The moved node's input tensors keep their facts; its gathered rows are new tensors only
        # the next move's Gather reads (as data of a Gather: no facts needed for them).

    def _ints(self, values) -> str:
        name = self.name("axes")
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name


def gather_before_positionwise(model: onnx.ModelProto, facts: ForwardFacts, limit: int = 10000) -> int:
    """Move constant-index Gathers upstream in ``model`` (in place), as described above.

    Args:
        model: the step's forward model.
        facts: ``forward_facts(model)`` before the rewrite (ranks, dims and their names, constants).
        limit: at most this many moves (a guard; each move removes one node from the unselected graph).

    Returns the number of moves.
    """
    pushdown = _Pushdown(model, facts)
    moves = 0
    while moves < limit and pushdown.step():
        moves += 1
    return moves

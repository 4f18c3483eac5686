"""Canonicalize: Constant nodes to initializers, size-capped constant folding, HardSwish fusion, dead-node
cleanup, shapes."""

from __future__ import annotations

import warnings
from typing import Optional

import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from graphprune import ir
from graphprune.errors import UserError
from graphprune.gs_export import replay_round_trip
from graphprune.gs_round_trip import Replay, replayable, round_trip_keeps
from graphprune.model_io import for_ort
from graphprune.passes.base import Pass, PassResult, register_pass
from graphprune.passes.fuse_hardswish import FuseHardSwishPass, has_hardswish
from graphprune.runtime import ort
from graphprune.runtime_support import ort_refusal
from graphprune.shapes import infer_shapes

__all__ = ["CanonicalizePass", "canonicalize"]

_DEFAULT_FOLD_LIMIT = 16 * 2**20  # bytes: a folded tensor larger than this stays computed


@register_pass
class CanonicalizePass(Pass):
    """Bring a model from any exporter into the form the other passes expect, without changing outputs.

    Handles:
      - ``Constant`` nodes of the main graph become initializers (Paddle and older exporters store
        weights this way; pruning and training need them as initializers).
      - Old-style graphs (IR < 4) that list initializers as inputs: those inputs are dropped, so the
        weights are constants (the IR version is raised to 4, the first that allows it).
      - Constant folding through onnx-graphsurgeon (evaluated by ONNX Runtime), skipping results
        larger than ``fold_limit`` bytes so that e.g. an ``Expand`` does not bloat the file.  The
        model is relabelled for the installed runtime first (``runtime_support.for_ort``).  When ORT
        cannot evaluate the foldable part as a whole (an op it lacks, a model it cannot load),
        folding goes on node by node, and the failure is reported: a warning and the
        ``fold_failure`` stat (None when folding ran cleanly or was off).
      - Dead nodes, unused initializers, and topological order.
      - HardSwish written out as elementwise ops (Paddle's ``x * clip(x + 3, 0, 6) / 6``, torch's
        ``x * HardSigmoid(x)`` below opset 14) becomes the HardSwish op (``FuseHardSwishPass``; the
        opset is raised to 14 when needed): one kernel instead of four, e.g. PP-OCR's orientation
        classifier runs ~1.5x faster on ONNX Runtime's CPU provider.
      - Shape inference (with data propagation) to record value shapes.

    Refuses nothing; non-deterministic ops (RandomNormal...) are never folded by graphsurgeon.
    graphsurgeon's round trip is skipped when it would change nothing (``gs_round_trip``: the
    model itself comes back) and replayed on the proto when nothing folds (``gs_export``): same
    result, linear time (a 20,000-node graph: 0.2 s or 1.2 s instead of 5-7 s of CPU).

    Args:
        fold_limit: largest tensor, in bytes, that folding may create.
        fold: set False to skip folding (Constant conversion and cleanup still run).
        fuse: set False to keep activations written out as elementwise ops (and the opset as it is).
    """

    name = "canonicalize"
    # False: always through graphsurgeon (the tests' oracle for the shortcuts ``call`` takes)
    _shortcuts = True

    def __init__(self, fold_limit: int = _DEFAULT_FOLD_LIMIT, fold: bool = True, fuse: bool = True):
        self.fold_limit = int(fold_limit)
        self.fold = bool(fold)
        self.fuse = bool(fuse)

    def call(self, model: onnx.ModelProto) -> PassResult:
        replay = replayable(model, self.fold) if self._shortcuts else None
        if round_trip_keeps(model, replay) and not (self.fuse and has_hardswish(model.graph)):
            # Nothing to convert, fold, clean, sort or fuse: what the round trip below would find
            # (its result's structure equals ``model``'s), read off the proto in linear time (a
            # 20,000-node graph: 0.1 s instead of 7 s and a graphsurgeon object per tensor).
            refusal = ort_refusal(model) if self.fold else None
            fold_failure = None if refusal is None else f"skipped: {refusal}"
            if fold_failure:
                warnings.warn(f"constant folding {fold_failure}", stacklevel=2)
            return PassResult(model, False, _stats(0, 0, 0, fold_failure, None))
        return self._round_trip(model, replay)

    def _round_trip(self, model: onnx.ModelProto, replay: Optional[Replay]) -> PassResult:
        # The work is done on a weightless copy (``ir.weightless_copy``): weights only folding can
        # read keep their data, the others are records put back at the end (from ``model``, and only
        # when something changed).  Cloning the model and graphsurgeon's import and export of it
        # held up to four copies of every weight.
        before = _structure_key(model)
        work = ir.weightless_copy(model, keep=_fold_inputs(model.graph) if self.fold else frozenset())
        constants = _constants_to_initializers(work.graph)
        dropped_inputs = _drop_initializer_inputs(work)
        fold_failure = None
        if self.fold:
            try:
                work = for_ort(work)  # graphsurgeon's own ORT session loads the model with this label
            except UserError as exc:
                fold_failure = f"skipped: {exc}"
        nodes_before = len(work.graph.node)
        folds = self.fold and fold_failure is None
        if self._shortcuts and (constants or dropped_inputs or folds != self.fold):
            replay = replayable(work, folds)  # else ``work``'s graph is ``model``'s, weights aside
        # nothing to fold: graphsurgeon's cleanup, toposort and export replayed on the proto
        result = replay_round_trip(work, replay) if replay is not None else None
        if result is None:
            graph = ir.to_gs(work)
            if folds:
                fold_failure = _fold_constants(graph, self.fold_limit)
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            result = ir.from_gs(graph, like=work)
        if fold_failure:
            warnings.warn(f"constant folding {fold_failure}", stacklevel=3)
        fused = FuseHardSwishPass()(result) if self.fuse else None  # after folding: its scalars are constants
        if fused is not None and fused.modified:
            result = fused.model
        result = infer_shapes(result, inplace=True)  # a fresh model: no copy needed
        modified = _structure_key(result) != before
        stats = _stats(constants, dropped_inputs, nodes_before - len(result.graph.node), fold_failure, fused)
        if not modified:
            return PassResult(model, False, stats)
        _restore_weights(result, model)
        return PassResult(result, True, stats)


def canonicalize(model: onnx.ModelProto, fold_limit: int = _DEFAULT_FOLD_LIMIT, fold: bool = True,
                 fuse: bool = True) -> onnx.ModelProto:
    """Functional form of ``CanonicalizePass``."""
    return CanonicalizePass(fold_limit=fold_limit, fold=fold, fuse=fuse)(model).model


def _stats(constants: int, dropped: int, removed: int, fold_failure: Optional[str], fused) -> dict:
    return {
        "constants_to_initializers": constants,
        "initializer_inputs_dropped": dropped,
        "nodes_removed": removed,
        "fold_failure": fold_failure,
        "hardswish_fused": fused.stats["hardswish_fused"] if fused else 0,
        "opset_raised": fused.stats["opset_raised"] if fused else None,
    }


def _fold_constants(graph: gs.Graph, fold_limit: int) -> Optional[str]:
    """Fold ``graph`` in place; None when ORT evaluated everything, else what failed.

    graphsurgeon evaluates the whole foldable part in one ORT session; when that fails it is
    folded again node by node ("recursive" partitioning), so one op ORT cannot run costs only its
    own fold.  graphsurgeon's log lines (printed to stdout) are silenced: the failure is returned.
    """
    ort()  # quiets ORT's logger before graphsurgeon opens its sessions
    with gs.logger.G_LOGGER.suppress(gs.logger.G_LOGGER.CRITICAL + 1):
        try:
            graph.fold_constants(size_threshold=fold_limit, error_ok=False)
            return None
        except Exception as exc:  # ORT's load/run errors, or a graphsurgeon routine's
            text = str(exc).strip()
            reason = text.splitlines()[0] if text else type(exc).__name__
        graph.fold_constants(size_threshold=fold_limit, error_ok=True, partitioning="recursive")
    return f"failed ({reason}); folded node by node what ONNX Runtime could evaluate"


def _constants_to_initializers(graph: onnx.GraphProto) -> int:
    """Replace main-graph ``Constant`` nodes by initializers of the same name; returns how many."""
    keep = []
    converted = 0
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.attribute:
            if node.attribute[0].name in ("value_string", "value_strings", "sparse_value"):
                keep.append(node)
                continue
            graph.initializer.append(numpy_helper.from_array(ir.constant_node_value(node), node.output[0]))
            converted += 1
        else:
            keep.append(node)
    if converted:
        del graph.node[:]
        graph.node.extend(keep)
    return converted


def _drop_initializer_inputs(model: onnx.ModelProto) -> int:
    """Remove graph inputs that merely declare an initializer (IR 3 style)."""
    inits = {init.name for init in model.graph.initializer}
    kept = [vi for vi in model.graph.input if vi.name not in inits]
    dropped = len(model.graph.input) - len(kept)
    if dropped:
        del model.graph.input[:]
        model.graph.input.extend(kept)
        model.ir_version = max(model.ir_version, 4)
    return dropped


def _fold_inputs(graph: onnx.GraphProto) -> frozenset:
    """Initializers that constant folding may read: inputs of nodes whose inputs are all constant
    (transitively; ``Shape``/``Size`` outputs count as constant, graphsurgeon folds static shapes),
    and any referenced from a subgraph.  A superset of what folding reads is only a memory cost."""
    inits = {init.name for init in graph.initializer}
    constant = set(inits) | {n.output[0] for n in graph.node if n.op_type == "Constant" and n.output}
    needed = set()
    folded = set()
    changed = True
    while changed:  # in order, the first round settles a sorted graph; the next ones catch the rest
        changed = False
        for i, node in enumerate(graph.node):
            if i in folded:
                continue
            inputs = [name for name in node.input if name]
            if node.op_type in ("Shape", "Size") or all(name in constant for name in inputs):
                folded.add(i)
                changed = True
                constant.update(o for o in node.output if o)
                needed.update(name for name in inputs if name in inits)
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                needed.update(_names_read(sub) & inits)
    return frozenset(needed)


def _names_read(graph: onnx.GraphProto) -> set:
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                names |= _names_read(sub)
    return names


def _restore_weights(result: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Put ``model``'s tensors back where ``result`` holds their weightless stand-in records."""
    originals = {init.name: init for init in model.graph.initializer}
    for init in result.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL and any(
            e.key == "location" and e.value == ir.WEIGHTLESS_LOCATION for e in init.external_data
        ):
            init.CopyFrom(originals[init.name])


def _structure_key(model: onnx.ModelProto) -> bytes:
    """The graph without value_info and weights: what 'modified' means for this pass.

    Keyed by the weightless copy (names, types and dims of the big tensors): the whole graph would
    be a second copy of the weights, and protobuf refuses past 2 GiB.  Folding and dead-code
    removal change nodes or tensor names, never a kept weight's values.
    """
    g = onnx.GraphProto()
    g.CopyFrom(ir.weightless_copy(model).graph)
    del g.value_info[:]
    for vi in list(g.input) + list(g.output):
        vi.ClearField("type")  # inference may refine declared shapes; that is not a change
    return g.SerializeToString(deterministic=True)

"""onnx-graphsurgeon's cleanup, toposort and export replayed on the proto, in linear time.

For a graph ``gs_round_trip.replayable`` accepts (nothing to fold, every node exported as it is),
``CanonicalizePass``'s round trip through graphsurgeon is only: drop the nodes no graph output
needs, sort the rest by depth, and write the graph back (initializers in the order nodes read
them, unread ones dropped; inputs, outputs and value_info re-typed from what the importer read).
``replay_round_trip`` builds that model directly: on a 20,000-node graph graphsurgeon's objects
cost ~6 s of CPU and several hundred MB.  The per-tensor conversions (a ValueInfoProto to
graphsurgeon's tensor and back) are graphsurgeon's own functions, so types come back exactly as
graphsurgeon writes them.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import onnx
import onnx_graphsurgeon as gs
from onnx import helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter
from onnx_graphsurgeon.ir.tensor import Variable

from graphprune import ir
from graphprune.gs_round_trip import Replay

__all__ = ["replay_round_trip"]

# graphsurgeon's toposort recurses once per level of depth it has not seen yet (two Python frames
# each): deeper than this in an unsorted graph, it is left to run (and fail) as it would.
_MAX_DEPTH_FIRST = 200


def replay_round_trip(model: onnx.ModelProto, replay: Replay) -> Optional[onnx.ModelProto]:
    """What ``ir.from_gs(gs.import_onnx(model).cleanup().toposort(), like=model)`` returns, built
    on the proto (``replay`` from ``gs_round_trip.replayable(model, ...)``); None when the order
    cannot be replayed (a cycle, or a deep unsorted graph): the caller then runs graphsurgeon.

    The initializers of the result are ``model``'s own protos (copied), as graphsurgeon's are.
    """
    graph = model.graph
    live = _live(graph, replay)
    order = _toposorted(replay, live)
    if order is None:
        return None
    tensors = _imported_tensors(graph)
    # graphsurgeon's tensor map: inputs, then each node's inputs and outputs, then outputs
    seen: Dict[str, object] = {}
    for vi in graph.input:
        seen.setdefault(vi.name, tensors[vi.name])
    for index in order:
        _, inputs, outputs = replay.nodes[index]
        for name in inputs + outputs:
            if name and name not in seen:
                known = tensors.get(name)
                seen[name] = known if known is not None else Variable(name)
    for vi in graph.output:
        seen.setdefault(vi.name, tensors[vi.name])
    initializers = [t for t in seen.values() if isinstance(t, onnx.TensorProto)]
    for vi in list(graph.input) + list(graph.output):
        seen.pop(vi.name, None)
    value_info = [OnnxExporter.export_value_info_proto(t, False) for t in seen.values()
                  if isinstance(t, Variable) and (t.dtype is not None or t.shape is not None)]
    typed = {vi.name: _imported(tensors[vi.name]) for vi in list(graph.input) + list(graph.output)}
    exported = helper.make_graph(
        nodes=[graph.node[index] for index in order],
        name=graph.name,
        inputs=[OnnxExporter.export_value_info_proto(typed[vi.name], False) for vi in graph.input],
        outputs=[OnnxExporter.export_value_info_proto(typed[vi.name], False) for vi in graph.output],
        initializer=initializers,
        sparse_initializer=[],
        doc_string=graph.doc_string,
        value_info=value_info,
    )
    return _model_like(exported, model)


def _live(graph: onnx.GraphProto, replay: Replay) -> List[bool]:
    """Per node, whether a graph output depends on it (graphsurgeon's ``cleanup`` keeps those)."""
    live = [False] * len(replay.nodes)
    pending = [vi.name for vi in graph.output]
    seen = set(pending)
    while pending:
        index = replay.producer.get(pending.pop())
        if index is None or live[index]:
            continue
        live[index] = True
        for name in replay.nodes[index][1]:
            if name and name not in seen:
                seen.add(name)
                pending.append(name)
    return live


def _toposorted(replay: Replay, live: List[bool]) -> Optional[List[int]]:
    """The live nodes in graphsurgeon's ``toposort`` order: depth first from each node in turn
    (producers before consumers: the order its memo of depths is filled in), then stably by depth
    (1 + the deepest producer of an input).  None on a cycle or past ``_MAX_DEPTH_FIRST``."""
    nodes, producer = replay.nodes, replay.producer
    depth: Dict[int, int] = {}
    filled: List[int] = []
    if replay.ordered:  # every producer first: the memo fills in node order, one pass
        for index in (i for i, keep in enumerate(live) if keep):
            depth[index] = 1 + max((depth[producer[name]] for name in nodes[index][1] if name in producer),
                                   default=-1)
            filled.append(index)
        return sorted(filled, key=depth.__getitem__)
    for start in (i for i, keep in enumerate(live) if keep):
        if start in depth:
            continue
        stack = [start]
        on_stack = {start}
        while stack:
            top = stack[-1]
            missing = next((p for p in _producers_of(nodes[top], producer) if p not in depth), None)
            if missing is None:
                depth[top] = 1 + max((depth[p] for p in _producers_of(nodes[top], producer)), default=-1)
                filled.append(top)
                on_stack.discard(stack.pop())
                continue
            if missing in on_stack or len(stack) >= _MAX_DEPTH_FIRST:
                return None
            stack.append(missing)
            on_stack.add(missing)
    return sorted(filled, key=depth.__getitem__)  # sorted() is stable, as graphsurgeon's is


def _producers_of(node, producer: Dict[str, int]) -> List[int]:
    """Indices of the nodes producing ``node``'s inputs, in input order, once each."""
    return list(dict.fromkeys(producer[name] for name in node[1] if name in producer))


def _imported(tensor):
    """graphsurgeon's tensor for an entry of ``_imported_tensors`` (an initializer is imported
    only when asked: it is a graph output)."""
    return OnnxImporter.import_tensor(tensor) if isinstance(tensor, onnx.TensorProto) else tensor


def _imported_tensors(graph: onnx.GraphProto) -> Dict[str, object]:
    """Name -> graphsurgeon tensor as its importer builds them: initializers (their protos here:
    graphsurgeon exports them as they are, named), then value_info (a later entry fills the dtype
    and shape an earlier one lacks), then inputs and outputs (an entry of value_info wins)."""
    tensors: Dict[str, object] = {}
    for init in graph.initializer:
        init.name = init.name  # what the exporter does to the proto it writes (the field is then set)
        tensors[init.name] = init
    for vi in graph.value_info:
        known = tensors.get(vi.name)
        if known is None:
            tensors[vi.name] = OnnxImporter.import_tensor(vi)
        elif isinstance(known, Variable):  # an initializer's entry changes nothing
            tensor = OnnxImporter.import_tensor(vi)
            known.dtype = known.dtype or tensor.dtype
            known.shape = known.shape or tensor.shape
    for vi in list(graph.input) + list(graph.output):
        if vi.name not in tensors:
            tensors[vi.name] = OnnxImporter.import_tensor(vi)
    return tensors


def _model_like(graph: onnx.GraphProto, like: onnx.ModelProto) -> onnx.ModelProto:
    """The model ``ir.from_gs`` makes of an exported graph: ``like``'s labels and metadata, set by
    ``ir.from_gs`` itself (on an empty graph, whose proto is then replaced)."""
    model = ir.from_gs(gs.Graph(), like=like)
    model.graph.CopyFrom(graph)
    return model

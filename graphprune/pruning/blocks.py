"""Residual blocks of an ONNX graph, found structurally, for depth pruning.

A *residual unit* is an ``Add(skip, branch)`` (or ORT's fused post-norm ``SkipLayerNormalization``)
whose ``branch`` is computed from ``skip`` through at least one weighted op (MatMul, Gemm, Conv...):
an identity shortcut.  The ``Add``s inside GELU
(``x + 0.044715 x^3``), rotary embeddings or masks have no weight on the way and are not units; a
ResNet downsample block (a 1x1 conv on the shortcut) is none either, since neither input is computed
from the other.  A unit may be followed by a *post* region before the next unit reads the stream:
post-LayerNorm transformers (BERT) normalize the sum, ResNet applies a Relu.  The post region is the
single-entry, single-exit weightless subgraph between the ``Add`` and the next unit's skip; the last
unit of a run (no next unit) takes a region of the same op types as its siblings' (so a pre-norm
decoder's final LayerNorm is never taken as part of its last layer).

A *block* is what depth pruning removes: a transformer layer (a unit whose branch holds attention,
``Softmax`` or a fused attention op, with the units that follow it in the stream up to the next
attention unit: attention + MLP), or, in models without attention, one unit (a residual CNN block).
Its ``input`` is the first unit's skip and its ``output`` the tensor after the last unit's post
region; removing it means every consumer of ``output`` reads ``input`` instead.

- pre-norm (GPT-2, Llama: ``x + f(LN(x))`` pairs): removal equals zeroing each branch output exactly.
- post-norm (BERT: ``LN(x + f(x))``): removal feeds the previous layer's output to the next layer
  directly, dropping the layer's LayerNorms too; zeroing the branches would instead leave
  ``LN2(LN1(x))`` in the stream, which is not the previous layer's output (it renormalizes with the
  layer's scales and biases).  Removal is what "the layer is gone" means for the next layer, which
  was trained on normalized inputs and still gets one.
- residual CNN blocks (``relu(x + f(x))``, ``x + f(x)``): removal equals zeroing the branch when the
  post region is the identity on the block input (Relu of a Relu output, as in ResNet).
"""

from __future__ import annotations

import dataclasses
from collections import Counter, deque
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import onnx

from graphprune.ir import value_shape

__all__ = ["Block", "ResidualUnit", "find_blocks", "WEIGHTED_OPS", "ATTENTION_OPS"]

# Ops that carry learned weights when one of their inputs is constant: a branch without one is an
# activation's or an embedding's arithmetic, not a residual block.
WEIGHTED_OPS = frozenset({
    "MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "MatMulNBits", "MatMulInteger", "ConvInteger",
    "QLinearConv", "QLinearMatMul", "Attention", "MultiHeadAttention", "GroupQueryAttention",
})
# A unit whose branch holds one of these is attention: it starts a transformer layer.
ATTENTION_OPS = frozenset({
    "Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
    "PackedMultiHeadAttention", "SparseAttention", "DecoderMaskedMultiHeadAttention",
})
# ORT's fusion of a post-norm residual (com.microsoft): LayerNorm(input + skip + bias) in one node.
_FUSED_ADD_NORM = frozenset({"SkipLayerNormalization"})
# Ops that never count as constant even with constant inputs (their value changes per run).
_NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                               "Bernoulli", "Dropout"})
# Post-region ops that leave a stream as it is (torch's RMSNorm casts the sum to float32 first).
_PASS_THROUGH = frozenset({"Cast", "Identity"})
# The largest post region (a decomposed LayerNorm is 9 nodes, with Casts a few more).
_MAX_POST_NODES = 24


@dataclasses.dataclass
class ResidualUnit:
    """One identity-shortcut ``Add`` (node index ``add``) with its branch and post region."""

    add: int
    skip: str
    out: str
    branch: Set[int]
    attention: bool
    fused_norm: bool = False  # the Add is ORT's SkipLayerNormalization: it normalizes the sum itself
    post: List[int] = dataclasses.field(default_factory=list)
    end: str = ""


@dataclasses.dataclass
class Block:
    """A removable candidate: the stream goes ``input`` -> ``output`` through ``units``.

    ``kind`` is ``pre-norm`` / ``post-norm`` (transformer layers) or ``residual``; ``reason`` says
    why the block cannot be removed (empty when it can); ``nodes`` are its node indices (branches,
    Adds, post regions) in the analysed graph.
    """

    index: int
    name: str
    kind: str
    input: str
    output: str
    units: List[ResidualUnit]
    nodes: Set[int]
    reason: str = ""

    @property
    def removable(self) -> bool:
        return not self.reason

    def describe(self) -> dict:
        return {"index": self.index, "name": self.name, "kind": self.kind, "input": self.input,
                "output": self.output, "units": len(self.units)}


class _Index:
    """Producers, consumers, constness and topological positions of a graph's tensors."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.nodes = list(graph.node)
        self.producer: Dict[str, int] = {}
        self.consumers: Dict[str, List[int]] = {}
        self.inputs: List[List[str]] = []
        static = {init.name for init in graph.initializer}
        for i, node in enumerate(self.nodes):
            names = [n for n in node.input if n] + sorted(_outer_names(node))
            self.inputs.append(names)
            for name in names:
                self.consumers.setdefault(name, []).append(i)
            for name in node.output:
                if name:
                    self.producer[name] = i
            if node.op_type not in _NONDETERMINISTIC and all(n in static for n in names) and (
                    names or node.op_type == "Constant"):
                static.update(o for o in node.output if o)
        self.static = static
        self.graph_outputs = {o.name for o in graph.output}
        self.shapes = {vi.name: value_shape(vi) for vi in list(graph.input) + list(graph.value_info) + list(graph.output)}

    def position(self, tensor: str) -> int:
        """Topological position of the tensor's producer (-1 for graph inputs and initializers)."""
        return self.producer.get(tensor, -1)

    def weighted(self, i: int) -> bool:
        node = self.nodes[i]
        return node.op_type in WEIGHTED_OPS and any(n in self.static for n in node.input if n)

    def between(self, source: str, target: str) -> Set[int]:
        """Nodes on a path from ``source`` to ``target`` (``target``'s producer included); empty if none."""
        floor = self.position(source)
        start = self.producer.get(target)
        if start is None or start <= floor:
            return set()
        above: Set[int] = set()  # ancestors of target produced after source
        stack = [start]
        while stack:
            i = stack.pop()
            if i in above:
                continue
            above.add(i)
            for name in self.inputs[i]:
                j = self.producer.get(name)
                if j is not None and j > floor and j not in above:
                    stack.append(j)
        reached: Set[int] = set()
        made = {source}
        for i in sorted(above):  # forward in topological order: keep what source reaches
            if any(n in made for n in self.inputs[i]):
                reached.add(i)
                made.update(o for o in self.nodes[i].output if o)
        return reached if start in reached else set()


def _outer_names(node: onnx.NodeProto) -> Set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing scope."""
    names: Set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {i.name for i in g.initializer}
            for sub in g.node:
                local.update(o for o in sub.output if o)
            for sub in g.node:
                names.update(n for n in sub.input if n and n not in local)
                names.update(n for n in _outer_names(sub) if n not in local)
            names.update(o.name for o in g.output if o.name not in local)
    return names


def _units(index: _Index) -> List[ResidualUnit]:
    units = []
    for i, node in enumerate(index.nodes):
        fused = node.op_type in _FUSED_ADD_NORM and node.domain == "com.microsoft"
        if not fused and (node.op_type != "Add" or len(node.input) != 2):
            continue
        a, b = node.input[0], node.input[1]
        if not a or not b:
            continue
        if a in index.static or b in index.static:
            continue
        skip, branch = (a, b) if index.position(a) < index.position(b) else (b, a)
        nodes = index.between(skip, branch)
        if not nodes or not any(index.weighted(j) for j in nodes):
            continue
        shape_in, shape_out = index.shapes.get(skip), index.shapes.get(node.output[0])
        if shape_in is not None and shape_out is not None and not _same_shape(shape_in, shape_out):
            continue  # the branch broadcasts the stream to another shape: not an identity shortcut
        attention = any(index.nodes[j].op_type in ATTENTION_OPS for j in nodes)
        units.append(ResidualUnit(add=i, skip=skip, out=node.output[0], branch=nodes, attention=attention,
                                  fused_norm=fused))
    # An attention mask added to the scores of layer 2 is "computed through weights" from itself via
    # layer 1, which it also masks: such an Add's branch holds a whole other unit (its Add and the
    # producer of its skip), which a residual branch never does.  (Residual blocks nested inside a
    # residual branch are lost this way too; the inner ones stay.)
    return [u for u in units if not any(
        v is not u and v.add in u.branch and index.producer.get(v.skip) in u.branch for v in units)]


def _same_shape(a: Sequence, b: Sequence) -> bool:
    """Equal ranks, fixed dims equal, no fixed dim against a symbolic one (broadcasting); symbolic
    dims are not compared with each other (inference names one run-time size ``batch`` here and
    ``unk__7`` there) and unknown dims match anything."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x is None or y is None:
            continue
        if isinstance(x, int) != isinstance(y, int) or (isinstance(x, int) and x != y):
            return False
    return True


def _post_region(index: _Index, out: str, end: str) -> Optional[List[int]]:
    """The weightless single-entry single-exit nodes from ``out`` to ``end``, or None."""
    nodes = index.between(out, end)
    if not nodes or len(nodes) > _MAX_POST_NODES or any(index.weighted(i) for i in nodes):
        return None
    made = {out}
    for i in nodes:
        made.update(o for o in index.nodes[i].output if o)
    for i in nodes:
        if any(n not in made and n not in index.static for n in index.inputs[i]):
            return None  # reads another stream tensor: not a function of the sum alone
    for name in made - {end}:
        if name in index.graph_outputs or any(c not in nodes for c in index.consumers.get(name, [])):
            return None  # an intermediate escapes: removing the region would change another reader
    return sorted(nodes)


def _forward_tensors(index: _Index, start: str, limit: int) -> List[str]:
    """Tensors reachable from ``start`` through at most ``limit`` nodes, in topological order."""
    seen: Set[int] = set()
    queue = deque(index.consumers.get(start, []))
    while queue and len(seen) < limit:
        i = queue.popleft()
        if i in seen:
            continue
        seen.add(i)
        for o in index.nodes[i].output:
            queue.extend(index.consumers.get(o, []))
    return [o for i in sorted(seen) for o in index.nodes[i].output if o]


def _pattern(index: _Index, nodes: Iterable[int]) -> Tuple[str, ...]:
    return tuple(sorted(index.nodes[i].op_type for i in nodes))


def _attach_posts(index: _Index, units: List[ResidualUnit]) -> None:
    """Set each unit's ``post`` and ``end`` (see the module docstring)."""
    skips = {u.skip for u in units}
    pending = []
    for u in units:
        if u.out in skips:
            u.end = u.out
            continue
        found = None
        for t in _forward_tensors(index, u.out, _MAX_POST_NODES):
            if t in skips:
                found = t
                break
        region = _post_region(index, u.out, found) if found else None
        if region is None:
            pending.append(u)
            continue
        u.post, u.end = region, found
    known = Counter(_pattern(index, u.post) for u in units if u not in pending)
    common = known.most_common(1)[0][0] if known else ()
    for u in pending:  # the last unit of a run: a region like its siblings', if one is there
        u.end = u.out
        if not common:
            continue
        for t in _forward_tensors(index, u.out, len(common)):
            region = _post_region(index, u.out, t)
            if region is not None and _pattern(index, region) == common:
                u.post, u.end = region, t
                break


def _group(units: List[ResidualUnit]) -> List[List[ResidualUnit]]:
    """Units into blocks: an attention unit with the non-attention units that follow it in the stream."""
    if not any(u.attention for u in units):
        return [[u] for u in units]
    by_skip = {u.skip: u for u in units}
    groups, taken = [], set()
    for u in units:
        if id(u) in taken:
            continue
        group = [u]
        taken.add(id(u))
        if u.attention:
            nxt = by_skip.get(u.end)
            while nxt is not None and not nxt.attention and id(nxt) not in taken:
                group.append(nxt)
                taken.add(id(nxt))
                nxt = by_skip.get(nxt.end)
        groups.append(group)
    return groups


def find_blocks(model: onnx.ModelProto) -> List[Block]:
    """The residual blocks of ``model``'s main graph in topological order (removable or not, see ``reason``).

    ``model`` should carry inferred shapes (``shapes.infer_shapes``) so that broadcasting shortcuts
    are told apart; without them shapes are checked when the blocks are measured.
    """
    index = _Index(model.graph)
    units = _units(index)
    _attach_posts(index, units)
    blocks = []
    for number, group in enumerate(_group(units)):
        nodes: Set[int] = set()
        for u in group:
            nodes |= u.branch | {u.add} | set(u.post)
        first, last = group[0], group[-1]
        if any(u.attention for u in group):
            normalizes = any(u.fused_norm for u in group) or any(
                index.nodes[i].op_type not in _PASS_THROUGH for u in group for i in u.post)
            kind = "post-norm" if normalizes else "pre-norm"
        else:
            kind = "residual"
        block = Block(index=number, name=_name(index, nodes, number), kind=kind, input=first.skip,
                      output=last.end, units=group, nodes=nodes)
        block.reason = _refusal(index, block)
        blocks.append(block)
    return blocks


def _refusal(index: _Index, block: Block) -> str:
    """Why ``block`` cannot be removed, or ""."""
    shape_in, shape_out = index.shapes.get(block.input), index.shapes.get(block.output)
    if shape_in is not None and shape_out is not None and not _same_shape(shape_in, shape_out):
        return f"input shape {list(shape_in)} differs from output shape {list(shape_out)}"
    for u in block.units:
        extra = [o for o in index.nodes[u.add].output[1:] if o and (o in index.graph_outputs or index.consumers.get(o))]
        if u.fused_norm and extra:  # SkipLayerNormalization's sum read on: ORT's pre-norm fusion
            return f"the sum output {extra[0]!r} of its fused SkipLayerNormalization is read (not handled)"
    for i in block.nodes:
        for o in index.nodes[i].output:
            if o and o != block.output and o in index.graph_outputs:
                return f"its tensor {o!r} is a model output (a KV cache or an auxiliary output)"
    return ""


def _name(index: _Index, nodes: Set[int], number: int) -> str:
    """The scope shared by the block's weighted nodes (``/model/transformer/h.3``, ``layer2.1``), from
    the dynamo exporter's ``name_scopes`` when present, else from node names."""
    weighted = sorted(i for i in nodes if index.weighted(i)) or sorted(nodes)
    paths = [_scope_path(index.nodes[i]) for i in weighted]
    common, sep = paths[0]
    for path, _ in paths[1:]:
        n = 0
        while n < min(len(common), len(path)) and common[n] == path[n]:
            n += 1
        common = common[:n]
    return sep.join(common) if common else f"block {number}"


def _scope_path(node: onnx.NodeProto) -> Tuple[List[str], str]:
    """(scope parts, separator): the dynamo exporter's deepest ``name_scopes`` entry split on ".", or
    the TorchScript exporter's ``/model/h.0/attn/MatMul`` node name split on "/" without the op."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip(" '\"") for s in prop.value.strip("[]").split(",")]
            modules = [s for s in scopes[:-1] if s]  # the last entry names the op itself
            return (modules[-1].split(".") if modules else []), "."
    if "/" in node.name:
        return [p for p in node.name.split("/") if p][:-1], "/"
    return node.name.split(".")[:-1], "."

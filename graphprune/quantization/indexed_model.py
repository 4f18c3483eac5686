"""ONNX Runtime's quantizer on large graphs: its ``ONNXModel`` lookups answered from indexes.

``QDQQuantizer`` renames each quantized tensor by scanning every node
(``ONNXModel.replace_input_of_all_nodes``), rebuilds a reader map of the whole graph per Relu/Clip
(``input_name_to_nodes``), finds every initializer by a linear search (``find_by_name``) and
removes each folded node with a search by proto equality: quadratic in the node count (a
20,000-node graph ran past 600 s).  ``indexed_quantizer`` swaps in ``IndexedModel``, an
``ONNXModel`` keeping name -> readers, name -> writers and name -> initializer indexes up to date
through the same methods the quantizer mutates the graph with, and routes ``find_by_name`` on its
initializers to the index while the quantizer runs.  The operations applied to the graph are the
same, in the same order: the quantized model is byte-identical (tests/test_quantize_indexed.py).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
from typing import Dict, Iterator, Mapping

import onnx

__all__ = ["IndexedModel", "indexed_quantizer"]

# Modules of ORT's quantizer that call ``find_by_name`` (imported by name from quant_utils).
_FIND_BY_NAME_MODULES = ("base_quantizer", "qdq_quantizer", "onnx_model", "operators.matmul", "operators.conv")


class _Initializers:
    """The graph's initializer list as ``ONNXModel.initializer()`` hands it out, plus its index:
    iteration, ``len`` and indexing go to the real repeated field; ``find_by_name`` on it (while
    ``indexed_quantizer`` is active) is a dict lookup."""

    def __init__(self, model: "IndexedModel"):
        self._model = model

    def __iter__(self):
        return iter(self._model.model.graph.initializer)

    def __len__(self):
        return len(self._model.model.graph.initializer)

    def __getitem__(self, index):
        return self._model.model.graph.initializer[index]


class _Readers(Mapping):
    """``input_name_to_nodes()`` without rebuilding it: name -> nodes reading it (callers only read
    it; the nodes of a name come in the order they began to read it, not in graph order)."""

    def __init__(self, index: Dict[str, Dict[int, onnx.NodeProto]]):
        self._index = index

    def __getitem__(self, name):
        nodes = self._index.get(name)
        if not nodes:
            raise KeyError(name)
        return list(nodes.values())

    def __iter__(self):
        return (name for name, nodes in self._index.items() if nodes)

    def __len__(self):
        return sum(1 for nodes in self._index.values() if nodes)


class _IndexedMethods:
    """``IndexedModel``'s methods: ``ONNXModel`` whose reader, writer and initializer lookups are
    indexed (same results).  The class itself is made on first use (``_indexed_model_class``) so
    that importing this module does not import ORT's quantizer (0.06 s of every command's start).

    Nodes are keyed by identity: under upb a node of the graph keeps its Python object while it
    is referenced, and the quantizer hands back the objects it got from iterating the graph.
    """

    def __init__(self, model: onnx.ModelProto):
        super().__init__(model)
        self._rebuild()

    def _rebuild(self) -> None:
        self._readers: Dict[str, Dict[int, onnx.NodeProto]] = collections.defaultdict(dict)
        self._writers: Dict[str, Dict[int, onnx.NodeProto]] = collections.defaultdict(dict)
        for node in self.model.graph.node:
            self._index_node(node)
        self._inits: Dict[str, onnx.TensorProto] = {}
        for tensor in self.model.graph.initializer:
            self._inits.setdefault(tensor.name, tensor)  # find_by_name returns the first of a name

    def _index_node(self, node: onnx.NodeProto) -> None:
        for name in node.input:
            if name:
                self._readers[name][id(node)] = node
        for name in node.output:
            if name:
                self._writers[name][id(node)] = node

    def _unindex_node(self, node: onnx.NodeProto) -> None:
        for name in node.input:
            self._readers.get(name, {}).pop(id(node), None)
        for name in node.output:
            self._writers.get(name, {}).pop(id(node), None)

    # --- initializers -------------------------------------------------------------------------
    def initializer(self):
        return _Initializers(self)

    def find_initializer(self, name: str):
        return self._inits.get(name)

    def get_initializer(self, name):
        return self._inits.get(name)

    def add_initializer(self, tensor):
        if tensor.name not in self._inits:
            self._check_init(tensor)
            self.model.graph.initializer.extend([tensor])
            self._inits[tensor.name] = self.model.graph.initializer[-1]  # extend stored a copy

    def initializer_extend(self, inits):
        super().initializer_extend(inits)
        for tensor in self.model.graph.initializer[len(self.model.graph.initializer) - len(inits):]:
            self._inits.setdefault(tensor.name, tensor)

    def remove_initializer(self, tensor):
        super().remove_initializer(tensor)
        self._inits = {}
        for t in self.model.graph.initializer:
            self._inits.setdefault(t.name, t)

    def clean_initializers(self):
        result = super().clean_initializers()
        self._rebuild()  # the helper edits the graph's lists directly
        return result

    # --- nodes --------------------------------------------------------------------------------
    def add_node(self, node):
        super().add_node(node)
        self._index_node(self.model.graph.node[-1])  # extend stored a copy

    def remove_node(self, node):
        self.remove_nodes([node])

    def remove_nodes(self, nodes_to_remove):
        """ORT removes each node with ``node in graph.node`` (proto equality, a scan per node): here
        the nodes found by identity go in one pass; any other is left to ORT's way."""
        wanted = {id(n): n for n in nodes_to_remove}
        positions = [i for i, n in enumerate(self.model.graph.node) if id(n) in wanted]
        found = set()
        for i in reversed(positions):
            node = self.model.graph.node[i]
            found.add(id(node))
            self._unindex_node(node)
            del self.model.graph.node[i]
        for node in nodes_to_remove:
            if id(node) not in found:
                count = len(self.model.graph.node)
                super().remove_node(node)
                if len(self.model.graph.node) != count:
                    self._rebuild()

    def input_name_to_nodes(self):
        return _Readers(self._readers)

    def output_name_to_node(self):
        return {name: next(reversed(nodes.values())) for name, nodes in self._writers.items() if nodes}

    def replace_node_input(self, node, old_input_name, new_input_name):
        super().replace_node_input(node, old_input_name, new_input_name)
        if old_input_name not in node.input:
            self._readers.get(old_input_name, {}).pop(id(node), None)
        if new_input_name in node.input:
            self._readers[new_input_name][id(node)] = node

    def replace_input_of_all_nodes(self, old_input_name, new_input_name):
        for node in list(self._readers.get(old_input_name, {}).values()):
            self.replace_node_input(node, old_input_name, new_input_name)

    def replace_input_of_nodes(self, old_input_name, new_input_name, node_names_set):
        for node in list(self._readers.get(old_input_name, {}).values()):
            if node.name in node_names_set:
                self.replace_node_input(node, old_input_name, new_input_name)

    def replace_node_output(self, node, old_output_name, new_output_name):
        super().replace_node_output(node, old_output_name, new_output_name)
        if old_output_name not in node.output:
            self._writers.get(old_output_name, {}).pop(id(node), None)
        if new_output_name in node.output:
            self._writers[new_output_name][id(node)] = node

    def replace_output_of_all_nodes(self, old_output_name, new_output_name):
        for node in list(self._writers.get(old_output_name, {}).values()):
            self.replace_node_output(node, old_output_name, new_output_name)

    def replace_output_of_nodes(self, old_output_name, new_output_name, node_names_set):
        for node in list(self._writers.get(old_output_name, {}).values()):
            if node.name in node_names_set:
                self.replace_node_output(node, old_output_name, new_output_name)


@functools.lru_cache(maxsize=None)
def _indexed_model_class() -> type:
    from onnxruntime.quantization.onnx_model import ONNXModel  # lazy: see _IndexedMethods

    return type("IndexedModel", (_IndexedMethods, ONNXModel),
                {"__doc__": _IndexedMethods.__doc__, "__module__": __name__, "__qualname__": "IndexedModel"})


def __getattr__(name: str):
    """``IndexedModel``, made on first access (PEP 562)."""
    if name == "IndexedModel":
        return _indexed_model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def indexed_quantizer() -> Iterator[None]:
    """While active, a quantizer constructed (and run) inside works on an ``IndexedModel`` of its
    model (``BaseQuantizer.__init__`` builds ``ONNXModel(model)`` by the module's global name), and
    ORT's ``find_by_name`` answers lookups in that model's initializers from its index."""
    base = importlib.import_module("onnxruntime.quantization.base_quantizer")
    modules = [importlib.import_module(f"onnxruntime.quantization.{name}") for name in _FIND_BY_NAME_MODULES]
    saved = [(m, m.__dict__.get("find_by_name")) for m in modules]
    original = next(f for _, f in saved if f is not None)
    model_class = base.ONNXModel

    def find_by_name(item_name, item_list):
        if isinstance(item_list, _Initializers):
            return item_list._model.find_initializer(item_name)
        return original(item_name, item_list)

    try:
        base.ONNXModel = _indexed_model_class()
        for module, previous in saved:
            if previous is not None:
                module.find_by_name = find_by_name
        yield
    finally:
        base.ONNXModel = model_class
        for module, previous in saved:
            if previous is not None:
                module.find_by_name = previous

"""Applying a selection: delete the channels (``remove``) or zero them (``mask``), then fix the graph.

``remove`` deletes the chosen indices from every member constant, runs the rules' fixups (Reshape
targets, Split sizes, Slice bounds, Expand/ConstantOfShape/Resize shapes, ``group`` attributes...)
and re-infers value shapes.  ``mask`` keeps every shape and zeroes the same indices in every
member constant whose role allows it (weights, biases, scales, shifts: a masked channel outputs 0
and nothing reads it), and records them in ``metadata_props[PRUNED_CHANNELS_KEY]`` as JSON
``{constant: {axis: [indices]}}`` so fine-tuning can keep them at zero.
"""

from __future__ import annotations

import json
import sys
from itertools import compress
from json.encoder import encode_basestring_ascii
from typing import Dict, List, Tuple, Union

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.dependency import DependencyGraph, DimKey, Group
from graphprune.dependency.dims import VIRTUAL_PREFIX
from graphprune.dependency.shape_info import infer_value_info, model_shell
from graphprune.errors import UserError

__all__ = ["MODES", "PRUNED_CHANNELS_KEY", "REMOVED_CHANNELS_KEY", "Editor", "removal_masks", "apply_selection",
           "pruned_channels", "removed_channels", "add_initializer"]

MODES = ("remove", "mask")
PRUNED_CHANNELS_KEY = "graphprune.pruned_channels"
# What the last ``remove`` deleted, in the numbering of the model it was applied to: reconstruction
# (graphprune.pruning.reconstruct) pairs each shrunk constant with the original's.
REMOVED_CHANNELS_KEY = "graphprune.removed_channels"
# Roles whose values `mask` never zeroes (see graphprune.dependency.rules.ROLES).
_NOT_ZEROED = ("stat", "divisor")


def removal_masks(groups: List[Group], selected: Dict[int, np.ndarray]) -> Dict[DimKey, np.ndarray]:
    """Dim -> boolean mask of its indices to prune (a dim shared by groups, e.g. a Concat output,
    collects the indices of each)."""
    by_id = {g.id: g for g in groups}
    masks: Dict[DimKey, np.ndarray] = {}
    for gid, removed in selected.items():
        if not removed.any():
            continue
        plain = removed.dtype == bool
        for m in by_id[gid].members:
            mask = masks.get(m.dim)
            if mask is None:
                if plain and m.identity and m.info.size == removed.size:  # index k is channel k: the mask itself
                    masks[m.dim] = removed.copy()  # its own: a dim shared with another group adds to it
                    continue
                mask = masks[m.dim] = np.zeros(m.info.size, dtype=bool)
            mask[m.positions[removed[m.atoms]]] = True
    return masks


class Editor:
    """What rule fixups use to rewrite a node of the pruned graph.

    Args:
        dep: the analysis of the original model.
        masks: dim -> indices removed.
        graph: the new graph (its initializers may be appended to).
    """

    def __init__(self, dep: DependencyGraph, masks: Dict[DimKey, np.ndarray], graph: onnx.GraphProto):
        self.dep = dep
        self.masks = masks
        self.graph = graph
        self._names = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
        self._names |= {vi.name for vi in graph.input}
        self.replaced: set = set()  # constants a fixup swapped out (dropped when no longer read)
        self.inserted: List[Tuple[str, onnx.NodeProto]] = []  # (output of the node it precedes, new node)

    def unique_name(self, base: str) -> str:
        """A tensor name not yet in the graph, from ``base``."""
        name, k = base, 1
        while name in self._names:
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    def copy_producer(self, node: onnx.NodeProto, index: int, producer: onnx.NodeProto) -> onnx.NodeProto:
        """Give ``node`` its own copy of ``producer`` (which writes its input ``index`` and is read by
        other nodes too), inserted just before ``node``; returns the copy, free to be rewritten."""
        copy = onnx.NodeProto()
        copy.CopyFrom(producer)
        copy.output[0] = self.unique_name(f"{producer.output[0]}_pruned")
        copy.name = self.unique_name(f"{producer.name or producer.output[0]}_pruned")
        node.input[index] = copy.output[0]
        self.inserted.append((node.output[0], copy))
        return copy

    def new_size(self, dim: DimKey) -> int:
        size = self.dep.info(dim).size
        if not isinstance(size, int):  # a rule asked for an axis it could not size: refuse, never guess
            raise UserError(f"cannot rewrite the graph after pruning: the size of {dim} is unknown ({size!r}); "
                            "shape inference could not resolve it")
        mask = self.masks.get(dim)
        return int(size - mask.sum()) if mask is not None else int(size)

    def kept(self, dim: DimKey) -> np.ndarray:
        mask = self.masks.get(dim)
        return ~mask if mask is not None else np.ones(self.dep.info(dim).size, dtype=bool)

    def set_input(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
        """Make input ``index`` of ``node`` a new constant ``value`` (unchanged values: no-op)."""
        old = node.input[index] if index < len(node.input) else ""
        current = self.dep.const(old) if old else None
        if current is not None and current.shape == value.shape and np.array_equal(current, value):
            return
        name = self.unique_name(f"{old or node.name or node.output[0]}_pruned")
        add_initializer(self.graph, np.asarray(value), name)
        if old:
            self.replaced.add(old)
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name

    def set_attr(self, node: onnx.NodeProto, name: str, value) -> None:
        for i, attr in enumerate(node.attribute):
            if attr.name == name:
                if helper.get_attribute_value(attr) == value:
                    return
                del node.attribute[i]
                break
        node.attribute.append(helper.make_attribute(name, value))

    def remove_attr(self, node: onnx.NodeProto, name: str) -> None:
        for i, attr in enumerate(node.attribute):
            if attr.name == name:
                del node.attribute[i]
                return


# numpy dtype -> ONNX element type, as ``helper.np_dtype_to_tensor_dtype`` maps it (asked once per dtype).
_DATA_TYPES: Dict[np.dtype, int] = {}


def add_initializer(graph: onnx.GraphProto, value: np.ndarray, name: str) -> None:
    """Append ``value`` to ``graph``'s initializers as ``name``, its bytes copied once.

    ``numpy_helper.from_array`` then ``append`` copies the bytes three times (upb's ``append`` is a
    slow deep copy): on a BERT-base that was a third of the whole pass.  Plain little-endian numbers
    are written field by field into the new entry; anything else goes through ``from_array``.
    """
    tensor = graph.initializer.add()
    if value.dtype.kind in "biuf" and value.dtype.byteorder in "=|<" and sys.byteorder == "little":
        tensor.name = name
        data_type = _DATA_TYPES.get(value.dtype)
        if data_type is None:
            data_type = _DATA_TYPES[value.dtype] = helper.np_dtype_to_tensor_dtype(value.dtype)
        tensor.data_type = data_type
        tensor.dims.extend(value.shape)
        tensor.raw_data = value.tobytes()  # C order whatever the array's layout
    else:
        tensor.CopyFrom(numpy_helper.from_array(value, name))


def _insert_nodes(graph: onnx.GraphProto, inserted: List[Tuple[str, onnx.NodeProto]]) -> None:
    """Place each new node just before the node writing the given output (after all fixups ran:
    fixups find their nodes by index)."""
    if not inserted:
        return
    before: Dict[str, List[onnx.NodeProto]] = {}
    for output, node in inserted:
        before.setdefault(output, []).append(node)
    nodes = []
    for node in graph.node:
        nodes.extend(before.get(node.output[0] if node.output else "", []))
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _drop_unused(graph: onnx.GraphProto, names: set) -> None:
    """Remove the initializers in ``names`` that no node or graph output reads any more."""
    from graphprune.dependency.graph import outer_names

    if not names:  # nothing was swapped out (no fixup replaced a constant): no walk over the graph
        return
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    read |= {name for n in graph.node if any(a.g.node or a.graphs for a in n.attribute) for name in outer_names(n)}
    dead = names - read
    # delete in place, last first: rebuilding the list would copy every (large) initializer again
    for index in reversed([i for i, init in enumerate(graph.initializer) if init.name in dead]):
        del graph.initializer[index]


def _param_masks(masks: Dict[DimKey, np.ndarray]) -> Dict[str, List[Tuple[int, np.ndarray]]]:
    """Constant name -> [(axis, removed mask)] for every constant with pruned indices."""
    by_tensor: Dict[str, List[Tuple[int, np.ndarray]]] = {}
    for (tensor, axis), mask in masks.items():
        if not tensor.startswith(VIRTUAL_PREFIX):  # ``DimKey.is_virtual``, without a call per dim
            by_tensor.setdefault(tensor, []).append((axis, mask))
    return by_tensor


def pruned_channels(model: onnx.ModelProto) -> Dict[str, Dict[str, List[int]]]:
    """The masked channels recorded in ``model`` (empty when none; malformed entries ignored with a warning)."""
    from graphprune.training.masks import clean_channel_record

    for prop in model.metadata_props:
        if prop.key == PRUNED_CHANNELS_KEY:
            try:
                record = json.loads(prop.value)
            except (ValueError, RecursionError):
                import warnings

                warnings.warn(f"model metadata {PRUNED_CHANNELS_KEY!r} is not valid JSON: ignored")
                return {}
            shapes = {init.name: list(init.dims) for init in model.graph.initializer}
            return clean_channel_record(record, shapes)
    return {}


def _merge_record(old: Dict[str, Dict[str, List[int]]], new: Dict[str, Dict[str, List[int]]]) -> Dict:
    merged = {k: dict(v) for k, v in old.items()}
    for tensor, axes in new.items():
        for axis, idx in axes.items():
            merged.setdefault(tensor, {})[axis] = sorted(set(merged.get(tensor, {}).get(axis, [])) | set(idx))
    return merged


def _remap_record(old: Dict, removed: Dict[str, List[Tuple[int, np.ndarray]]]) -> Dict:
    """After removal, recorded (masked) indices move down and removed ones disappear."""
    out = {}
    for tensor, axes in old.items():
        for axis, idx in axes.items():
            mask = next((m for a, m in removed.get(tensor, []) if a == int(axis)), None)
            idx = np.asarray(idx, dtype=np.int64)
            if mask is not None:
                new_pos = np.cumsum(~mask) - 1
                idx = new_pos[idx[~mask[idx]]]
            if len(idx):
                out.setdefault(tensor, {})[axis] = [int(i) for i in idx]
    return out


def _set_record(model: onnx.ModelProto, record: Union[Dict, str], key: str = PRUNED_CHANNELS_KEY) -> None:
    """Replace ``key``'s entry with ``record`` (a dict, or its JSON text); an empty one removes it."""
    for i, prop in enumerate(model.metadata_props):
        if prop.key == key:
            del model.metadata_props[i]
            break
    if record:
        text = record if isinstance(record, str) else json.dumps(record, sort_keys=True)
        model.metadata_props.add(key=key, value=text)


def _removal_json(removed: Dict[str, List[Tuple[int, np.ndarray]]]) -> str:
    """``json.dumps({name: {str(axis): indices}}, sort_keys=True)`` of the removal masks, character for
    character, written straight from the masks: the labels each mask picks (``compress`` and
    ``join``, in C) instead of a dict of index lists encoded afterwards, once per distinct mask
    (every member of a group, weights and activations, has the same one).  Names are quoted by
    json's own string encoder."""
    size = max((mask.size for axes in removed.values() for _, mask in axes), default=0)
    labels = [str(i) for i in range(size)]
    lists: Dict[tuple, str] = {}  # (dtype, bytes) -> its indices as json writes them
    entries = []
    for name in sorted(removed):
        axes = removed[name]
        if len(axes) > 1:  # keys in the order json sorts them: as strings
            axes = sorted(((str(axis), mask) for axis, mask in axes), key=lambda item: item[0])
        parts = []
        for axis, mask in axes:
            key = (mask.dtype.char, mask.tobytes())
            text = lists.get(key)
            if text is None:
                text = lists[key] = ", ".join(compress(labels, mask.tolist()))
            parts.append('"%s": [%s]' % (axis, text))
        entries.append(f"{encode_basestring_ascii(name)}: {{{', '.join(parts)}}}")
    return "{" + ", ".join(entries) + "}" if entries else ""


def removed_channels(model: onnx.ModelProto) -> Dict[str, Dict[int, np.ndarray]]:
    """Constant -> {axis: indices} that the last ``remove`` deleted from it (empty when none or unreadable)."""
    for prop in model.metadata_props:
        if prop.key == REMOVED_CHANNELS_KEY:
            try:
                record = json.loads(prop.value)
                return {str(t): {int(a): np.asarray(i, dtype=np.int64) for a, i in axes.items()}
                        for t, axes in record.items()}
            except (ValueError, TypeError, AttributeError, RecursionError):
                return {}
    return {}


def apply_selection(dep: DependencyGraph, masks: Dict[DimKey, np.ndarray], mode: str,
                    release: bool = False) -> Tuple[onnx.ModelProto, int]:
    """(new model with the ``masks`` channels removed or zeroed, number of weights zeroed by ``mask``).

    ``dep.model`` is not modified.  ``release``: the caller applies no other selection with ``dep``
    (the pass): each constant's kept value is dropped once its edited form is in the new model, so
    the input's weights and the result's are not all in memory at once (``DependencyGraph.forget``).
    """
    model = dep.model
    per_param = _param_masks(masks)
    new = model_shell(model, keep_value_info=mode != "remove")  # removal makes value_info stale
    const_nodes = {n.output[0]: i for i, n in enumerate(new.graph.node) if n.op_type == "Constant"}
    zeroed = [0]
    for init in model.graph.initializer:
        name = init.name
        axes = per_param.get(name)
        if axes is not None:
            add_initializer(new.graph, _edit(dep, name, axes, mode, zeroed), name)
            if release:
                dep.forget(name)
        else:
            new.graph.initializer.add().CopyFrom(init)  # upb: ``append`` copies ~3x slower than CopyFrom
    for name, node_index in const_nodes.items():
        if name in per_param:
            node = new.graph.node[node_index]
            value = _edit(dep, name, per_param[name], mode, zeroed)
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value, name)))
    record = pruned_channels(model)
    if mode == "remove":
        if dep.fixups:  # without any, no node changes (the editor indexes every name of the graph)
            editor = Editor(dep, masks, new.graph)
            for index, fixup in dep.fixups:
                fixup(editor, new.graph.node[index])
            _insert_nodes(new.graph, editor.inserted)
            _drop_unused(new.graph, editor.replaced)
        # Re-inferred only for the tensors the model itself annotated: value_info the input did not
        # have changes what ONNX Runtime fuses (with it, 1.32 fuses a BERT's Add + LayerNormalization
        # into its SkipLayerNormalization, slower on CPU: 2.02x -> 1.74x for a BERT-base at 50%), so
        # a pruned model would no longer run like its original.
        annotated = {vi.name for vi in model.graph.value_info}
        if annotated:  # none annotated (most exports): no inference at all
            new.graph.value_info.extend(vi for vi in infer_value_info(new) if vi.name in annotated)
        _set_record(new, _remap_record(record, per_param))
        _set_record(new, _removal_json(per_param), REMOVED_CHANNELS_KEY)
    else:
        _set_record(new, {}, REMOVED_CHANNELS_KEY)  # a record of an earlier removal no longer describes this step
        now = {
            name: {str(axis): np.flatnonzero(mask).tolist() for axis, mask in axes}
            for name, axes in per_param.items()
            if dep.roles.get(name) not in _NOT_ZEROED
        }
        _set_record(new, _merge_record(record, now))
    return new, zeroed[0]


def _edit(dep: DependencyGraph, name: str, axes: List[Tuple[int, np.ndarray]], mode: str, zeroed: List[int]) -> np.ndarray:
    """The constant with the masked indices deleted (remove) or set to 0 (mask, counted in zeroed)."""
    value = dep.const(name)
    if mode == "remove":
        for axis, mask in axes:
            value = value.compress(~mask, axis=axis)  # what np.compress calls, without its Python layer
        return value
    if dep.roles.get(name) in _NOT_ZEROED:
        return value
    value = value.copy()
    for axis, mask in axes:
        index = [slice(None)] * value.ndim
        index[axis] = np.flatnonzero(mask)
        zeroed[0] += int(np.count_nonzero(value[tuple(index)]))
        value[tuple(index)] = 0
    return value

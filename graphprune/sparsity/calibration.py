"""Calibration statistics of layer inputs -- per-column norms and Hessians -- from one streamed ORT run.

``collect_layer_inputs`` runs the model once over the calibration samples, batch by batch, with the
input of every requested layer added as an extra output, and folds each batch into running sums
(memory stays bounded by one batch of activations plus the statistics):

- ``"norms"``: the sum of ``x^2`` per input channel -- Wanda's ``||X_j||^2`` -- for Conv over every
  sample and position, for Gemm/MatMul over every row of the input;
- ``"hessian"``: ``X^T X`` over the weight's reduction columns (im2col patches for a Conv, in
  ``graphprune.sparsity.patches``' column order, one block per conv group) -- SparseGPT's and
  GPTQ-style reconstruction's Hessian (up to the factor 2/n, which damping relative to the mean
  diagonal makes irrelevant).

Layers whose inputs share one tensor and one form (Q/K/V projections of a transformer) share one
set of sums.  A Hessian larger than ``max_hessian_bytes`` (per layer) or past ``total_hessian_bytes``
(all layers) is not collected; the layer's ``reason`` says so and its norms are still there.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from graphprune import ir
from graphprune.data import InputSet
from graphprune.errors import UserError
from graphprune.progress import progress_bar
from graphprune.sparsity.patches import LayerForm, channel_rows, input_rows, layer_form
from graphprune.sparsity.targets import WeightTarget

__all__ = ["LayerInputs", "collect_layer_inputs", "MAX_HESSIAN_BYTES", "TOTAL_HESSIAN_BYTES", "STATISTICS"]

STATISTICS = ("norms", "hessian")
# float32 sums: a K x K Hessian of K = 8192 columns is 256 MiB.
MAX_HESSIAN_BYTES = 256 << 20
TOTAL_HESSIAN_BYTES = 4 << 30


@dataclasses.dataclass
class LayerInputs:
    """What calibration measured about one weight's inputs.

    Attributes:
        weight: the weight initializer's name.
        form: how its inputs become rows (``None`` when the layer is not understood: see ``reason``).
        rows: input rows summed (samples x positions).
        sq_norms: sum of ``x^2`` per input channel, ``[Cin]`` (``[K]`` for Gemm/MatMul), float64.
        hessian: ``[groups, K, K]`` float32 sum of ``x x^T`` over the reduction columns, or None.
        reason: why something asked for is missing (layer not understood, Hessian too big...).
    """

    weight: str
    form: Optional[LayerForm]
    rows: int = 0
    sq_norms: Optional[np.ndarray] = None
    hessian: Optional[np.ndarray] = None
    reason: Optional[str] = None

    def column_norms(self, columns: int) -> np.ndarray:
        """``||X_j||`` per reduction column (Conv: the channel's norm, repeated per kernel position)."""
        norms = np.sqrt(self.sq_norms)
        if self.form is not None and self.form.op_type == "Conv":
            g = self.form.groups
            per_group = norms.reshape(g, -1)  # [g, Cin/g]
            positions = columns // per_group.shape[1]
            return np.tile(per_group, (1, positions))  # columns (k..., cin): cin is minor
        return norms[None]


class _Accumulator:
    """Running sums for one (input tensor, form)."""

    def __init__(self, form: LayerForm, want_hessian: bool, columns: int, groups: int):
        self.form = form
        self.rows = 0
        self.sq_norms: Optional[np.ndarray] = None
        self.hessian = np.zeros((groups, columns, columns), dtype=np.float32) if want_hessian else None

    def add(self, x: np.ndarray) -> None:
        sq, rows = channel_rows(x, self.form)
        self.sq_norms = sq if self.sq_norms is None else self.sq_norms + sq
        self.rows += rows
        if self.hessian is not None:
            patches = input_rows(x, self.form)
            for g in range(patches.shape[0]):
                # X^T X in float32 BLAS, a batch at a time.
                self.hessian[g] += patches[g].T @ patches[g]


def _layer_nodes(model: onnx.ModelProto, targets: Sequence[WeightTarget]) -> Dict[str, List[onnx.NodeProto]]:
    """Weight name -> the nodes that use it as their weight (by the target's node labels)."""
    wanted = {label: t.name for t in targets for label in t.nodes}
    found: Dict[str, List[onnx.NodeProto]] = {t.name: [] for t in targets}
    for i, node in enumerate(model.graph.node):
        label = node.name or f"{node.op_type}_{i}"
        if label in wanted:
            found[wanted[label]].append(node)
    return found


def collect_layer_inputs(
    model: onnx.ModelProto,
    layers: Sequence[WeightTarget],
    data: InputSet,
    want: Iterable[str] = ("norms",),
    batch_size: int = 8,
    max_hessian_bytes: int = MAX_HESSIAN_BYTES,
    total_hessian_bytes: int = TOTAL_HESSIAN_BYTES,
    progress: bool = False,
    source_dir: Optional[str] = None,
) -> Dict[str, LayerInputs]:
    """Weight name -> ``LayerInputs`` for every layer of ``layers``, from one run over ``data``.

    Args:
        model: the model (its outputs are extended for the run and restored; nothing else changes).
        layers: the weights to calibrate (``graphprune.sparsity.targets.find_weights``' targets).
        data: calibration samples, fed ``batch_size`` at a time (or the model's fixed batch).
        want: statistics to collect, from ``STATISTICS`` ("norms" always comes along: it is cheap).
        batch_size: samples per run when the batch axis is dynamic.
        max_hessian_bytes: per layer, a larger Hessian is skipped (with the reason).
        total_hessian_bytes: all Hessians together; layers past it are skipped (with the reason).
        progress: a progress bar over the batches.
        source_dir: the folder of the model's file when its weights were left on disk
            (``load(..., load_external_data=False)``): the runtime reads them from there.
    """
    want = tuple(want)
    unknown = [w for w in want if w not in STATISTICS]
    if unknown:
        raise UserError(f"calibration: unknown statistic {unknown[0]!r} (choose from {', '.join(STATISTICS)})")
    if data is None or len(data) == 0:
        raise UserError("calibration needs samples (--data FILE.npz)")
    inits = ir.initializer_map(model.graph)
    nodes = _layer_nodes(model, layers)
    results: Dict[str, LayerInputs] = {}
    # (input tensor, form) -> accumulator; weight -> the keys it sums over.
    accumulators: Dict[Tuple[str, LayerForm], _Accumulator] = {}
    uses: Dict[str, List[Tuple[str, LayerForm]]] = {}
    budget = total_hessian_bytes
    for target in layers:
        info = LayerInputs(target.name, None)
        results[target.name] = info
        keys, reason = [], None
        for node in nodes[target.name]:
            form, reason = layer_form(node, target.shape)
            if form is None:
                break
            if node.input[0] in inits:
                reason = f"the input of {target.op_type} node {node.name!r} is a constant"
                break
            keys.append((node.input[0], form))
        if reason or not keys:
            info.reason = reason or "no node found for this weight"
            continue
        info.form = keys[0][1]
        columns, groups = _columns(target, info.form)
        hessian = "hessian" in want
        if hessian:
            size = groups * columns * columns * 4
            if size > max_hessian_bytes:
                info.reason = (f"Hessian of {groups} x {columns}^2 floats ({_size(size)}) is over the "
                               f"{_size(max_hessian_bytes)} per-layer cap")
                hessian = False
            elif size > budget:
                info.reason = f"Hessians of the earlier layers used the {_size(total_hessian_bytes)} budget"
                hessian = False
        for key in keys:
            acc = accumulators.get(key)
            if acc is None:
                acc = accumulators[key] = _Accumulator(key[1], hessian, columns, groups)
                if hessian:
                    budget -= acc.hessian.nbytes
            elif hessian and acc.hessian is None:
                info.reason = "its input is shared with a layer whose Hessian was skipped"
        uses[target.name] = keys
    _run(model, accumulators, data, batch_size, progress, source_dir)
    for name, keys in uses.items():
        info = results[name]
        accs = [accumulators[k] for k in keys]
        info.rows = sum(a.rows for a in accs)
        info.sq_norms = sum(a.sq_norms for a in accs)
        if "hessian" in want and all(a.hessian is not None for a in accs) and info.reason is None:
            info.hessian = accs[0].hessian if len(accs) == 1 else sum(a.hessian for a in accs)
    return results


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _columns(target: WeightTarget, form: LayerForm) -> Tuple[int, int]:
    """(K reduction columns per group, groups)."""
    if form.op_type == "Conv":
        return int(np.prod(target.shape[1:])), form.groups  # Cin/g x kernel positions
    return target.shape[target.reduction_axis], 1


def _run(model: onnx.ModelProto, accumulators, data: InputSet, batch_size: int, progress: bool,
         source_dir: Optional[str] = None) -> None:
    """One pass over ``data`` with the layer inputs as extra outputs, folding each batch in."""
    from graphprune.runtime import run

    tensors = sorted({tensor for tensor, _ in accumulators})
    feeds_by_name = set(data.arrays)
    fetched = [t for t in tensors if t not in feeds_by_name]
    graph_outputs = {o.name for o in model.graph.output}
    added = [t for t in fetched if t not in graph_outputs]
    # Extend the outputs in place and restore them: no copy of a large model's weights.
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in added)
    try:
        session = _session(model, source_dir)
    finally:
        del model.graph.output[len(model.graph.output) - len(added):]
    by_tensor: Dict[str, List[_Accumulator]] = {}
    for (tensor, _), acc in accumulators.items():
        by_tensor.setdefault(tensor, []).append(acc)
    step = data.fixed_batch or batch_size
    with progress_bar(total=-(-len(data) // step), desc="calibration", enabled=progress, unit="batch") as bar:
        for feed in data.batches(batch_size):
            values = run(session, feed, fetched) if fetched else {}
            for tensor in tensors:
                value = values[tensor] if tensor in values else feed[tensor]
                for acc in by_tensor[tensor]:
                    acc.add(value)
            del values
            bar.update(1)


def _session(model: onnx.ModelProto, source_dir: Optional[str]):
    """The calibration session; weights left on disk are read by the runtime from ``source_dir``
    (the proto without them is small: no temporary copy of a 2 GB model's data is written)."""
    from graphprune.weights_on_disk import session

    return session(model, source_dir, threads=None, prepacking=True)

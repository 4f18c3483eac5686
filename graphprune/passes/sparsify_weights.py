"""Sparsify weights: pruning of individual weights (magnitude, Wanda, SparseGPT), unstructured or N:M, with compact storage."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from graphprune import ir
from graphprune.data import InputSet
from graphprune.errors import UserError
from graphprune.model_io import default_opset
from graphprune.passes.base import Pass, PassResult, register_pass
from graphprune.progress import progress_bar
from graphprune.sparsity import masks as masks_mod
from graphprune.sparsity.calibrated import CALIBRATED, COMPARISON_GROUPS, CRITERIA, calibrate, calibrated_prune
from graphprune.sparsity.selection import LazyWeights
from graphprune.sparsity.report import overall_sparsity, sparsity_row
from graphprune.sparsity.storage import MIN_OPSET, compact_initializers
from graphprune.sparsity.targets import SkippedWeight, WeightTarget, find_weights, parse_op_types
from graphprune.weights_on_disk import read_tensor

__all__ = ["SparsifyWeightsPass", "sparsify_weights"]

_SCOPES = ("global", "layer")
# Global magnitude ranking: weights below this many items are read once and held (``_prune``).
_HOLD_BELOW = 2**16
_HOLD_BYTES = 2**28
_STORAGES = ("dense", "sparse")


@register_pass
class SparsifyWeightsPass(Pass):
    """Zero the least important weights of Conv/Gemm/MatMul (and ConvTranspose) layers.

    Criteria: ``magnitude`` (the smallest ``|w|``), ``wanda`` (the smallest ``|w| * ||x||``, input
    norms from calibration data) and ``sparsegpt`` (one-shot OBS: prunes by ``w^2 / [H^-1]_cc^2`` and
    updates the kept weights of the layer to reconstruct its output; see ``graphprune.sparsity``).
    The calibrated criteria handle Conv (any groups, strides, dilations, pads), Gemm and MatMul with
    1-D/2-D weights; other layers are skipped with the reason.

    Handles:
      - unstructured sparsity, ``scope="global"`` (one magnitude threshold over all selected weights,
        no layer pruned beyond ``max_layer_sparsity`` and none emptied) or ``"layer"`` (each layer
        at the requested sparsity, exact to one weight);
      - N:M sparsity (``pattern="2:4"``): in every group of M weights along the axis the op sums over
        (input channels of Conv, K of Gemm honouring transB, K of MatMul) at most N stay non-zero;
      - ``storage="sparse"``: the weights are stored as non-zeros plus 1-byte position steps and
        rebuilt by ops ONNX Runtime folds at load (see ``graphprune.sparsity.storage``); weights
        already quantized (initializer -> DequantizeLinear) are compacted too but never pruned;
      - the mask record in ``metadata_props["graphprune.weight_masks"]`` for fine-tuning.

    Skips, with the reason in ``stats["skipped"]``: layers whose reduction axis is not divisible by
    M, computed or fed weights, quantized weights (for pruning), and weights shared with other nodes.
    Refuses (``UserError``): sparsity outside [0, 1), N >= M, unknown op types, ``--exclude`` names
    that match nothing, and sparse storage on opsets below 11.

    Refuses too: ``wanda``/``sparsegpt`` without ``data``, an unknown criterion or comparison group.

    Sparsity 0 prunes nothing: with dense storage the pass is a no-op; with sparse storage it only
    compacts weights that already hold enough zeros (e.g. a sparsified model after quantization).

    Args:
        sparsity: fraction of weights to zero, in [0, 1); with an N:M pattern it may be omitted
            (it is 1 - N/M) but must agree if given.
        pattern: "unstructured" or "N:M".
        scope: "global" or "layer" (unstructured only); default global for magnitude, layer for
            wanda/sparsegpt (their papers' uniform per-layer sparsity).
        op_types: op types whose weights are sparsified, a list or "Conv,Gemm" (default Conv,Gemm,MatMul).
        exclude: node names or weight names to leave untouched.
        storage: "dense" (zeros in place) or "sparse" (compact, rebuilt in-graph).
        max_layer_sparsity: global scope's per-layer cap (default max(0.99, sparsity)).
        criterion: "magnitude", "wanda" or "sparsegpt".
        data: calibration samples (wanda, sparsegpt); handed over by recipes from ``run --data``.
        group: Wanda's comparison group: "row" (each output row loses the same fraction, the default)
            or "layer".
        batch_size: calibration samples per ONNX Runtime run (memory is one batch of layer inputs).
        progress: show a progress bar over the layers.
        source_dir: the folder of the model's file when it was loaded without its external data:
            weights are then read from disk one at a time and the runtime reads them for
            calibration, so that no full copy of an LLM's weights is ever held (only the pruned ones).
    """

    name = "sparsify"

    def __init__(
        self,
        sparsity: Optional[float] = None,
        pattern: "str | int" = "unstructured",
        scope: Optional[str] = None,
        op_types: "str | Sequence[str] | None" = None,
        exclude: "str | Sequence[str] | None" = None,
        storage: str = "dense",
        max_layer_sparsity: Optional[float] = None,
        criterion: str = "magnitude",
        data: Optional[InputSet] = None,
        group: str = "row",
        batch_size: int = 8,
        progress: bool = False,
        source_dir: Optional[str] = None,
    ):
        if criterion not in CRITERIA:
            raise UserError(f"criterion {criterion!r} is not one of {', '.join(CRITERIA)}")
        if criterion in CALIBRATED and data is None:
            raise UserError(f"criterion {criterion!r} needs calibration data (--data FILE.npz)")
        if group not in COMPARISON_GROUPS:
            raise UserError(f"group {group!r} is not one of {', '.join(COMPARISON_GROUPS)}")
        if int(batch_size) < 1:
            raise UserError(f"batch_size {batch_size} must be at least 1")
        self.criterion, self.data, self.group, self.batch_size = criterion, data, group, int(batch_size)
        if scope is None:
            scope = "layer" if criterion in CALIBRATED else "global"
        if isinstance(pattern, int) and not isinstance(pattern, bool):
            # YAML 1.1 (recipes, --pass values) reads an unquoted 2:4 as the base-60 number 124.
            pattern = "{}:{}".format(*divmod(pattern, 60))
        self.pattern = masks_mod.parse_pattern(pattern)
        self.sparsity = _check_sparsity(sparsity, self.pattern)
        if scope not in _SCOPES:
            raise UserError(f"scope {scope!r} is not one of {', '.join(_SCOPES)}")
        if storage not in _STORAGES:
            raise UserError(f"storage {storage!r} is not one of {', '.join(_STORAGES)}")
        self.scope = scope
        self.storage = storage
        self.op_types = parse_op_types(op_types)
        self.exclude = tuple(_split_names(exclude))
        if max_layer_sparsity is None:
            max_layer_sparsity = max(0.99, self.sparsity)
        if not self.sparsity <= float(max_layer_sparsity) < 1:
            raise UserError(
                f"max_layer_sparsity {max_layer_sparsity} must be in [sparsity={self.sparsity}, 1)"
            )
        self.max_layer_sparsity = float(max_layer_sparsity)
        self.progress = bool(progress)
        self.source_dir = source_dir

    def requires(self, model: onnx.ModelProto) -> None:
        if self.storage == "sparse":
            opset = default_opset(model) or 0
            if opset < MIN_OPSET:
                raise UserError(
                    f"--storage sparse needs ai.onnx opset >= {MIN_OPSET} (the model imports opset {opset}; "
                    "convert it with onnx.version_converter first)"
                )

    def call(self, model: onnx.ModelProto) -> PassResult:
        targets, skipped = find_weights(model, self.op_types, self.exclude, through_dequantize=self.storage == "sparse",
                                        on_disk=self.source_dir is not None)
        source = ir.initializer_map(model.graph)
        prunable: List[WeightTarget] = []
        for target in targets:
            quantized = not np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(source[target.name].data_type), np.floating)
            if quantized and self.sparsity > 0:
                skipped.extend(SkippedWeight(n, target.op_type, "weight is already quantized: compacted, not pruned")
                               for n in target.nodes)
            elif not quantized:
                prunable.append(target)
        if self.pattern is not None:
            prunable = self._drop_unfitting(prunable, skipped)
        calibrated = self.criterion in CALIBRATED and self.sparsity > 0 and bool(prunable)
        if calibrated:
            # Before the copy below: ONNX Runtime's session holds the weights once more while it runs.
            inputs, calibration = calibrate(model, prunable, self.criterion, self.data, self.batch_size, self.progress,
                                            source_dir=self.source_dir)
        work = ir.clone(model)  # weights left on disk (source_dir) are not copied
        inits = ir.initializer_map(work.graph)
        label = masks_mod.pattern_label(self.pattern)
        rows: Dict[str, dict] = {}
        changed: List[str] = []

        # Compact storage: pruned weights wait as arrays, each freed once compacted (a dense copy
        # written into the model would stay in its protobuf arena after the compact form replaced it).
        pending: Dict[str, np.ndarray] = {}

        def store(target: WeightTarget, value: np.ndarray) -> None:
            rows[target.name] = sparsity_row(target.name, target.op_type, label, value)
            if self.storage == "sparse":
                pending[target.name] = value
            else:
                _set_value(inits[target.name], value)
            changed.append(target.name)

        if calibrated:
            # One layer at a time: a copy of one weight alive, not of all of them (LLM-sized models).
            refused = calibrated_prune(
                prunable, lambda name: self._read(inits[name]), store, inputs, calibration,
                self.criterion, self.sparsity, self.pattern, self.scope, self.group, self.max_layer_sparsity,
                self.progress)
            for target, reason in refused:  # left dense: not in the mask record either
                skipped.extend(SkippedWeight(n, target.op_type, reason) for n in target.nodes)
            prunable = [t for t in prunable if t.name in rows]
        else:
            calibration = {}

            def keep(target: WeightTarget, value: np.ndarray) -> None:
                rows[target.name] = sparsity_row(target.name, target.op_type, label, value)

            dtypes = [onnx.helper.tensor_dtype_to_np_dtype(inits[t.name].data_type) for t in prunable]
            self._prune(prunable, dtypes, lambda name: self._read(inits[name]), store, keep)
        if self.sparsity > 0 and prunable:
            masks_mod.write_mask_record(
                work, {t.name: {"pattern": label, "sparsity": round(self.sparsity, 6)} for t in prunable}
            )
        compacted, kept_dense = [], {}
        if self.storage == "sparse":
            stored = set(pending)
            compacted, kept_dense = compact_initializers(
                work, [t.name for t in targets],
                read=lambda tensor: pending.pop(tensor.name) if tensor.name in pending else self._read(tensor),
                write_dense=lambda tensor, value: _set_value(tensor, value) if tensor.name in stored else None)
        rows = [rows[t.name] for t in prunable]
        stats = {
            "criterion": self.criterion,
            "pattern": label,
            "scope": self.scope if self.pattern is None else "group",
            "requested_sparsity": self.sparsity,
            "overall_sparsity": overall_sparsity(rows),
            "layers": rows,
            "skipped": [vars(s) for s in skipped],
            "storage": self.storage,
            "compacted": compacted,
            "kept_dense": kept_dense,
        }
        if calibration:
            stats["calibration"] = calibration
        modified = bool(changed or compacted)
        return PassResult(work if modified else model, modified, stats)

    def _read(self, tensor: onnx.TensorProto) -> np.ndarray:
        """A weight's value, from memory or (one tensor's bytes) from its external data file; the
        array is the caller's own (writable).  Within ``weights_on_disk.files_kept_open`` (the
        command line) the data file stays open across the reads (two or three a weight)."""
        if tensor.data_location == onnx.TensorProto.EXTERNAL and self.source_dir is None:
            raise ValueError(f"weight {tensor.name!r} has its data on disk; the pass needs source_dir")
        value = read_tensor(tensor, self.source_dir)
        return value if value.flags.writeable else value.copy()  # raw_data arrays view read-only bytes

    def _drop_unfitting(self, targets: List[WeightTarget], skipped: List[SkippedWeight]) -> List[WeightTarget]:
        """Layers the N:M groups do not fit are reported and left dense."""
        fitting = []
        for target in targets:
            reason = masks_mod.n_m_fit_reason(target.shape, target.reduction_axis, self.pattern[1])
            if reason:
                skipped.extend(SkippedWeight(n, target.op_type, f"{masks_mod.pattern_label(self.pattern)} does not fit: {reason}")
                               for n in target.nodes)
            else:
                fitting.append(target)
        return fitting

    def _prune(self, targets: List[WeightTarget], dtypes: List[np.dtype], load, store, keep) -> None:
        """Zero each target's pruned entries: ``store(target, value)`` when it changed, else ``keep(target, value)``.

        One layer's copy at a time: the global threshold reads each large weight a few times
        (``sparsity.selection``) rather than holding them all.  Small weights (below ``_HOLD_BELOW``
        items, up to ``_HOLD_BYTES`` in all) are read once and held until pruned: reading one costs
        more in calls than in bytes (a 20,000-node graph's 10,000 weights, read three times each),
        and the result holds each once pruned, as it is freed here.
        """
        held: Dict[str, np.ndarray] = {}
        if self.pattern is None and self.sparsity > 0 and targets:
            if self.scope == "global":
                budget = [_HOLD_BYTES]

                def read(i: int) -> np.ndarray:
                    name = targets[i].name
                    value = held.get(name)
                    if value is None:
                        value = load(name)
                        if value.size < _HOLD_BELOW and value.nbytes <= budget[0]:
                            budget[0] -= value.nbytes
                            value.flags.writeable = False  # handed out again: the ranking never overwrites it
                            held[name] = value
                    return value

                lazy = LazyWeights([math.prod(t.shape) for t in targets], [np.dtype(d) for d in dtypes], read, owned=True)
                counts = masks_mod.global_prune_counts(lazy, self.sparsity, self.max_layer_sparsity)
            else:
                counts = [int(round(self.sparsity * math.prod(t.shape))) for t in targets]
        with progress_bar(total=len(targets), desc="sparsify", enabled=self.progress, unit="layer") as bar:
            for i, target in enumerate(targets):
                w = held.pop(target.name, None)
                if w is None:
                    w = load(target.name)
                else:
                    w = _writable(w)
                if self.sparsity == 0:
                    keep(target, w)
                    continue
                if self.pattern is None:
                    mask = masks_mod.unstructured_mask(w, counts[i])
                else:
                    mask = masks_mod.n_m_mask(w, self.pattern[0], self.pattern[1], target.reduction_axis)
                # In place (w is this pass's own copy): a layer-sized array fewer alive while it is stored;
                # copyto, not w[~mask] = 0 (boolean indexing is several times slower).
                nonzero = np.count_nonzero(w)
                np.copyto(w, 0, where=~mask)
                del mask
                (store if np.count_nonzero(w) != nonzero else keep)(target, w)
                del w
                bar.update(1)

    def __repr__(self) -> str:
        return (f"SparsifyWeightsPass(criterion={self.criterion!r}, sparsity={self.sparsity}, pattern={masks_mod.pattern_label(self.pattern)!r}, "
                f"scope={self.scope!r}, storage={self.storage!r})")


def sparsify_weights(
    model: onnx.ModelProto,
    sparsity: Optional[float] = None,
    pattern: str = "unstructured",
    scope: Optional[str] = None,
    op_types: "str | Sequence[str] | None" = None,
    exclude: "str | Sequence[str] | None" = None,
    storage: str = "dense",
    max_layer_sparsity: Optional[float] = None,
    criterion: str = "magnitude",
    data: Optional[InputSet] = None,
    **kwargs,
) -> onnx.ModelProto:
    """Functional form of ``SparsifyWeightsPass``: the sparsified model."""
    return SparsifyWeightsPass(
        sparsity=sparsity, pattern=pattern, scope=scope, op_types=op_types, exclude=exclude,
        storage=storage, max_layer_sparsity=max_layer_sparsity, criterion=criterion, data=data, **kwargs,
    )(model).model


def _writable(value: np.ndarray) -> np.ndarray:
    """A held weight made writable again (it is the pass's own array), or a copy when numpy refuses."""
    try:
        value.flags.writeable = True
        return value
    except ValueError:
        return value.copy()


def _set_value(tensor: onnx.TensorProto, value: np.ndarray) -> None:
    """Store ``value`` (the tensor's own shape and type) as the tensor's raw data, in place.

    ``CopyFrom(numpy_helper.from_array(...))`` copies the bytes three times (``tobytes``, the new
    proto, the copy into the model); here twice, and the record of weights read from disk is dropped.
    """
    if tuple(tensor.dims) != value.shape or onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type) != value.dtype:
        tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))  # another shape or type: a new record
        return
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "external_data"):
        tensor.ClearField(field)
    tensor.ClearField("data_location")
    tensor.raw_data = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()  # ONNX raw data is little-endian


def _check_sparsity(sparsity, pattern: masks_mod.Pattern) -> float:
    if pattern is not None:
        implied = 1 - pattern[0] / pattern[1]
        if sparsity is not None and abs(float(sparsity) - implied) > 1e-9:
            raise UserError(
                f"pattern {pattern[0]}:{pattern[1]} fixes sparsity at {implied:g}; omit sparsity or give {implied:g}"
            )
        return implied
    if sparsity is None:
        raise UserError("sparsity is required for the unstructured pattern (a fraction in [0, 1))")
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise UserError(f"sparsity {sparsity!r} is not a number") from None
    if not 0 <= value < 1:
        raise UserError(f"sparsity {value} is outside [0, 1)")
    return value


def _split_names(names) -> List[str]:
    if names is None:
        return []
    items = names.split(",") if isinstance(names, str) else [str(n) for n in names]
    return [item.strip() for item in items if item.strip()]


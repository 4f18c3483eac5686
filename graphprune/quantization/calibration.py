"""Activation ranges from sample data, computed by ONNX Runtime's calibrators (MinMax, Percentile, Entropy)."""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import onnx

from graphprune.data import InputSet, input_specs, random_inputs
from graphprune.errors import UserError
from graphprune.quantization.config import QuantConfig
from graphprune.weights_on_disk import has_weights_on_disk, session
from graphprune.quantization.prepare import save_for_tool

__all__ = [
    "Feeds",
    "as_feeds",
    "calibration_feeds",
    "calibrate",
    "calibrated_op_types",
    "minmax_ranges",
    "nonfinite_ranges",
    "without",
]

# Samples for calibration: an InputSet, or any iterable of {input name: batch} feeds.
Feeds = Union[InputSet, Iterable[Mapping[str, np.ndarray]]]

# How many seeded random samples stand in for missing calibration data.
_RANDOM_SAMPLES = 8


def calibrated_op_types() -> List[str]:
    """Op types whose inputs and outputs get ranges: every op ORT's quantizer knows, as quantize_static does."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QDQRegistry) | set(QLinearOpsRegistry))


def as_feeds(data: Feeds, limit: Optional[int] = None) -> List[Dict[str, np.ndarray]]:
    """The feeds of ``data`` as a list of dicts, at most ``limit`` samples (InputSet) or feeds (iterable)."""
    if isinstance(data, InputSet):
        if limit is not None and len(data) > limit:
            step = data.fixed_batch or 1
            data = data.subset(range(max(step, limit - limit % step)))
        return list(data.batches(8))
    feeds = []
    for i, feed in enumerate(data):
        if not isinstance(feed, Mapping):
            raise UserError(f"calibration data item {i} is a {type(feed).__name__}, not a dict of input arrays")
        if limit is not None and i >= limit:
            break
        feeds.append({name: np.asarray(value) for name, value in feed.items()})
    if not feeds:
        raise UserError("calibration data is empty")
    return feeds


def calibration_feeds(
    model: onnx.ModelProto,
    data: Optional[Feeds],
    input_shapes: Optional[Mapping[str, Tuple[int, ...]]],
    config: QuantConfig,
    seed: int = 0,
) -> Tuple[List[Dict[str, np.ndarray]], bool]:
    """(feeds, whether they came from the user); without data, seeded random inputs and a warning."""
    if data is None:
        samples = random_inputs(model, input_shapes, samples=_RANDOM_SAMPLES, seed=seed)
        warnings.warn(
            "quantizing without calibration data: ranges come from random inputs, accuracy will suffer "
            "(give --data FILE.npz)",
            stacklevel=3,
        )
        return as_feeds(samples, config.calibration_samples), False
    feeds = as_feeds(data, config.calibration_samples)
    _check_feed_names(model, feeds[0])
    return feeds, True


def _check_feed_names(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> None:
    for name, _, declared in input_specs(model):
        if name not in feed:
            raise UserError(f"calibration data has no array for model input {name!r} (has: {', '.join(sorted(feed))})")
        if declared is not None and np.ndim(feed[name]) != len(declared):
            raise UserError(
                f"calibration data for input {name!r} has rank {np.ndim(feed[name])}, the model expects {len(declared)}"
            )


class _Reader:
    """ORT's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: List[Dict[str, np.ndarray]]):
        self._feeds = feeds
        self._next = 0

    def get_next(self):
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return self._feeds[self._next - 1]

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:  # pragma: no cover - strided calibration
        self._feeds = self._feeds[start_index:end_index]
        self._next = 0


def calibrate(model: onnx.ModelProto, feeds: List[Dict[str, np.ndarray]], config: QuantConfig,
              source_dir: Optional[str] = None, outputs: Optional[List[Dict[str, np.ndarray]]] = None):
    """Ranges of every tensor around quantizable ops, as ORT's ``TensorsData``.

    The model is written to a temporary folder (ORT's calibrators take a path and add outputs to
    a copy); the calibrator named by ``config.method`` then runs every feed.  A model whose
    weights were left on disk (``source_dir``) is calibrated by ``minmax_ranges`` instead with
    the "minmax" method (no copy of the weights, nothing kept per feed but two numbers a tensor);
    with the other methods its weights are copied into the temporary folder for ORT.  On that
    streamed path, ``outputs`` (a list) receives the model's outputs for each feed, which the same
    runs computed (the float reference: no second session over the weights).
    """
    from onnxruntime.quantization.calibrate import create_calibrator

    if source_dir is not None and config.method == "minmax" and has_weights_on_disk(model):
        return minmax_ranges(model, feeds, source_dir, outputs)
    with tempfile.TemporaryDirectory(prefix="graphprune-calib-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        save_for_tool(model, path, source_dir=source_dir)
        try:
            calibrator = create_calibrator(
                path,
                calibrated_op_types(),
                augmented_model_path=os.path.join(tmp, "augmented.onnx"),
                calibrate_method=config.ort_method(),
                use_external_data_format=True,
            )
            watch = None
            if isinstance(getattr(calibrator, "tensors_to_calibrate", None), set):
                # histogram calibrators (np.histogram) fail on inf/NaN: those tensors leave calibration
                watch = calibrator.infer_session = _NonFiniteWatch(calibrator.infer_session, calibrator.tensors_to_calibrate)
            calibrator.collect_data(_Reader(feeds))
        except Exception as exc:  # ORT reports bad feeds (names, shapes, dtypes) as assorted errors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "INVALID_ARGUMENT" in first or "Invalid" in first or "invalid" in first:
                raise UserError(f"calibration data does not fit the model: {first}") from None
            raise
        ranges = calibrator.compute_data()
        del calibrator
    if watch is not None:
        from onnxruntime.quantization.calibrate import TensorData

        for name, (low, high) in watch.found.items():  # recorded so that placement keeps them float
            ranges.data[name] = TensorData(lowest=np.array(low, np.float32), highest=np.array(high, np.float32))
    return ranges


def tensors_to_calibrate(model: onnx.ModelProto) -> List[str]:
    """The float activations read or written by an op ORT's quantizer knows: the tensors ORT's
    calibrators select (``CalibraterBase.select_tensors_to_calibrate``), in graph order."""
    typed = {vi.name: vi for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)}
    weights = {init.name for init in model.graph.initializer}
    op_types = set(calibrated_op_types())
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    found: Dict[str, None] = {}
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        for name in list(node.input) + list(node.output):
            vi = typed.get(name)
            if (vi is not None and vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type in floats
                    and name not in weights):
                found[name] = None
    return list(found)


def minmax_ranges(model: onnx.ModelProto, feeds: List[Dict[str, np.ndarray]], source_dir: Optional[str] = None,
                  outputs: Optional[List[Dict[str, np.ndarray]]] = None):
    """ORT's MinMax calibration (same tensors, same unoptimized session, same reductions), streamed.

    ORT's ``MinMaxCalibrater`` writes an augmented copy of the model, weights included, and keeps
    every feed's reductions until the end.  Here the wanted tensors are exposed as outputs of the
    model itself (restored afterwards: no copy), the runtime maps the weights from ``source_dir``,
    and each feed only narrows a running (min, max) per tensor.  As ORT's: NaN in one feed's
    tensor is ignored when another feed gives a number (``nanmin``/``nanmax`` over feeds).
    Weight pre-packing is off (a packed copy of every weight); MLAS's packed and plain float GEMMs
    round differently, so a range can differ from ORT's in its last bits (not on Conv models).
    With ``outputs`` (a list), the model's outputs of each feed are appended to it.
    """
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

    wanted = tensors_to_calibrate(model)
    model_outputs = [o.name for o in model.graph.output]
    listed = set(model_outputs)
    count = len(model.graph.output)
    try:
        model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in wanted if name not in listed)
        calib = session(model, source_dir, threads=None, optimization="disabled")
    finally:
        del model.graph.output[count:]
    low: Dict[str, np.ndarray] = {}
    high: Dict[str, np.ndarray] = {}
    for feed in feeds:
        try:
            values = calib.run(wanted + model_outputs, feed)
        except Exception as exc:  # ORT reports bad feeds (names, shapes, dtypes) as assorted errors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"calibration data does not fit the model: {first}") from None
        for name, lo, hi in _tensor_extremes(wanted, values[: len(wanted)]):
            # fmin/fmax: nanmin/nanmax over the two feeds (a NaN yields to a number), one call
            low[name] = lo if name not in low else np.fmin(low[name], lo)
            high[name] = hi if name not in high else np.fmax(high[name], hi)
        if outputs is not None:
            outputs.append(dict(zip(model_outputs, values[len(wanted):])))
        del values
    del calib
    return TensorsData(CalibrationMethod.MinMax, {name: (low[name], high[name]) for name in wanted if name in low})


# Tensors of one dtype are reduced together (``reduceat`` over their concatenation) up to this
# many bytes at a time: one numpy call for thousands of small activations, a bounded copy for large ones.
_REDUCE_CHUNK = 4 * 2**20


def _tensor_extremes(names: List[str], values) -> Iterable[Tuple[str, np.ndarray, np.ndarray]]:
    """(name, min, max) of each non-empty tensor, each shaped [1] in its dtype, as ORT's augmented
    graph's ReduceMin/ReduceMax give them (NaN propagates as in ``ndarray.min``)."""
    pending: Dict[np.dtype, List[Tuple[str, np.ndarray]]] = {}
    sizes: Dict[np.dtype, int] = {}
    for name, value in zip(names, values):
        value = np.asarray(value)
        if value.size == 0:
            continue
        if value.nbytes >= _REDUCE_CHUNK:
            yield name, value.min().reshape(1), value.max().reshape(1)
            continue
        group = pending.setdefault(value.dtype, [])
        group.append((name, value))
        sizes[value.dtype] = sizes.get(value.dtype, 0) + value.nbytes
        if sizes[value.dtype] >= _REDUCE_CHUNK:
            yield from _reduce_group(pending.pop(value.dtype))
            sizes[value.dtype] = 0
    for group in pending.values():
        yield from _reduce_group(group)


def _reduce_group(group: List[Tuple[str, np.ndarray]]) -> Iterable[Tuple[str, np.ndarray, np.ndarray]]:
    flat = np.concatenate([value.reshape(-1) for _, value in group])
    starts = np.cumsum([0] + [value.size for _, value in group[:-1]])
    lows, highs = np.minimum.reduceat(flat, starts), np.maximum.reduceat(flat, starts)
    for (name, _), lo, hi in zip(group, lows.reshape(-1, 1), highs.reshape(-1, 1)):
        yield name, lo, hi


class _NonFiniteWatch:
    """A calibration session that records the tensors holding inf/NaN and drops them from ``tensors``."""

    def __init__(self, session, tensors: set):
        self._session = session
        self._tensors = tensors
        self.found: Dict[str, Tuple[float, float]] = {}

    def __getattr__(self, name):
        return getattr(self._session, name)

    def run(self, output_names, feed, *args, **kwargs):
        outputs = self._session.run(output_names, feed, *args, **kwargs)
        names = output_names or [o.name for o in self._session.get_outputs()]
        for name, value in zip(names, outputs):
            value = np.asarray(value)
            if name in self._tensors and value.dtype.kind == "f" and not np.isfinite(value).all():
                self._tensors.discard(name)
                self.found[name] = (float(np.min(value)), float(np.max(value)))
        return outputs


def nonfinite_ranges(ranges) -> Dict[str, Tuple[float, float]]:
    """Tensor name -> (low, high) for every calibrated range that is infinite or NaN.

    int8 cannot hold such a tensor: its scale would be inf or NaN, every value would dequantize to
    NaN (T5's relative-position buckets hold ``Log(0) = -inf`` by design, and the NaN then casts
    to INT64_MIN and indexes out of a Gather).  Placement keeps the nodes touching them float.
    """
    found: Dict[str, Tuple[float, float]] = {}
    for name in ranges:
        try:
            low, high = ranges[name].range_value
        except AttributeError:  # a calibrator that kept no range for this tensor
            continue
        low, high = float(np.min(low)), float(np.max(high))
        if not (np.isfinite(low) and np.isfinite(high)):
            found[name] = (low, high)
    return found


def without(ranges, names):
    """``ranges`` (ORT's ``TensorsData``) less the tensors in ``names``: the quantizer computes a scale
    for every range it is given, and an infinite one only yields NaN and numpy warnings."""
    from onnxruntime.quantization.calibrate import TensorsData

    names = set(names)
    if not names:
        return ranges
    return TensorsData(ranges.calibration_method, {k: ranges[k] for k in ranges if k not in names})

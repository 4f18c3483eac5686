"""Statistics of the inputs of weight-bearing nodes on calibration data, for data-aware weight-only quantization."""

from __future__ import annotations

import os
from typing import Dict, Iterable, Optional

import numpy as np
import onnx

from graphprune.errors import UserError

__all__ = ["InputStats", "collect_input_stats"]

# Rows of each input kept to score AWQ's scales (tokens or samples, spread over the data).
SAMPLE_ROWS = 512
# Samples run through the model per batch (activations of every layer are held for one batch).
_BATCH = 8


class InputStats:
    """What one activation tensor (the X of X @ W) looked like on the data: mean |x| per channel,
    up to ``SAMPLE_ROWS`` rows of X, and with ``hessian`` the sum of X^T X over all rows."""

    def __init__(self, channels: int, hessian: bool):
        self.rows = 0
        self.abs_sum = np.zeros(channels, np.float64)
        self.xtx = np.zeros((channels, channels), np.float32) if hessian else None
        self._samples = []
        self._kept = 0

    def add(self, x: np.ndarray) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False)
        self.rows += x.shape[0]
        self.abs_sum += np.abs(x).sum(axis=0)
        if self.xtx is not None:
            self.xtx += x.T @ x
        if self._kept < SAMPLE_ROWS:
            step = max(1, x.shape[0] // 64)  # spread over positions, not the first tokens only
            take = x[::step][: SAMPLE_ROWS - self._kept]
            self._samples.append(take.copy())
            self._kept += take.shape[0]

    @property
    def absmean(self) -> np.ndarray:
        return (self.abs_sum / max(self.rows, 1)).astype(np.float32)

    @property
    def sample(self) -> np.ndarray:
        return np.concatenate(self._samples) if self._samples else np.zeros((0, self.abs_sum.size), np.float32)


def collect_input_stats(
    model: onnx.ModelProto,
    tensors: Dict[str, int],
    data,
    hessian: bool,
    source_dir: Optional[str] = None,
) -> Dict[str, InputStats]:
    """Run ``model`` once over ``data`` with ``tensors`` (name -> channel count) as extra outputs.

    One ORT session and one pass over the data for all layers, in batches of ``_BATCH`` samples,
    so memory holds one batch's activations plus the statistics (and the runtime's copy of the
    weights; with ``hessian``, one K x K float32 matrix per distinct input).  ``source_dir`` is where weights
    left on disk are read from (the model's folder).
    """
    from graphprune.model_io import for_ort
    from graphprune.runtime import ort

    # The extra outputs are added to the model itself for the serialization and removed right after
    # (no copy of the proto: for a model with inline weights that would be a second copy of them).
    outputs = model.graph.output
    count = len(outputs)
    known = {o.name for o in outputs}
    try:
        for name in tensors:
            if name not in known:
                outputs.add().name = name  # untyped: the runtime infers it
        serialized = for_ort(model).SerializeToString()
    finally:
        while len(outputs) > count:
            del outputs[-1]
    rt = ort()
    options = rt.SessionOptions()
    options.log_severity_level = 4
    if source_dir is not None:  # weights left on disk are read by the runtime from the model's folder
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", os.fspath(source_dir))
    try:
        session = rt.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - the runtime's refusal
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"onnxruntime cannot run the model to collect calibration statistics: {first}") from None
    del serialized
    names = list(tensors)
    stats = {name: InputStats(channels, hessian) for name, channels in tensors.items()}
    for feed in _batches(data):
        try:
            values = session.run(names, feed)
        except Exception as exc:  # noqa: BLE001 - data the model cannot run on is the user's
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"--data: the model cannot run on the calibration samples: {first}") from None
        for name, value in zip(names, values):
            if value.shape[-1] != tensors[name]:
                continue  # not the layout a weight reads (never for MatMul/Gemm inputs)
            stats[name].add(value)
    return stats


def _batches(data) -> Iterable[Dict[str, np.ndarray]]:
    if hasattr(data, "batches"):
        return data.batches(_BATCH)
    return iter(data)

"""Fine-tuning's inputs checked and read: the training samples against the model, labels files, the teacher."""

from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np
import onnx

from graphprune.data import InputSet, input_specs
from graphprune.errors import UserError

__all__ = ["ModelLike", "read_teacher", "read_labels", "check_data"]

ModelLike = Union[onnx.ModelProto, str, "os.PathLike[str]"]


def read_teacher(teacher: Optional[ModelLike]) -> Optional[onnx.ModelProto]:
    if teacher is None or isinstance(teacher, onnx.ModelProto):
        return teacher
    from graphprune.model_io import load

    return load(teacher)


def read_labels(spec: "str | os.PathLike[str]") -> np.ndarray:
    """``FILE.npz`` or ``FILE.npz:KEY`` (default key ``labels``) -> the array."""
    path, _, key = os.fspath(spec).rpartition(":") if ":" in os.fspath(spec) else (os.fspath(spec), "", "labels")
    key = key or "labels"
    if not os.path.exists(path):
        raise UserError(f"labels {spec}: no such file {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if key not in npz.files:
                raise UserError(f"labels {spec}: {path} has no array {key!r} (arrays: {', '.join(npz.files)})")
            return npz[key]
    except (OSError, ValueError) as exc:
        raise UserError(f"labels {spec}: not a readable .npz file ({exc})") from None


def check_data(model: onnx.ModelProto, data: InputSet, what: str) -> None:
    """The samples feed every model input with a compatible dtype, rank and fixed dims."""
    for name, dtype, declared in input_specs(model):
        if name not in data.arrays:
            raise UserError(f"{what}: no samples for model input {name!r} (arrays: {', '.join(sorted(data.arrays))})")
        value = data.arrays[name]
        if value.dtype != dtype:
            raise UserError(f"{what}: input {name!r} has dtype {value.dtype}, the model expects {dtype}")
        if declared is not None:
            if value.ndim != len(declared):
                raise UserError(f"{what}: input {name!r} has shape {list(value.shape)}, the model expects rank "
                                f"{len(declared)} {list(declared)}")
            for axis, want in enumerate(declared):
                if axis and isinstance(want, int) and want > 0 and value.shape[axis] != want:
                    raise UserError(f"{what}: input {name!r} has shape {list(value.shape)}, the model expects "
                                    f"{list(declared)}")

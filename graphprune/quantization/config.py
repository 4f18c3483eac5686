"""The user's quantization settings (``QuantConfig``), checked once, and their ONNX Runtime equivalents."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

from graphprune.errors import UserError

__all__ = ["QuantConfig", "METHODS", "ACTIVATION_TYPES", "check_max_error", "check_names"]

METHODS = ("minmax", "percentile", "entropy")
ACTIVATION_TYPES = ("uint8", "int8")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How tensors are quantized.

    Args:
        method: calibration of activation ranges: "minmax", "percentile" or "entropy".
        per_channel: one weight scale per output channel (default) instead of one per tensor.
        activation_type: "uint8" (asymmetric, the x86 fast path) or "int8".
        calibration_samples: at most this many samples are used for calibration.
    """

    method: str = "minmax"
    per_channel: bool = True
    activation_type: str = "uint8"
    calibration_samples: int = 64

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"unknown calibration method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.activation_type not in ACTIVATION_TYPES:
            raise UserError(
                f"unknown activation type {self.activation_type!r} (choose from {', '.join(ACTIVATION_TYPES)})"
            )
        if int(self.calibration_samples) < 1:
            raise UserError(f"calibration_samples must be at least 1, got {self.calibration_samples}")

    def ort_method(self):
        from onnxruntime.quantization import CalibrationMethod

        return {
            "minmax": CalibrationMethod.MinMax,
            "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy,
        }[self.method]

    def ort_types(self) -> Tuple[object, object]:
        """(weight type, activation type) as ``onnxruntime.quantization.QuantType``."""
        from onnxruntime.quantization import QuantType

        activation = QuantType.QUInt8 if self.activation_type == "uint8" else QuantType.QInt8
        return QuantType.QInt8, activation


def check_max_error(max_error: Optional[float]) -> Optional[float]:
    """The error budget, or a ``UserError`` when it is not a positive number."""
    if max_error is None:
        return None
    try:
        value = float(max_error)
    except (TypeError, ValueError):
        raise UserError(f"max_error {max_error!r} is not a number") from None
    if not value > 0:
        raise UserError(f"max_error must be > 0 (relative L2 error of the outputs), got {value}")
    return value


def check_names(what: str, names: Optional[Sequence[str]], known: Sequence[str]) -> Tuple[str, ...]:
    """``names`` as a tuple, or a ``UserError`` naming the first one not in ``known``."""
    names = tuple(names or ())
    known_set = set(known)
    for name in names:
        if name not in known_set:
            raise UserError(f"{what} {name!r} is not in the model")
    return names

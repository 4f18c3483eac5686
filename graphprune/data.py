"""Model inputs: .npz sample files checked against the model, seeded random inputs, --input-shape parsing.

Scalar (rank-0) inputs, such as the sample rate ``sr`` of a voice-activity model, take one value for the
whole run: in an ``.npz`` either a 0-d array, or a 1-d array with one (equal) value per sample, as
exporters often save it.  Different values per sample are refused: a rank-0 input cannot be batched.
"""

from __future__ import annotations

import os
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import helper

from graphprune.errors import UserError
from graphprune.ir import real_inputs, value_shape

__all__ = ["InputSet", "parse_input_shape", "parse_input_shapes", "load_inputs", "random_inputs", "input_specs"]


class InputSet:
    """Samples for every model input: one array per input name, first axis = samples.

    ``batch_axis_fixed`` tells whether the model's first dim is fixed (then samples are fed
    ``fixed_batch`` at a time) or dynamic (then they are fed in batches).
    """

    def __init__(self, arrays: Dict[str, np.ndarray], fixed_batch: Optional[int] = None):
        counts = {len(a) for a in arrays.values() if a.ndim}
        if len(counts) > 1:
            detail = ", ".join(f"{k}: {len(v)}" for k, v in arrays.items() if v.ndim)
            raise UserError(f"inputs disagree on the number of samples ({detail})")
        self.arrays = arrays  # a 0-d array is a scalar input's one value, fed with every batch
        self.fixed_batch = fixed_batch

    def __len__(self) -> int:
        batched = [a for a in self.arrays.values() if a.ndim]
        if batched:
            return len(batched[0])
        return 1 if self.arrays else 0  # only scalar inputs: one sample

    def batches(self, batch_size: int = 32) -> Iterator[Dict[str, np.ndarray]]:
        step = self.fixed_batch or batch_size
        for start in range(0, len(self), step):
            yield {k: v[start : start + step] if v.ndim else v for k, v in self.arrays.items()}

    def first_batch(self, batch_size: int = 1) -> Dict[str, np.ndarray]:
        return next(self.batches(batch_size))

    def subset(self, indices: Sequence[int]) -> "InputSet":
        index = np.asarray(indices, dtype=np.int64)
        return InputSet({k: v[index] if v.ndim else v for k, v in self.arrays.items()}, self.fixed_batch)


def parse_input_shape(text: str) -> Tuple[str, Tuple[int, ...]]:
    """``NAME=1x3x224x224`` -> ("NAME", (1, 3, 224, 224))."""
    name, sep, dims = text.rpartition("=")
    if not sep or not name or not dims:
        raise UserError(f"--input-shape {text!r}: expected NAME=D1xD2x... (e.g. input=1x3x224x224)")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise UserError(f"--input-shape {text!r}: dims must be integers separated by 'x'") from None
    if any(d <= 0 for d in shape):
        raise UserError(f"--input-shape {text!r}: dims must be positive")
    return name, shape


def parse_input_shapes(texts: Optional[Sequence[str]]) -> Dict[str, Tuple[int, ...]]:
    return dict(parse_input_shape(t) for t in (texts or []))


def input_specs(model: onnx.ModelProto) -> List[Tuple[str, np.dtype, Optional[tuple]]]:
    """(name, numpy dtype, declared shape) of each input the user feeds."""
    specs = []
    for vi in real_inputs(model.graph):
        elem = vi.type.tensor_type.elem_type
        specs.append((vi.name, np.dtype(helper.tensor_dtype_to_np_dtype(elem)), value_shape(vi)))
    return specs


def _resolve_shape(name: str, declared: Optional[tuple], overrides: Mapping[str, Tuple[int, ...]]) -> Tuple[int, ...]:
    if name in overrides:
        shape = overrides[name]
        if declared is not None:
            if len(declared) != len(shape):
                raise UserError(f"--input-shape {name}: rank {len(shape)} but the model declares rank {len(declared)}")
            for i, (want, got) in enumerate(zip(declared, shape)):
                if isinstance(want, int) and want != got:
                    raise UserError(f"--input-shape {name}: dim {i} is {got} but the model fixes it to {want}")
        return tuple(shape)
    if declared is None:
        raise UserError(f"input {name!r} has no declared shape: give --input-shape {name}=D1xD2x...")
    dynamic = [i for i, d in enumerate(declared) if not isinstance(d, int) or d <= 0]
    if dynamic:
        raise UserError(
            f"input {name!r} has dynamic dims {[declared[i] for i in dynamic]}: "
            f"give --input-shape {name}=" + "x".join(str(d) if isinstance(d, int) and d > 0 else "N" for d in declared)
        )
    return tuple(declared)


def random_inputs(
    model: onnx.ModelProto,
    input_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None,
    samples: int = 1,
    seed: int = 0,
) -> InputSet:
    """Seeded random inputs from the declared shapes (dynamic dims from ``input_shapes``).

    Floats are standard normal; integers are drawn from [0, 100) (token ids, indices); bools at random.
    Each sample is one feed of the resolved shape.
    """
    overrides = dict(input_shapes or {})
    known = {name for name, _, _ in input_specs(model)}
    for name in overrides:
        if name not in known:
            raise UserError(f"--input-shape names {name!r}, which is not a model input (inputs: {', '.join(sorted(known))})")
    rng = np.random.default_rng(seed)
    arrays = {}
    feed_batch = None
    for name, dtype, declared in input_specs(model):
        shape = _resolve_shape(name, declared, overrides)
        full = (samples * shape[0],) + shape[1:] if shape else ()  # a scalar input: one value for every sample
        if np.issubdtype(dtype, np.floating):
            arrays[name] = rng.standard_normal(full).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            arrays[name] = rng.integers(0, 100, size=full).astype(dtype)
        elif dtype == np.bool_:
            arrays[name] = rng.random(full) < 0.5
        else:
            raise UserError(f"input {name!r} has element type {dtype}, which random inputs cannot make: give --data")
        if shape:
            feed_batch = shape[0]
    return InputSet(arrays, fixed_batch=feed_batch)


def load_inputs(path: "str | os.PathLike", model: onnx.ModelProto, extra_keys: Sequence[str] = ()) -> Tuple[InputSet, Dict[str, np.ndarray]]:
    """Read an ``.npz`` of samples and check it against the model's inputs.

    Returns the ``InputSet`` and the requested ``extra_keys`` (labels...).  Arrays are cast to the
    input's dtype when the cast is safe-ish (float64 -> float32, int32 -> int64); other mismatches,
    missing inputs, wrong ranks and wrong fixed dims are ``UserError``s naming the input.
    """
    path = os.fspath(path)
    stored = _read_npz(path)
    arrays: Dict[str, np.ndarray] = {}
    fixed_batch = None
    for name, dtype, declared in input_specs(model):
        if name not in stored:
            raise UserError(f"{path}: no array for model input {name!r} (arrays: {', '.join(sorted(stored)) or 'none'})")
        arrays[name] = _conform(path, name, stored[name], dtype, declared)
        if name not in extra_keys:  # the file's array, when cast (float64 -> float32), goes now: not held twice
            stored[name] = arrays[name]
        if declared and isinstance(declared[0], int) and declared[0] > 0:
            fixed_batch = declared[0]
    inputs = InputSet(arrays, fixed_batch=fixed_batch)
    if arrays and len(inputs) == 0:
        raise UserError(f"{path}: zero samples (the arrays' first axis is empty)")
    extras = {}
    for key in extra_keys:
        if key not in stored:
            raise UserError(f"{path}: no array named {key!r} (arrays: {', '.join(sorted(stored))})")
        extras[key] = _check_extra(path, key, stored[key])
    return inputs, extras


_NPZ_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def _read_npz(path: str) -> Dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``; a clear ``UserError`` for anything else."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{path}: no such data file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read data file ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{path}: not a regular file (a .npz archive is expected)")
    with open(path, "rb") as f:
        head = f.read(6)
    if head.startswith(b"\x93NUMPY"):
        raise UserError(f"{path}: a .npy file (one array), not an .npz archive: save with numpy.savez(path, <input name>=array)")
    if not head.startswith(_NPZ_MAGIC):
        raise UserError(f"{path}: not an .npz archive (empty file or another format)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise UserError(f"{path}: holds object arrays (only numeric arrays are read, never pickles)") from None
        raise UserError(f"{path}: not a readable .npz file ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - zipfile/zlib/numpy raise many types on corrupt archives
        raise UserError(f"{path}: not a readable .npz file ({type(exc).__name__}: {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# Samples checked for NaN/Inf per slice of this many: the check's mask stays small beside the data.
_FINITE_SLICE = 2**22


def _check_finite(path: str, name: str, value: np.ndarray) -> None:
    if value.dtype.kind not in "fc" or not value.size:
        return
    if value.ndim == 0:
        if not np.isfinite(value):
            raise UserError(f"{path}: {name!r} holds NaN or Inf values")
        return
    step = max(1, _FINITE_SLICE // max(1, value[0].size))
    for start in range(0, len(value), step):
        part = value[start:start + step]
        if not np.isfinite(part).all():
            bad = np.argwhere(~np.isfinite(part))[0]
            raise UserError(f"{path}: {name!r} holds NaN or Inf values (sample {start + int(bad[0])})")


def _check_extra(path: str, key: str, value: np.ndarray) -> np.ndarray:
    """Labels and other per-sample arrays: numeric, finite, at least rank 1 (their users check the count)."""
    if value.dtype.kind not in "biuf":
        raise UserError(f"{path}: {key!r} has dtype {value.dtype}; labels must be integer class ids or float targets")
    if value.ndim == 0:
        raise UserError(f"{path}: {key!r} is a scalar; labels need one entry per sample (first axis)")
    _check_finite(path, key, value)
    return value


def _conform(path: str, name: str, value: np.ndarray, dtype: np.dtype, declared: Optional[tuple]) -> np.ndarray:
    if value.dtype.kind not in "biuf":
        raise UserError(f"{path}: input {name!r} has dtype {value.dtype}, the model expects {dtype}")
    if value.dtype != dtype:
        same_kind = (np.issubdtype(value.dtype, np.floating) and np.issubdtype(dtype, np.floating)) or (
            np.issubdtype(value.dtype, np.integer) and np.issubdtype(dtype, np.integer)
        )
        if not same_kind:
            raise UserError(f"{path}: input {name!r} has dtype {value.dtype}, the model expects {dtype}")
        value = value.astype(dtype)
    _check_finite(path, name, value)
    if declared == ():
        return _scalar(path, name, value)
    if value.ndim == 0:
        raise UserError(f"{path}: input {name!r} is a scalar; the model expects {list(declared or ['N', '...'])} "
                        "with samples on the first axis")
    if declared is not None:
        if value.ndim != len(declared):
            raise UserError(
                f"{path}: input {name!r} has shape {list(value.shape)} (rank {value.ndim}), "
                f"the model expects rank {len(declared)} {list(declared)} with samples on the first axis"
            )
        for axis, want in enumerate(declared):
            if axis > 0 and isinstance(want, int) and want > 0 and value.shape[axis] != want:
                raise UserError(
                    f"{path}: input {name!r} has shape {list(value.shape)}, the model expects {list(declared)}"
                )
        if isinstance(declared[0], int) and declared[0] > 0 and len(value) % declared[0]:
            raise UserError(f"{path}: input {name!r} has {len(value)} samples, not a multiple of the fixed batch {declared[0]}")
    return value


def _scalar(path: str, name: str, value: np.ndarray) -> np.ndarray:
    """A rank-0 input's one value: a 0-d array, or a 1-d array of equal per-sample values."""
    if value.ndim == 0:
        return value
    if value.ndim == 1 and len(value) and (value == value[0]).all():
        return np.asarray(value[0])
    raise UserError(
        f"{path}: input {name!r} is a scalar (rank 0) in the model; give one value (a 0-d array, or one equal "
        f"value per sample), not shape {list(value.shape)}" + (" with different values" if value.ndim == 1 else "")
    )

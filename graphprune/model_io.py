"""Loading, checking and atomically saving ONNX models, and making them loadable by ONNX Runtime."""

from __future__ import annotations

import functools
import os
import tempfile
from typing import List, NamedTuple, Optional

import onnx
from onnx import helper
from google.protobuf.message import DecodeError

from graphprune.errors import UserError

__all__ = [
    "load",
    "save",
    "check_model",
    "for_ort",
    "ort_limits",
    "OrtLimits",
    "EXTERNAL_DATA_THRESHOLD",
    "atomic_write_text",
    "model_files",
    "model_file_size",
]

# Protobuf cannot serialize a message of 2 GiB or more: above this, weights go to a side file.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24

# IR versions introduce element types; a model using none of a newer version's types can be
# labelled with an older IR version without changing its meaning.  By name: older onnx releases
# lack the newest types (and then cannot hold them either).
_ELEM_TYPE_MIN_IR = {
    getattr(onnx.TensorProto, name): ir
    for name, ir in [
        ("BFLOAT16", 4),
        ("FLOAT8E4M3FN", 9), ("FLOAT8E4M3FNUZ", 9), ("FLOAT8E5M2", 9), ("FLOAT8E5M2FNUZ", 9),
        ("UINT4", 10), ("INT4", 10),
        ("FLOAT4E2M1", 11),
        ("FLOAT8E8M0", 12),
        ("UINT2", 13), ("INT2", 13),
        ("FLOAT6E2M3", 14), ("FLOAT6E3M2", 14),
    ]
    if hasattr(onnx.TensorProto, name)
}
# Probing starts this far above what the installed onnx knows: the runtime may bundle a newer onnx.
_PROBE_HEADROOM = 3


def load(path: "str | os.PathLike", load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX model, raising ``UserError`` naming the problem for any bad file.

    Handles IR 3+ models, external data (looked up beside the file), and old-style graphs.
    GroupNormalization in its opset 18-20 form, which onnx >= 1.18 refuses, is upgraded to the
    opset 21 form (``opset_upgrade.upgrade_group_norm``).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, not an ONNX file")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(path, load_external_data=load_external_data)
    except DecodeError as exc:
        raise UserError(f"{path}: not an ONNX model or truncated (protobuf parse failed: {exc})") from None
    except (FileNotFoundError, OSError) as exc:
        raise UserError(f"{path}: cannot read model or its external data ({exc})") from None
    except Exception as exc:  # onnx raises assorted errors on corrupt external-data records
        raise UserError(f"{path}: cannot load ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise UserError(f"{path}: not an ONNX model (no graph found; truncated or another file type)")
    if model.ir_version < 3:
        raise UserError(f"{path}: IR version {model.ir_version} is too old (graphprune reads IR 3 and up)")
    opset = default_opset(model)
    if opset is not None and opset < 7:
        raise UserError(f"{path}: opset {opset} is too old (graphprune reads opset 7 and up)")
    from graphprune.opset_upgrade import upgrade_group_norm

    try:
        model = upgrade_group_norm(model)
        check_model(model, full=False)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    return model


def default_opset(model: onnx.ModelProto) -> Optional[int]:
    """The ai.onnx opset version the model imports, or None if it imports none."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def check_model(model: onnx.ModelProto, full: bool = False) -> None:
    """Run ``onnx.checker`` (and with ``full``, strict shape inference), raising ``UserError``."""
    try:
        if model.ByteSize() >= EXTERNAL_DATA_THRESHOLD:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.onnx")
                _write(model, path)
                onnx.checker.check_model(path, full_check=full)
        else:
            onnx.checker.check_model(model, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"invalid ONNX graph: {first}") from None


def save(
    model: onnx.ModelProto,
    path: "str | os.PathLike",
    *,
    input_path: "Optional[str | os.PathLike]" = None,
    overwrite_input: bool = False,
    external_data: Optional[bool] = None,
) -> str:
    """Write ``model`` to ``path`` atomically (temporary file, then rename).

    The IR label is lowered to the installed onnxruntime's when the content allows (onnx stamps
    its own newest IR on models it builds), so that the written file loads in that runtime.

    Args:
        model: the model to write; it is not modified.
        path: destination.
        input_path: the file the model was read from; writing over it is refused unless
            ``overwrite_input`` is set.
        overwrite_input: allow ``path`` to be ``input_path``.
        external_data: store weights in ``<name>.data`` beside the model; by default only when the
            model would exceed protobuf's 2 GiB limit.

    Returns the path written.
    """
    path = os.fspath(path)
    if input_path is not None and not overwrite_input and os.path.exists(path):
        if os.path.samefile(path, os.fspath(input_path)):
            raise UserError(f"{path}: refusing to overwrite the input model (choose another output path)")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"{path}: output directory {directory} does not exist")
    model = _for_writing(model)
    if external_data is None:
        external_data = model.ByteSize() >= EXTERNAL_DATA_THRESHOLD if _all_inline(model) else True
    tmp_dir = tempfile.mkdtemp(prefix=".graphprune-", dir=directory)
    try:
        tmp_model = os.path.join(tmp_dir, os.path.basename(path))
        _write(model, tmp_model, external_data=external_data)
        data_name = os.path.basename(path) + ".data"
        if external_data and os.path.exists(os.path.join(tmp_dir, data_name)):  # absent if all tensors are tiny
            os.replace(os.path.join(tmp_dir, data_name), os.path.join(directory, data_name))
        os.replace(tmp_model, path)
    finally:
        for leftover in os.listdir(tmp_dir):
            os.unlink(os.path.join(tmp_dir, leftover))
        os.rmdir(tmp_dir)
    return path


def _all_inline(model: onnx.ModelProto) -> bool:
    return not any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer
    )


def _write(model: onnx.ModelProto, path: str, external_data: bool = False) -> None:
    if external_data:
        # onnx.save_model converts in place; work on a copy so the caller's model keeps its data.
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(
            copy,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=os.path.basename(path) + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, path)


class OrtLimits(NamedTuple):
    """What the installed ONNX Runtime loads (see ``ort_limits``)."""

    ir_version: int  # highest IR version
    opset: int  # highest ai.onnx opset
    version: str  # onnxruntime.__version__

    @property
    def short_version(self) -> str:
        """"1.32" for "1.32.0": the release line messages name."""
        return ".".join(self.version.split(".")[:2])


@functools.lru_cache(maxsize=None)
def ort_limits() -> OrtLimits:
    """The highest IR version and ai.onnx opset the installed onnxruntime loads, probed once.

    Each probe is a one-node Identity model handed to an ``InferenceSession`` (a few ms in all):
    the runtime refuses IR versions newer than its own and opsets newer than the onnx release it
    bundles, whatever the Python ``onnx`` package knows.
    """
    from graphprune.runtime import ort

    rt = ort()
    ir_version = _highest_loaded(rt, "ir_version", onnx.IR_VERSION + _PROBE_HEADROOM, opset=13)
    opset = _highest_loaded(rt, "opset", onnx.defs.onnx_opset_version() + _PROBE_HEADROOM, ir_version=ir_version)
    return OrtLimits(ir_version, opset, rt.__version__)


def _highest_loaded(rt, field: str, start: int, **fixed: int) -> int:
    """Count ``field`` down from ``start`` until the runtime loads the probe model."""
    options = rt.SessionOptions()
    options.graph_optimization_level = rt.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    options.intra_op_num_threads = options.inter_op_num_threads = 1  # no thread pools: ~0.3 ms a probe
    for value in range(start, 2, -1):
        versions = {**fixed, field: value}
        try:
            rt.InferenceSession(_probe_model(**versions), options, providers=["CPUExecutionProvider"])
            return value
        except Exception:  # the runtime's refusal: try the next lower version
            continue
    raise UserError(f"onnxruntime {rt.__version__} loads no ONNX model at all (broken installation?)")


def _probe_model(ir_version: int, opset: int) -> bytes:
    info = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", info[:1], info[1:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    return model.SerializeToString()


def for_ort(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return ``model`` labelled with an IR version the installed onnxruntime loads.

    Newer onnx releases stamp newer IR versions than a runtime may know; when the content uses
    nothing newer than the runtime's IR the label is lowered (a copy; the input is not modified).
    Raises ``UserError`` when that is impossible: an ai.onnx opset above the runtime's (it has no
    kernels for it), or element types of a newer IR.
    """
    limits = ort_limits()
    opset = default_opset(model)
    if opset is not None and opset > limits.opset:
        raise UserError(
            f"model uses ai.onnx opset {opset}; the installed onnxruntime {limits.short_version} runs "
            f"opset <= {limits.opset} (upgrade onnxruntime or convert the model)"
        )
    if model.ir_version <= limits.ir_version:
        return model
    needed = _min_ir_for_content(model)
    if needed > limits.ir_version:
        raise UserError(
            f"model has IR version {model.ir_version} and uses element types of IR {needed}; the installed "
            f"onnxruntime {limits.short_version} loads IR <= {limits.ir_version} (upgrade onnxruntime)"
        )
    return _relabelled(model, limits.ir_version)


def _for_writing(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its IR label lowered to the runtime's when its content allows, else itself.

    What ``save`` writes: never an error (a model the runtime cannot run is still the user's model).
    """
    limits = ort_limits()
    if model.ir_version <= limits.ir_version or _min_ir_for_content(model) > limits.ir_version:
        return model
    return _relabelled(model, limits.ir_version)


def _relabelled(model: onnx.ModelProto, ir_version: int) -> onnx.ModelProto:
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    lowered.ir_version = ir_version
    return lowered


def _min_ir_for_content(model: onnx.ModelProto) -> int:
    """The oldest IR version whose element types cover every type the model uses."""
    needed = 3
    newest_known = max(_ELEM_TYPE_MIN_IR)

    def visit_type(elem_type: int) -> None:
        nonlocal needed
        known = _ELEM_TYPE_MIN_IR.get(elem_type)
        if known is None and elem_type > newest_known:
            known = onnx.IR_VERSION + 1  # a type newer than this onnx release: assume the newest IR
        needed = max(needed, known or 3)

    for graph in _all_graphs(model.graph):
        for init in graph.initializer:
            visit_type(init.data_type)
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.HasField("tensor_type"):
                visit_type(vi.type.tensor_type.elem_type)
        for node in graph.node:
            for attr in node.attribute:
                if attr.name in ("to", "output_dtype", "dtype") and attr.type == onnx.AttributeProto.INT:
                    visit_type(attr.i)
                elif attr.type == onnx.AttributeProto.TENSOR:
                    visit_type(attr.t.data_type)
    return needed


def _all_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_graphs(g)


def atomic_write_text(path: "str | os.PathLike", text: str) -> str:
    """Write a text file (reports, masks) via a temporary file and a rename."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"{path}: output directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".graphprune-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def model_files(path: "str | os.PathLike") -> List[str]:
    """The files a saved model occupies: the model and, when present, its ``.data`` side file."""
    path = os.fspath(path)
    side = path + ".data"
    return [path, side] if os.path.exists(side) else [path]


def model_file_size(path: "str | os.PathLike") -> int:
    """Bytes on disk of a saved model, side file included (what a deployment ships)."""
    return sum(os.path.getsize(p) for p in model_files(path))

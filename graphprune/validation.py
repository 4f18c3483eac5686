"""Validation at the door: a model is checked before any pass sees it, and every result before it is written.

``validate_model`` raises ``UserError`` naming the first problem found, checked in this order (cheap and
crash-preventing checks first: some defects crash ONNX's shape inference or ONNX Runtime's kernels):

1. the ai.onnx opset is one the installed onnx knows; declared dims: no negative dim anywhere, no zero
   dim on a graph input;
2. initializers: no negative dims, stored data matching ``dims`` and the element type;
3. attributes that crash kernels: Conv, ConvTranspose and the pools need strides, dilations and
   kernel sizes >= 1, pads >= 0 (two per spatial axis), group >= 1 dividing the weight's output
   channels (and the declared input channels), no weight axis of size zero;
4. the full ONNX checker with strict shape inference (conflicting value_info, types);
5. float weights (initializers and Constant nodes) are finite: NaN or Inf is refused;
6. with ``need_session``: ONNX Runtime creates a session (its exception reduced to one line); models
   importing custom-op domains the runtime does not implement skip this step.

The command line turns this on for every model it reads (``door``, set by ``graphprune.cli.main``; the
``model_io.load`` of library users is unchanged) and ``check_result`` runs 5 and 6 on what it writes.

A command that runs no session on its input (``prune`` without data) defers step 6 for it
(``deferred_session_check``): the result's own session check is what exit 0 needs, and the input is
checked only when the result fails that check or the command fails with an internal error, to tell
the user's input from our bug (on a 20,000-node graph each session costs about a second).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator, Optional

import numpy as np
import onnx
from onnx import helper

from graphprune.errors import UserError

__all__ = ["validate_model", "check_finite", "check_session", "check_result", "check_attributes", "door", "door_policy",
           "deferred_session_check"]

# What the CLI asks of every model it loads: None (no door checks) or {"need_session": bool}.
_DOOR: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("graphprune_door", default=None)
# Models whose door session check was deferred (``deferred_session_check``); None outside one.
_DEFERRED: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("graphprune_deferred", default=None)

# Ops whose window attributes reach kernels that divide by them or loop on them.
_WINDOW_OPS = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool",
               "MaxUnpool", "DeformConv"}
# (op, index of the weight input) for the group/channel checks.
_WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "ConvInteger": 1, "QLinearConv": 3, "DeformConv": 1}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
# Operator domains the installed runtime implements itself; a model importing another (a custom-op
# library) is checked by the ONNX checker only: the runtime would need that library to open it.
_RUNTIME_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "com.microsoft.experimental",
                    "ai.onnx.training", "ai.onnx.preview.training", "com.ms.internal.nhwc", "org.pytorch.aten"}
# Finite checks walk the weights in chunks: bounded extra memory on large models.
_CHUNK = 1 << 22


@contextlib.contextmanager
def door(need_session: bool) -> Iterator[None]:
    """Within this block, ``model_io.load`` validates every model it returns (see ``validate_model``)."""
    token = _DOOR.set({"need_session": need_session})
    try:
        yield
    finally:
        _DOOR.reset(token)


def door_policy() -> Optional[dict]:
    """The active ``door`` settings, or None outside one."""
    return _DOOR.get()


@contextlib.contextmanager
def deferred_session_check() -> Iterator[None]:
    """Within this block the door skips its ONNX Runtime session check of the models it loads; each is
    checked only when needed to say whose fault a failure is:

    - a result that fails ``check_result``'s session check: the inputs are checked first, so an
      input the runtime refuses is reported as such (``UserError``, exit 2), as the door would have;
    - any other exception than ``UserError`` leaving the block: the same check of the inputs runs
      first, so an input the runtime refuses is not reported as an internal error.

    Use it only for commands that create no session on their inputs themselves.  Outside a door
    that needs sessions it changes nothing.
    """
    policy = _DOOR.get()
    if policy is None or not policy.get("need_session"):
        yield
        return
    door_token = _DOOR.set({**policy, "need_session": False, "defer_session": True})
    deferred_token = _DEFERRED.set([])
    try:
        yield
    except UserError:
        raise
    except Exception:
        check_deferred()  # the input's UserError replaces the internal error when the input is at fault
        raise
    finally:
        _DEFERRED.reset(deferred_token)
        _DOOR.reset(door_token)


def check_deferred() -> None:
    """Run the deferred session checks of the inputs loaded so far (``UserError`` for the first failure)."""
    pending = _DEFERRED.get() or []
    while pending:
        check_session(pending.pop(0))


def validate_model(model: onnx.ModelProto, need_session: bool, defer_session: bool = False) -> None:
    """Raise ``UserError`` naming the first problem of ``model`` (see the module docstring for the order).

    Args:
        need_session: run step 6 (the ONNX Runtime session).
        defer_session: instead, keep the model for ``check_deferred`` (inside ``deferred_session_check``).
    """
    from graphprune.model_io import check_model

    _check_opset(model)
    _check_declared_dims(model.graph)
    _check_initializers(model.graph)
    check_attributes(model.graph)
    check_model(model, full=True)
    check_finite(model)
    deferred = _DEFERRED.get()
    if defer_session and deferred is not None:
        deferred.append(model)
    elif need_session or defer_session:
        check_session(model)


def check_result(model: onnx.ModelProto) -> None:
    """What every written result must also satisfy beyond the checker: finite weights, an ORT session.

    Non-finite weights are ``UserError`` (they come from the data or the settings, e.g. a learning
    rate that diverged); a session failure is returned to the caller as ``UserError`` too.
    """
    check_finite(model, what="result")
    try:
        check_session(model)
    except UserError:
        check_deferred()  # an input the runtime refuses is the user's problem, named as the door names it
        raise


def _check_opset(model: onnx.ModelProto) -> None:
    """An ai.onnx opset newer than the installed onnx knows has no operator schemas to check against."""
    newest = onnx.defs.onnx_opset_version()
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > newest:
            raise UserError(f"model imports ai.onnx opset {imp.version}; the installed onnx knows opsets <= {newest}")


def _check_declared_dims(graph: onnx.GraphProto) -> None:
    inputs = {vi.name for vi in graph.input}
    initializers = {init.name for init in graph.initializer}
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value < 0:
                raise UserError(f"tensor {vi.name!r} declares a negative dim ({dim.dim_value} on axis {axis})")
            if dim.HasField("dim_value") and dim.dim_value == 0 and vi.name in inputs and vi.name not in initializers:
                raise UserError(f"model input {vi.name!r} declares a zero-size dim (axis {axis}): it can hold no data")


def _expected_bytes(init: onnx.TensorProto, count: int) -> Optional[int]:
    """Raw bytes ``init`` must hold, or None when its element type has no fixed width here."""
    try:
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
    except (KeyError, ValueError, TypeError):
        return None
    if dtype.kind in "OUS":
        return None
    packed = {getattr(onnx.TensorProto, n, -1): w for n, w in
              (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))}
    if init.data_type in packed:
        return (count * packed[init.data_type] + 7) // 8
    return count * dtype.itemsize


def _check_initializers(graph: onnx.GraphProto) -> None:
    for init in graph.initializer:
        if any(d < 0 for d in init.dims):
            raise UserError(f"initializer {init.name!r} has negative dims {list(init.dims)}")
        if init.data_location == onnx.TensorProto.EXTERNAL:
            continue  # not loaded here: model_io checks external sizes when it reads them
        count = math.prod(init.dims)
        if init.HasField("raw_data"):
            want = _expected_bytes(init, count)
            if want is not None and len(init.raw_data) != want:
                raise UserError(f"initializer {init.name!r}: {len(init.raw_data)} bytes of data for dims "
                                f"{list(init.dims)} ({want} expected)")


def _ints(node: onnx.NodeProto, name: str) -> Optional[list]:
    for attr in node.attribute:
        if attr.name == name:
            return list(attr.ints) if attr.type == onnx.AttributeProto.INTS else [attr.i]
    return None


def check_attributes(graph: onnx.GraphProto) -> None:
    shapes = declared = None  # built at the first window op (none in an MLP: 0.02 s of 20,000 nodes)
    for node in graph.node:
        if node.op_type not in _WINDOW_OPS or node.domain not in ("", "ai.onnx", "com.microsoft"):
            continue
        if shapes is None:
            shapes, declared = _declared_shapes(graph)
        label = f"node {node.name or node.output[0]!r} ({node.op_type})"
        for attr, low in (("strides", 1), ("dilations", 1), ("kernel_shape", 1), ("pads", 0), ("output_padding", 0)):
            values = _ints(node, attr)
            if values is not None and any(v < low for v in values):
                raise UserError(f"{label}: {attr} {values} must all be >= {low}")
        weight = shapes.get(node.input[_WEIGHT_INPUT[node.op_type]]) if node.op_type in _WEIGHT_INPUT and \
            len(node.input) > _WEIGHT_INPUT[node.op_type] else None
        kernel = _ints(node, "kernel_shape")
        spatial = len(weight) - 2 if weight else (len(kernel) if kernel else None)
        pads = _ints(node, "pads")
        if pads is not None and spatial is not None and len(pads) != 2 * spatial:
            raise UserError(f"{label}: pads {pads} must hold 2 values per spatial axis ({2 * spatial})")
        for attr in ("strides", "dilations", "kernel_shape"):
            values = _ints(node, attr)
            if values is not None and spatial is not None and len(values) != spatial:
                raise UserError(f"{label}: {attr} {values} must hold one value per spatial axis ({spatial})")
        group = _ints(node, "group")
        group = group[0] if group else 1
        if group < 1:
            raise UserError(f"{label}: group {group} must be >= 1")
        if weight:
            if any(d == 0 for d in weight):
                raise UserError(f"{label}: weight {node.input[_WEIGHT_INPUT[node.op_type]]!r} has a zero-size axis {weight}")
            out_axis = 1 if node.op_type == "ConvTranspose" else 0
            if node.op_type != "ConvTranspose" and weight[out_axis] % group:
                raise UserError(f"{label}: group {group} does not divide the {weight[out_axis]} output channels")
            channels = (declared.get(node.input[0]) or [None, None])[1:2]
            c = channels[0] if channels else None
            per_group = weight[0] if node.op_type == "ConvTranspose" else weight[1]
            if c and node.op_type == "ConvTranspose" and (c != weight[0] or c % group):
                raise UserError(f"{label}: {c} input channels do not match weight {weight} with group {group}")
            if c and node.op_type != "ConvTranspose" and c != per_group * group:
                raise UserError(f"{label}: {c} input channels but weight {weight} with group {group} "
                                f"expects {per_group * group}")


def _declared_shapes(graph: onnx.GraphProto):
    """(initializer name -> dims, input or value name -> declared dims with None for unknown ones)."""
    declared = {}
    for vi in list(graph.input) + list(graph.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            declared[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return {init.name: list(init.dims) for init in graph.initializer}, declared


def _float_tensors(model: onnx.ModelProto, skip: "frozenset[str] | set[str]" = frozenset()):
    """(name, TensorProto) of every float initializer and Constant value in the model (subgraphs too)
    but the main graph's initializers named in ``skip``, graph by graph as
    ``runtime_support.all_graphs`` lists them: each graph's nodes walked once for its Constants
    and its subgraphs (two walks were a third of checking 10,000 weights)."""
    pending = [model.graph]
    while pending:
        graph = pending.pop()
        for init in graph.initializer:
            if init.data_type in _FLOAT_TYPES and not (skip and init.name in skip):
                yield init.name, init
        skip = frozenset()  # the main graph's only
        subgraphs = []
        for node in graph.node:
            if not node.attribute:
                continue
            constant = node.op_type == "Constant"
            for attr in node.attribute:
                kind = attr.type
                if kind == onnx.AttributeProto.TENSOR and constant and attr.t.data_type in _FLOAT_TYPES:
                    yield node.output[0], attr.t
                elif kind == onnx.AttributeProto.GRAPH:
                    subgraphs.append(attr.g)
                elif kind == onnx.AttributeProto.GRAPHS:
                    subgraphs.extend(attr.graphs)
        pending.extend(reversed(subgraphs))  # popped in node order, each one's own subgraphs first


# numpy types of the float types stored as they are in memory (bfloat16 has none).
_RAW_FLOATS = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
               onnx.TensorProto.FLOAT16: np.float16}


def _all_finite(tensor: onnx.TensorProto) -> bool:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return True  # not loaded (lazy): checked where it is read
    if tensor.HasField("raw_data"):
        dtype = _RAW_FLOATS.get(tensor.data_type)
        if dtype is None:  # bfloat16: the float32 bit pattern's top half; exponent all ones = non-finite
            bits = np.frombuffer(tensor.raw_data, dtype=np.uint16)
            return not bool(np.any((bits & 0x7F80) == 0x7F80))
        flat = np.frombuffer(tensor.raw_data, dtype=dtype)
        if len(flat) <= _CHUNK:  # most weights: one call, no chunk loop
            return bool(np.isfinite(flat).all())
        return all(bool(np.isfinite(flat[i : i + _CHUNK]).all()) for i in range(0, len(flat), _CHUNK))
    from onnx import numpy_helper

    try:
        value = numpy_helper.to_array(tensor)
    except Exception:  # noqa: BLE001 - malformed data is the checker's finding, not ours
        return True
    return bool(np.isfinite(value.astype(np.float32, copy=False)).all())


def check_finite(model: onnx.ModelProto, what: str = "model", checked: "frozenset[str] | set[str]" = frozenset()) -> None:
    """Refuse NaN or Inf in any float weight (``what`` names the model in the message).

    Args:
        checked: main-graph initializers whose values were found finite already (the input's
            weights a command left untouched, read from the same bytes the door checked).
    """
    for name, tensor in _float_tensors(model, skip=checked):
        if not _all_finite(tensor):
            raise UserError(f"{what} weight {name!r} holds NaN or Inf values")


def check_session(model: onnx.ModelProto, light: Optional[onnx.ModelProto] = None, path: Optional[str] = None) -> None:
    """Raise ``UserError`` when ONNX Runtime cannot create a session for ``model`` (message on one line).

    The session is built from the model's weightless copy (``ir.write_weightless``: large tensors
    read as zeros from a sparse stand-in file the runtime maps without reading), with weight
    pre-packing off: creating it costs the structure only, not a serialized copy of every weight
    plus the runtime's own (2-3x the model before), and works past protobuf's 2 GiB.  What the
    runtime checks at load (ops, types, shapes, attributes) does not depend on those values; the
    small and integer tensors some kernels read at creation (shapes, axes) keep theirs.

    Args:
        light: ``model``'s weightless copy, when the caller has one.
        path: such a copy written beside a sized stand-in (default: the full check's, within
            ``shapes.sharing_inference``).
    """
    import tempfile

    from graphprune.ir import weightless_copy, write_weightless
    from graphprune.model_io import for_ort
    from graphprune.runtime import ort
    from graphprune.shapes import checked_file

    if any(imp.domain not in _RUNTIME_DOMAINS for imp in model.opset_import):
        return  # custom ops: see _RUNTIME_DOMAINS
    rt = ort()
    options = rt.SessionOptions()
    options.graph_optimization_level = rt.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # the runtime's own (coloured, multi-line) log lines stay out of stderr
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.add_session_config_entry("session.disable_prepacking", "1")  # packing would read every weight
    # The memory-pattern planner places every inline initializer by a scan of those placed before:
    # quadratic in their count (a QDQ model of 20,000 nodes has 60,000: 85 s of CPU against 18 s
    # without it).  This session never runs, so the plan is never used.
    options.enable_mem_pattern = False
    try:
        # the caller's or the full check's weightless file serves unless the runtime needs other
        # labels: for_ort relabels a copy, written anew
        path = path if path is not None else checked_file(model)
        labels = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import)
        if path is None or for_ort(labels) is not labels:  # for_ort also refuses an opset too new
            path, light = None, for_ort(weightless_copy(model) if light is None else light)
        with tempfile.TemporaryDirectory(prefix="graphprune-check-") as tmp:
            path = path or write_weightless(light, tmp, sized=True)
            session = rt.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            del session  # the stand-in is mapped until the session goes
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the runtime's refusal, whatever its class
        raise UserError(f"onnxruntime cannot load the model: {_one_line(str(exc))}") from None


def _one_line(text: str, limit: int = 300) -> str:
    """ORT's messages: the first line, without the ``[ONNXRuntimeError] : 1 : FAIL :`` prefix, capped."""
    line = next((l.strip() for l in text.splitlines() if l.strip()), "unknown error")
    if line.startswith("[ONNXRuntimeError]"):
        line = line.split(" : ", 3)[-1]
    line = " ".join(line.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."

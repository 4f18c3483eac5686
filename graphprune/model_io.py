"""Loading, checking and atomically saving ONNX models, and making them loadable by ONNX Runtime."""

from __future__ import annotations

import os
import tempfile
from typing import Callable, List, Optional

import onnx
from google.protobuf.message import DecodeError

from graphprune import external_data as external_data_io
from graphprune import external_writes
from graphprune import tempfiles
from graphprune.errors import UserError
from graphprune.runtime_support import (
    OrtLimits,
    default_opset,
    for_ort,
    ort_limits,
    written_ir_version,
)

__all__ = [
    "load",
    "save",
    "check_model",
    "for_ort",
    "default_opset",
    "ort_limits",
    "OrtLimits",
    "EXTERNAL_DATA_THRESHOLD",
    "atomic_write_text",
    "model_files",
    "model_file_size",
]

# Protobuf cannot serialize a message of 2 GiB or more: above this, weights go to a side file.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24



def load(path: "str | os.PathLike", load_external_data: bool = True, direct_paths: bool = False) -> onnx.ModelProto:
    """Load an ONNX model, raising ``UserError`` naming the problem for any bad file.

    Handles IR 3+ models, external data (looked up beside the file), and old-style graphs.
    GroupNormalization in its opset 18-20 form, which onnx >= 1.18 refuses, is upgraded to the
    opset 21 form (``opset_upgrade.upgrade_group_norm``).

    Args:
        direct_paths: without ``load_external_data``, still refuse a data file reached through a
            symlink as reading it would (``external_data.SymlinkedData``): for weights read later.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, not an ONNX file")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(path, load_external_data=False)
    except DecodeError as exc:
        raise UserError(f"{path}: not an ONNX model or truncated (protobuf parse failed: {exc})") from None
    except (FileNotFoundError, OSError) as exc:
        raise UserError(f"{path}: cannot read model or its external data ({exc})") from None
    except Exception as exc:  # onnx raises assorted errors on corrupt external-data records
        raise UserError(f"{path}: cannot load ONNX model ({type(exc).__name__}: {exc})") from None
    # checked before any byte is read
    external_data_io.load_external_data(model, path, read=load_external_data, direct=direct_paths)
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise UserError(f"{path}: not an ONNX model (no graph found; truncated or another file type)")
    if model.ir_version < 3:
        raise UserError(f"{path}: IR version {model.ir_version} is too old (graphprune reads IR 3 and up)")
    opset = default_opset(model)
    if opset is not None and opset < 7:
        raise UserError(f"{path}: opset {opset} is too old (graphprune reads opset 7 and up)")
    from graphprune.opset_upgrade import upgrade_group_norm
    from graphprune.shapes import name_negative_dims

    name_negative_dims(model.graph)  # Paddle's -1 "any size" dims, before the door refuses negative dims

    try:
        model = upgrade_group_norm(model)
        if not _door_checks(model):  # the door's full check covers this one
            check_model(model, full=False)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    return model


def _door_checks(model: onnx.ModelProto) -> bool:
    """Under the command line (``validation.door``), the full validation of every model read;
    returns whether it ran."""
    from graphprune.validation import door_policy, validate_model

    policy = door_policy()
    if policy is None:
        return False
    validate_model(model, **policy)
    return True


def check_model(model: onnx.ModelProto, full: bool = False,
                on_written: Optional[Callable[[onnx.ModelProto, str], None]] = None) -> None:
    """Run ``onnx.checker`` (and with ``full``, strict shape inference), raising ``UserError``.

    Large models (``ir.is_large``: external data left on disk, or many bytes of weights) are
    checked as a weightless copy written beside an empty stand-in for their weights: the
    checker reads only structure, and the whole proto is never serialized (protobuf refuses
    that past 2 GiB, and below it the bytes would be a second copy of every weight).  Within
    ``shapes.sharing_inference`` a full check always works so, on one copy written once, kept for
    the session check (``shapes.checked_file``); the tensors the copy leaves out of a model that
    is not large are checked one by one (``onnx.checker.check_tensor``: their value fields against
    their dims, as the whole-model checker did).

    Args:
        on_written: within ``sharing_inference``, called with None (the copy is not kept) and the
            copy's file before the checker reads it (``result_check.result_check`` starts the
            session check there).
    """
    from graphprune import ir
    from graphprune.shapes import sharing_active

    keep = full and sharing_active()  # the full check's inference run by us: its shapes are wanted again
    try:
        if keep:
            _check_shared(model, on_written)
            return
        light = ir.weightless_copy(model) if ir.is_large(model) else model
        if light is not model:
            with tempfile.TemporaryDirectory(prefix="graphprune-check-") as tmp:
                onnx.checker.check_model(ir.write_weightless(light, tmp), full_check=full)
        else:
            onnx.checker.check_model(model, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        # ValueError: the checker's verdict on values it cannot map (e.g. "Invalid tensor data type 33")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"invalid ONNX graph: {first}") from None


def _check_shared(model: onnx.ModelProto, on_written) -> None:
    """The full check within ``shapes.sharing_inference``: the weightless copy is serialized once,
    beside the sized stand-in the session check maps; the checker reads that file, strict
    inference its bytes, and the file stays for the session check and the shapes' users.  The copy
    itself is dropped once serialized: nothing reads it again (12 MB of a 20,000-node graph,
    held while the session check builds its own structures)."""
    from graphprune import ir
    from graphprune.shapes import sharing_folder, strict_inference

    large = ir.is_large(model)
    path, serialized = ir.write_weightless_bytes(model, sharing_folder(), sized=True)
    if on_written is not None:
        on_written(None, path)
    if not large:  # as the whole-model checker did; a large model's tensors are left out as outside sharing
        _check_left_out(model)
    onnx.checker.check_model(path, full_check=False)
    strict_inference(None, model, serialized=serialized, path=path)


def _check_left_out(model: onnx.ModelProto) -> None:
    """``onnx.checker.check_tensor`` on the main graph's initializers held in memory (what a weightless
    copy leaves out: the checker sees only their records there); each is serialized alone (a copy
    of each weight in turn: only for models that are not large)."""
    context = onnx.checker.DEFAULT_CONTEXT
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            onnx.checker.check_tensor(init, context)


def save(
    model: onnx.ModelProto,
    path: "str | os.PathLike",
    *,
    input_path: "Optional[str | os.PathLike]" = None,
    overwrite_input: bool = False,
    external_data: Optional[bool] = None,
    source_dir: "Optional[str | os.PathLike]" = None,
    before_commit: Optional[Callable[[], None]] = None,
) -> str:
    """Write ``model`` to ``path`` atomically; with external data, the model and its data switch together.

    The IR label is lowered to the installed onnxruntime's when the content allows (onnx stamps
    its own newest IR on models it builds), so that the written file loads in that runtime.

    How a model and its data file replace the previous pair in one step (no instant shows the
    old ``.onnx`` with new data, or the reverse):

    1. everything is written into a hidden ``.graphprune-*`` folder beside ``path`` and fsynced;
    2. the data file moves beside ``path`` under a name that does not exist yet
       (``<name>.data``, else ``<name>.1.data``, ...): the current ``path``, if any, cannot refer
       to it, so the old pair is untouched;
    3. the ``.onnx`` is renamed over ``path`` (one atomic rename: the switch), and the folder
       fsynced;
    4. the previous pair's data file (and any a killed write left, same naming) is removed.

    A failure (or SIGINT/SIGTERM) before 3 removes what 1 and 2 made; a kill (SIGKILL, power
    loss) before 3 leaves the old pair intact plus an unreferenced data file, which the next
    write to ``path`` removes in step 4, and hidden folders, which writes to the same folder remove
    after an hour (``tempfiles.clean_beside``).

    Args:
        model: the model to write; it is not modified.
        path: destination.
        input_path: the file the model was read from; writing over it is refused unless
            ``overwrite_input`` is set.  Its data files are never removed in step 4.
        overwrite_input: allow ``path`` to be ``input_path``.
        external_data: store weights in a ``.data`` file beside the model; by default when some
            weights are still on disk, or the model would exceed protobuf's 2 GiB limit.
        source_dir: the folder ``model`` was loaded from, when it was loaded without its external
            data (those tensors are copied from there); default ``input_path``'s folder.
        before_commit: called once everything is written, before step 2; what it raises leaves the
            old pair untouched and nothing new behind (``result_check.result_check``'s verdict).

    Returns the path written.
    """
    path = os.fspath(path)
    if input_path is not None and not overwrite_input and os.path.exists(path):
        if os.path.samefile(path, os.fspath(input_path)):
            raise UserError(f"{path}: refusing to overwrite the input model (choose another output path)")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"{path}: output directory {directory} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory (give a file name for the model)")
    if source_dir is None and input_path is not None:
        source_dir = os.path.dirname(os.path.abspath(os.fspath(input_path)))
    ir_version = written_ir_version(model)
    if external_data is None:
        external_data = not _all_inline(model) or _inline_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    tempfiles.clean_beside(directory)
    name = os.path.basename(path)
    location = external_writes.free_data_name(directory, name) if external_data else None
    with tempfiles.unwinding_signals():  # SIGTERM unwinds through the clean-up below
        tmp_dir = tempfiles.track(tempfile.mkdtemp(prefix=tempfiles.HIDDEN_PREFIX, dir=directory))
        placed = None  # the new data file once beside the model, until the model's rename commits it
        try:
            tmp_model = os.path.join(tmp_dir, name)
            _write(model, tmp_model, external_data=external_data, location=location, ir_version=ir_version,
                   source_dir=None if source_dir is None else os.fspath(source_dir))
            if before_commit is not None:
                before_commit()
            if location and os.path.exists(os.path.join(tmp_dir, location)):  # absent if all tensors are tiny
                placed = tempfiles.track(os.path.join(directory, location))
                os.replace(os.path.join(tmp_dir, location), placed)
            os.replace(tmp_model, path)  # the switch
            if placed:
                tempfiles.untrack(placed)
                placed = None
            _fsync_dir(directory)
        except BaseException:
            if placed:
                tempfiles.remove(placed)
            raise
        finally:
            tempfiles.remove(tmp_dir)
        _remove_old_data(directory, name, keep=location, input_path=None if overwrite_input else input_path)
    return path


def _remove_old_data(directory: str, name: str, keep: Optional[str], input_path) -> None:
    """Step 4 of ``save``: the previous pair's data file and killed writes' leftovers, not an input's."""
    old = external_writes.old_data_names(directory, name, keep)
    if old and input_path is not None:
        inputs = {os.path.realpath(p) for p in external_data_io.data_files(os.fspath(input_path))}
        old = [n for n in old if os.path.realpath(os.path.join(directory, n)) not in inputs]
    for leftover in old:
        tempfiles.remove(os.path.join(directory, leftover))


def _fsync_dir(directory: str) -> None:
    """Make the renames in ``directory`` durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _all_inline(model: onnx.ModelProto) -> bool:
    return not any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer
    )


def _inline_bytes(model: onnx.ModelProto) -> int:
    """Size of the model with its weights inline, counted tensor by tensor (``ByteSize`` of a whole
    proto past 2 GiB fails): fixed-width tensors by their dims (measuring copies their bytes), the
    others and the nodes by their serialized size."""
    total = sum(n.ByteSize() for n in model.graph.node)
    for init in model.graph.initializer:
        known = external_data_io.tensor_bytes(init)
        total += known if known is not None else init.ByteSize()
    return total


def _write(
    model: onnx.ModelProto,
    path: str,
    external_data: bool = False,
    location: Optional[str] = None,
    ir_version: Optional[int] = None,
    source_dir: Optional[str] = None,
) -> None:
    """Write ``model`` to ``path`` (a new file), with the IR label ``ir_version`` (default: its own).

    With ``external_data``, initializers of 1 KiB or more go to ``location`` beside ``path``
    (default ``<name>.data``), streamed tensor by tensor (``external_writes.write_with_external_data``);
    without, the initializers are streamed into ``path`` itself (``external_writes.write_inline``).
    """
    if external_data:
        external_writes.write_with_external_data(
            model, path, location or os.path.basename(path) + ".data", ir_version=ir_version, source_dir=source_dir
        )
        return
    external_writes.write_inline(model, path, ir_version=ir_version)


def atomic_write_text(path: "str | os.PathLike", text: str) -> str:
    """Write a text file (reports, masks) via a fsynced temporary file and a rename."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"{path}: output directory {directory} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory (give a file name)")
    tempfiles.clean_beside(directory)
    with tempfiles.unwinding_signals():
        try:
            fd, tmp = tempfile.mkstemp(prefix=tempfiles.HIDDEN_PREFIX, dir=directory)
        except OSError as exc:
            raise UserError(f"{path}: cannot write in {directory} ({exc.strerror})") from None
        tempfiles.track(tmp)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tempfiles.remove(tmp)
            raise
        tempfiles.untrack(tmp)
    return path


# A model file this large is parsed for its data-file names only when graphprune's own names are
# beside it: parsing a big inline model just to list its files would cost its size in memory.
_PARSE_FOR_FILES_BELOW = 64 * 2**20


def model_files(path: "str | os.PathLike") -> List[str]:
    """The files a saved model occupies: the model and the existing data files it refers to."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    if os.path.getsize(path) >= _PARSE_FOR_FILES_BELOW and not external_writes.old_data_names(folder, name, None):
        return [path]
    return [path] + external_data_io.data_files(path)


def model_file_size(path: "str | os.PathLike") -> int:
    """Bytes on disk of a saved model, side file included (what a deployment ships)."""
    return sum(os.path.getsize(p) for p in model_files(path))

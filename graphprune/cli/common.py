"""Options and steps shared by sub-commands: model and data arguments, writing the output."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Dict, Optional, Tuple

import onnx

from graphprune.data import InputSet, load_inputs, parse_input_shapes
from graphprune.errors import UserError
from graphprune.external_data import data_files
from graphprune.external_writes import free_data_name, old_data_names
from graphprune.model_io import atomic_write_text, save
from graphprune.tempfiles import HIDDEN_PREFIX, clean_beside

__all__ = [
    "add_data_options",
    "add_output_options",
    "add_report_option",
    "check_output_path",
    "check_report_path",
    "read_inputs",
    "write_model",
    "write_report",
    "parse_number",
]


def add_data_options(parser: argparse.ArgumentParser, data_help: str = "samples as .npz, one array per model input") -> None:
    parser.add_argument("--data", metavar="FILE.npz", help=data_help)
    parser.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME=1x3x224x224",
        help="concrete shape of an input with dynamic dims (repeatable)",
    )


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="where to write the result")
    parser.add_argument("--overwrite-input", action="store_true", help="allow OUT to be the input model")


def read_inputs(args, model: onnx.ModelProto, extra_keys=()) -> Tuple[Optional[InputSet], Dict[str, Tuple[int, ...]], dict]:
    """(samples from --data or None, --input-shape overrides, extra arrays such as labels)."""
    shapes = parse_input_shapes(getattr(args, "input_shape", None))
    if getattr(args, "data", None):
        data, extras = load_inputs(args.data, model, extra_keys=extra_keys)
        return data, shapes, extras
    return None, shapes, {}


# Files a run reads, by argument name, with how messages name them.
_RUN_INPUTS = (
    ("model", "input model"),
    ("original", "original model"),
    ("candidate", "candidate model"),
    ("teacher", "--teacher model"),
    ("data", "--data file"),
    ("recipe", "--recipe file"),
)
_MODEL_INPUTS = frozenset({"model", "original", "candidate", "teacher"})


def check_output_path(args) -> None:
    """Fail before any work when ``-o`` (or ``--report``) cannot be written or would replace a file of the run.

    Refused with one line (exit 2), before anything is read or written: a missing or unwritable
    folder, an existing directory or special file, the input model (unless ``--overwrite-input``),
    any other file the run reads (``--data``, ``--teacher``, ``--recipe``, a model's external data),
    and an input that writing the model would replace or remove (its data files
    ``OUT.data``, ``OUT.<n>.data``).  ``--report`` is checked too (``check_report_path``).
    """
    out = args.output
    _check_writable("-o", out)
    overwrite = getattr(args, "overwrite_input", False)
    replaces_input = _same(out, args.model)
    if replaces_input and not overwrite:
        raise UserError(f"{out}: refusing to overwrite the input model (choose another output path)")
    folder, name = os.path.split(os.path.abspath(out))
    targets = [("is", out)] + [(f"its data file {n} is", os.path.join(folder, n)) for n in old_data_names(folder, name, None)]
    for what, target in targets:
        for label, _ in _run_files(args, target):
            if overwrite and replaces_input and label in ("input model", "input model's external data"):
                continue  # --overwrite-input: the input model and its data are replaced on purpose
            raise UserError(f"-o {out}: {what} the {label} of this run (choose another output path)")
    check_report_path(args)


def _check_writable(flag: str, path: str) -> None:
    """``path`` can become a file: its folder exists and takes files, and it is no directory or special file."""
    if not path:
        raise UserError(f"{flag}: empty path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: output directory does not exist")
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise UserError(f"{flag} {path}: is a directory (give a file name)")
    if os.path.exists(path) and not os.path.isfile(path):
        raise UserError(f"{flag} {path}: exists and is not a regular file")
    clean_beside(folder)  # hidden leftovers of killed runs, older than an hour
    try:  # the only sure test of writability (permissions, read-only mounts, quotas): make a file
        fd, probe = tempfile.mkstemp(prefix=HIDDEN_PREFIX, dir=folder)
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot write in {folder} ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def _run_files(args, target: str):
    """(label, path) of every file of the run that is ``target`` (as files: links and all)."""
    if not os.path.exists(target):
        return []
    found = []
    for attr, label in _RUN_INPUTS:
        path = getattr(args, attr, None)
        if not path or not os.path.exists(path):
            continue
        if os.path.samefile(path, target):
            found.append((label, path))
        elif attr in _MODEL_INPUTS and _inside(target, os.path.dirname(os.path.abspath(path))):
            # external data lies in the model's folder (``external_data`` refuses anything else)
            found += [(f"{label}'s external data", p) for p in data_files(path) if os.path.samefile(p, target)]
    return found


def _inside(path: str, folder: str) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, root]) == root


def add_report_option(parser: argparse.ArgumentParser, what: str = "the report") -> None:
    parser.add_argument("--report", metavar="R.json", help=f"also write {what} as JSON")


def check_report_path(args) -> None:
    """Fail before any work when ``--report`` cannot be written, is ``-o`` (or its data), or would
    replace a file of the run."""
    if not getattr(args, "report", None):
        return
    report = args.report
    _check_writable("--report", report)
    for label, _ in _run_files(args, report):
        raise UserError(f"--report {report}: is the same file as the {label} of this run")
    out = getattr(args, "output", None)
    if out:
        folder, name = os.path.split(os.path.abspath(out))
        if os.path.realpath(report) == os.path.realpath(out) or _same(report, out):
            raise UserError(f"--report {report}: is the same file as the output model (-o)")
        data_names = old_data_names(folder, name, None) + [free_data_name(folder, name)]
        if os.path.realpath(os.path.dirname(os.path.abspath(report))) == os.path.realpath(folder) \
                and os.path.basename(report) in data_names:
            raise UserError(f"--report {report}: is a data file of the output model (-o {out})")


def _same(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def write_report(args, data) -> None:
    """Write ``data`` as JSON to ``--report`` (atomically), when asked."""
    if getattr(args, "report", None):
        from graphprune.model_io import atomic_write_text

        atomic_write_text(args.report, json.dumps(data, indent=2, default=str))


def write_model(args, model: onnx.ModelProto, **save_options) -> str:
    """Check then atomically write the result: every model the CLI writes passes the full checker,
    holds finite weights and loads in onnxruntime.

    The checks are ``result_check.result_check``'s, as ``prune`` runs them: a result that fails the
    checker is our bug (a pass broke the graph), not bad input: exit 1; non-finite weights and a
    session the runtime refuses are exit 2.  The session is built on a thread while the checker
    runs and the file is written to its temporary place; ``-o`` is replaced only after its verdict.
    ``save_options`` go to ``model_io.save`` (``external_data``, ``source_dir``).
    """
    from graphprune.result_check import result_check

    with result_check(model) as verdict:
        return save(model, args.output, input_path=args.model, overwrite_input=args.overwrite_input,
                    before_commit=verdict, **save_options)


def parse_number(text: str, what: str, low: float, high: float, high_inclusive: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{what} {text!r} is not a number") from None
    ok = low <= value <= high if high_inclusive else low <= value < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise UserError(f"{what} {value} is outside [{low}, {high}{bracket}")
    return value

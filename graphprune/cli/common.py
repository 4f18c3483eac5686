"""Options and steps shared by sub-commands: model and data arguments, writing the output."""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, Optional, Tuple

import onnx

from graphprune.data import InputSet, load_inputs, parse_input_shapes
from graphprune.errors import UserError
from graphprune.model_io import atomic_write_text, save

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


def check_output_path(args) -> None:
    """Fail before any work when the output cannot be written (same file as input, missing folder)."""
    out = os.path.abspath(args.output)
    if not os.path.isdir(os.path.dirname(out)):
        raise UserError(f"{args.output}: output directory does not exist")
    if os.path.exists(out) and os.path.samefile(out, args.model) and not args.overwrite_input:
        raise UserError(f"{args.output}: refusing to overwrite the input model (choose another output path)")


def add_report_option(parser: argparse.ArgumentParser, what: str = "the report") -> None:
    parser.add_argument("--report", metavar="R.json", help=f"also write {what} as JSON")


def check_report_path(args) -> None:
    """Fail before any work when ``--report`` cannot be written or would replace an input."""
    if not getattr(args, "report", None):
        return
    path = os.path.abspath(args.report)
    if not os.path.isdir(os.path.dirname(path)):
        raise UserError(f"--report {args.report}: output directory does not exist")
    for name in ("model", "original", "candidate", "output"):
        other = getattr(args, name, None)
        if other and os.path.abspath(other) == path:
            raise UserError(f"--report {args.report}: is the same file as the {name} path")


def write_report(args, data) -> None:
    """Write ``data`` as JSON to ``--report`` (atomically), when asked."""
    if getattr(args, "report", None):
        from graphprune.model_io import atomic_write_text

        atomic_write_text(args.report, json.dumps(data, indent=2, default=str))


def write_model(args, model: onnx.ModelProto) -> str:
    """Check then atomically write the result: every model the CLI writes passes the full checker.

    A result that fails the checker is our bug (a pass broke the graph), not bad input: exit 1.
    """
    from graphprune.model_io import check_model
    from graphprune.passes.base import PassContractError

    try:
        check_model(model, full=True)
    except UserError as exc:
        raise PassContractError(f"refusing to write an invalid result: {exc}") from None
    return save(model, args.output, input_path=args.model, overwrite_input=args.overwrite_input)


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

"""The ``graphprune`` command line: one module per sub-command, errors mapped to exit codes.

Exit codes: 0 success, 2 bad input (one-line message naming the problem), 1 internal error.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import traceback
import warnings
from typing import List, Optional

from graphprune.errors import UserError
from graphprune.tempfiles import run_scope

__all__ = ["main", "COMMAND_MODULES"]

# Each module defines `register(subparsers)`, which adds its parser and sets `func=run(args) -> int`.
COMMAND_MODULES = [
    "graphprune.cli.inspect_cmd",
    "graphprune.cli.validate_cmd",
    "graphprune.cli.run_cmd",
    "graphprune.cli.demo_cmd",
    "graphprune.cli.finetune_cmd",
    "graphprune.cli.quantize_cmd",
    "graphprune.cli.sparsify_cmd",
    "graphprune.cli.prune_cmd",
    "graphprune.cli.sensitivity_cmd",
]


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line naming the problem (and exit 2, as argparse does)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="graphprune",
        description="Prune, sparsify, quantize and fine-tune ONNX models, and validate the result.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    sub.required = True
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    return parser


# Commands that only read a model need no runtime session at the door (see graphprune.validation).
_NO_SESSION_COMMANDS = {"inspect"}
# Longest error message printed (a message holding a whole array or path list is cut).
_MESSAGE_LIMIT = 400


def _integer_limits() -> dict:
    """Option (attribute) -> (lowest, highest) accepted; ``--threads`` within the machine's limits.

    A lowest of None: the command checks it with its own message.
    """
    return {
        "threads": (1, (os.cpu_count() or 1) * 4),  # a huge pool size crashes the runtime
        "samples": (1, 100_000),
        "runs": (1, 100_000),
        "calibration_samples": (None, 10_000_000),
        "seed": (0, 2**32 - 1),
        "round_to": (None, 2**31 - 1),
        "epochs": (None, 100_000),
        "steps": (None, 1_000),
    }


def check_integer_options(args) -> None:
    """Refuse integer options outside their range before any work (``UserError`` naming the option)."""
    for attr, (low, high) in _integer_limits().items():
        text = getattr(args, attr, None)
        if text is None or isinstance(text, bool):
            continue
        option = "--" + attr.replace("_", "-")
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise UserError(f"{option} {text!r} is not an integer") from None
        if low is None and value > high:
            raise UserError(f"{option} {value} is above the limit {high}")
        if low is not None and not low <= value <= high:
            raise UserError(f"{option} {value} is outside [{low}, {high}]")


@contextlib.contextmanager
def _quiet_runtime():
    """ONNX Runtime's own log lines (coloured, multi-line) stay out of stderr: errors reach the user as ours."""
    from graphprune import runtime

    saved, runtime.LOG_SEVERITY = runtime.LOG_SEVERITY, 4
    try:
        yield
    finally:
        runtime.LOG_SEVERITY = saved


@contextlib.contextmanager
def _one_line_warnings(command: str):
    """Python warnings printed as ``graphprune CMD: warning: ...`` (one line, once each)."""
    seen = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())[:_MESSAGE_LIMIT]
        if text not in seen:
            seen.add(text)
            print(f"graphprune {command}: warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from graphprune.validation import door

    try:
        check_integer_options(args)
        # run_scope: temporaries removed on exit and SIGTERM; killed runs' leftovers cleaned
        need_session = args.command not in _NO_SESSION_COMMANDS
        with run_scope(), _quiet_runtime(), _one_line_warnings(args.command), door(need_session=need_session):
            return int(args.func(args) or 0)
    except UserError as exc:
        message = " ".join(str(exc).split())
        # a pass names itself in its errors (useful under `run`); under its own command that repeats
        if message.startswith(f"{args.command}: "):
            message = message[len(args.command) + 2 :]
        if len(message) > _MESSAGE_LIMIT:
            message = message[: _MESSAGE_LIMIT - 3] + "..."
        print(f"graphprune {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"graphprune {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _closed_pipe()
    except Exception as exc:  # anything else is our bug
        if os.environ.get("GRAPHPRUNE_TRACEBACK"):
            traceback.print_exc()
        detail = " ".join(str(exc).split())[:_MESSAGE_LIMIT]
        print(f"graphprune {args.command}: internal error: {type(exc).__name__}: {detail}", file=sys.stderr)
        return 1


def _closed_pipe() -> int:
    """The reader of our output went away (``graphprune inspect M | head -1``): stop quietly, as git does."""
    try:  # the interpreter's last flush would raise again: later writes go to /dev/null
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (tests)
        pass
    return 141  # 128 + SIGPIPE: what the shell reports for `git log | head -1`


def entry_point() -> None:  # pragma: no cover - console script
    code = main()
    try:
        sys.stdout.flush()  # output still buffered when the reader has gone
    except BrokenPipeError:
        code = _closed_pipe()
    sys.exit(code)

"""The ``graphprune`` command line: one module per sub-command, errors mapped to exit codes.

Exit codes: 0 success, 2 bad input (one-line message naming the problem), 1 internal error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
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


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with run_scope():  # temporaries removed on exit and SIGTERM; killed runs' leftovers cleaned
            return int(args.func(args) or 0)
    except UserError as exc:
        message = " ".join(str(exc).split())
        # a pass names itself in its errors (useful under `run`); under its own command that repeats
        if message.startswith(f"{args.command}: "):
            message = message[len(args.command) + 2 :]
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
        print(f"graphprune {args.command}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
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

"""Running a case through the CLI (in process, or in a subprocess for cases that once crashed it) and
judging the outcome: exit 2 with one line, or exit 0 with a valid output; inputs never changed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from graphprune.testing.fuzz.case import FuzzCase


@dataclass
class Outcome:
    """What a case did: exit code (negative: killed by that signal; None: hung), stderr, problems found."""

    case: FuzzCase
    code: Optional[int]
    stderr: str
    problems: List[str]

    @property
    def kind(self) -> str:
        """How the issue's fuzz report counts it: clean, internal, broken-success, crash, hang, multiline."""
        if self.code is None:
            return "hang"
        if self.code < 0:
            return "crash"
        if self.code == 1 or "Traceback" in self.stderr:
            return "internal"
        if not self.problems:
            return "clean"
        if self.code == 0:
            return "broken-success"
        return "bad-rejection"


def _snapshot(folder: str) -> Dict[str, bytes]:
    import hashlib
    import os

    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).digest()
            else:
                out[rel] = b"<dir or special>"
    return out


def run_case(case: FuzzCase, folder: str, subprocess_mode: Optional[bool] = None, timeout: float = 120.0) -> Outcome:
    """Run ``case`` through the CLI in ``folder`` (empty) and judge the result.

    In-process (``graphprune.cli.main``, stderr captured at the file-descriptor level, so ORT's own
    log lines count) unless the case is ``isolate`` or ``subprocess_mode`` is set.
    """
    argv = case.materialize(folder)
    before = _snapshot(folder)
    if subprocess_mode if subprocess_mode is not None else case.isolate:
        code, stderr = _run_subprocess(argv, timeout)
    else:
        code, stderr = _run_in_process(argv, timeout)
    return Outcome(case, code, stderr, _judge(case, code, stderr, folder, before))


def _run_subprocess(argv: List[str], timeout: float):
    import subprocess
    import sys

    script = "import sys; from graphprune.cli import main; sys.exit(main(sys.argv[1:]))"
    try:
        proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        return None, (exc.stderr or b"").decode(errors="replace")
    return proc.returncode, proc.stderr.decode(errors="replace")


class _Hang(BaseException):
    pass


def _run_in_process(argv: List[str], timeout: float):
    import os
    import signal
    import sys
    import tempfile

    from graphprune.cli import main

    def on_alarm(signum, frame):
        raise _Hang()

    sys.stderr.flush()
    saved, saved_stream = os.dup(2), sys.stderr
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        sys.stderr = open(2, "w", closefd=False, errors="replace")  # Python's writes and the runtime's, in order
        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        code: Optional[int]
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        except _Hang:
            code = None
        except BaseException:  # noqa: BLE001 - an escaped exception is a finding, not a test crash
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            sys.stderr.flush()
            sys.stderr = saved_stream
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        stderr = capture.read().decode(errors="replace")
    return code, stderr


def _judge(case: FuzzCase, code: Optional[int], stderr: str, folder: str, before: Dict[str, bytes]) -> List[str]:
    import os

    problems = []
    lines = [line for line in stderr.splitlines() if line.strip()]
    after = _snapshot(folder)
    if code is None:
        return ["hung (timeout)"]
    if code < 0:
        return [f"killed by signal {-code}"]
    if "Traceback" in stderr:
        problems.append("traceback on stderr")
    if code not in (0, 2):
        problems.append(f"exit {code}: {lines[-1] if lines else ''}"[:300])
    if code == 2:
        if case.expect == "ok":
            problems.append(f"refused a valid input: {lines[-1] if lines else ''}"[:300])
        if len(lines) != 1:
            problems.append(f"{len(lines)} stderr lines: {' | '.join(lines)[:300]}")
        elif len(lines[0]) > 400:
            problems.append(f"stderr line of {len(lines[0])} characters")
        if after != before:
            changed = sorted(set(after) ^ set(before) | {k for k in before if k in after and after[k] != before[k]})
            problems.append(f"files changed on failure: {changed}")
    if code == 0:
        if case.expect == "error":
            problems.append("accepted a bad input (exit 0)")
        changed_inputs = [k for k in before if after.get(k) != before[k] and "--overwrite-input" not in case.argv]
        if changed_inputs:
            problems.append(f"input files changed: {changed_inputs}")
        for name in set(after) - set(before):
            path = os.path.join(folder, name)
            if name.endswith(".onnx") and os.path.isfile(path):
                problem = _check_output(path)
                if problem:
                    problems.append(f"output {name}: {problem}")
    return problems


def _check_output(path: str) -> Optional[str]:
    """None when ``path`` passes the full checker, holds finite weights and opens in onnxruntime."""
    try:
        onnx.checker.check_model(path, full_check=True)
        model = onnx.load(path)
        for init in model.graph.initializer:
            value = numpy_helper.to_array(init)
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                return f"non-finite values in {init.name}"
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4
        onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
    return None

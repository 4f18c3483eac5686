"""Temporary files of a run: removed on failure, on SIGTERM/SIGINT, and when a killed run left them, at the next run.

Three kinds of temporaries exist:

- hidden ``.graphprune-*`` files and folders beside an output, where a write is prepared before
  its rename (``model_io.save``, ``atomic_write_text``).  Each is ``track``-ed while it lives;
  ``clean_beside(folder)`` removes the ones older than ``STALE_SECONDS`` (a killed run's; a live
  write touches its files far more often than that).
- a private folder per CLI run in the system temp dir, ``graphprune-run-<pid>-*``: ``run_scope``
  points ``tempfile`` at it, so everything a run puts in "the temp dir" (ours:
  ``graphprune-prep-*``, ``graphprune-calib-*``, ``graphprune-check-*``; onnxruntime's
  ``pre.quant.*``) lands inside and goes with it.  A folder whose process is gone is removed by
  the next run.
- temporaries made outside a CLI run (the library called from Python) or by older releases,
  directly in the system temp dir: removed by the next run once older than ``STALE_SECONDS``.

SIGINT raises ``KeyboardInterrupt`` and SIGTERM (under ``run_scope``, and during any write:
``unwinding_signals``) raises ``SystemExit``: both
unwind through the ``finally`` blocks that remove temporaries; an ``atexit`` hook removes what is
still tracked.  SIGKILL cannot be caught: what it leaves is cleaned at the next run.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from typing import Iterator, Set

__all__ = [
    "HIDDEN_PREFIX",
    "STALE_SECONDS",
    "track",
    "untrack",
    "remove",
    "clean_beside",
    "clean_temp_dir",
    "run_scope",
    "unwinding_signals",
]

HIDDEN_PREFIX = ".graphprune-"
STALE_SECONDS = 3600
_RUN_PREFIX = "graphprune-run-"
# What graphprune (graphprune-prep-*, -calib-*, -check-*...) and onnxruntime's quantization
# pre-processing, which it calls (pre.quant.*), create in the temp dir.
# Named one by one: other tools (benchmarks) keep their own graphprune-* folders there.
_TEMP_PREFIXES = ("graphprune-prep-", "graphprune-calib-", "graphprune-check-", "pre.quant.")

_tracked: Set[str] = set()
_lock = threading.Lock()


def track(path: str) -> str:
    """Remember ``path`` as a temporary to remove at exit or on a signal; returns it."""
    with _lock:
        _tracked.add(path)
    return path


def untrack(path: str) -> None:
    with _lock:
        _tracked.discard(path)


def remove(path: str) -> None:
    """Remove a file, symlink or folder tree; missing is fine, errors are ignored (best effort)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass
    untrack(path)


def _remove_tracked() -> None:
    with _lock:
        paths = list(_tracked)
    for path in paths:
        remove(path)


atexit.register(_remove_tracked)


def clean_beside(folder: str, now: "float | None" = None) -> int:
    """Remove hidden ``.graphprune-*`` leftovers in ``folder`` older than ``STALE_SECONDS``.

    Only entries owned by this user are touched.  Returns how many were removed.
    """
    return _clean(folder, lambda name: name.startswith(HIDDEN_PREFIX), now)


def clean_temp_dir(temp_dir: "str | None" = None, now: "float | None" = None) -> int:
    """Remove killed runs' leftovers from the system temp dir: private run folders whose process is
    gone, and graphprune's (and ORT's ``pre.quant.*``) temporaries older than ``STALE_SECONDS``."""
    temp_dir = temp_dir or tempfile.gettempdir()
    removed = 0
    for name in _entries(temp_dir):
        if name.startswith(_RUN_PREFIX) and not _alive(name[len(_RUN_PREFIX):].split("-")[0]):
            path = os.path.join(temp_dir, name)
            if _owned(path):
                remove(path)
                removed += 1
    return removed + _clean(temp_dir, lambda name: name.startswith(_TEMP_PREFIXES), now)


@contextlib.contextmanager
def run_scope() -> Iterator[str]:
    """One CLI run: stale leftovers cleaned, a private temp folder, SIGTERM unwinding like SIGINT.

    Yields the private folder; on exit (normal, exception or signal) it is removed with every
    tracked temporary, and ``tempfile`` and the signal handlers are restored.
    """
    system_temp = tempfile.gettempdir()
    clean_temp_dir(system_temp)
    private = tempfile.mkdtemp(prefix=f"{_RUN_PREFIX}{os.getpid()}-", dir=system_temp)
    track(private)
    previous_tempdir = tempfile.tempdir
    tempfile.tempdir = private
    try:
        with unwinding_signals():
            yield private
    finally:
        tempfile.tempdir = previous_tempdir
        remove(private)
        _remove_tracked()


@contextlib.contextmanager
def unwinding_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``SystemExit(128 + signal)`` inside the block, so ``finally`` blocks
    remove temporaries, where they would kill the process outright.

    Only signals left at their default action are taken (a handler the caller installed is kept),
    and only in the main thread (Python delivers signals there); the previous handlers come back
    on exit.
    """
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
                handlers[sig] = signal.signal(sig, _exit_on_signal)
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            if signal.getsignal(sig) in (_exit_on_signal, signal.SIG_DFL):  # ours, or reset by a first signal
                signal.signal(sig, handler)


def _exit_on_signal(signum, frame) -> None:
    # SystemExit unwinds through every ``finally`` (temporaries removed); exit status 128 + signal.
    signal.signal(signum, signal.SIG_DFL)  # a second signal kills at once
    raise SystemExit(128 + signum)


def _clean(folder: str, match, now: "float | None") -> int:
    cutoff = (time.time() if now is None else now) - STALE_SECONDS
    removed = 0
    for name in _entries(folder):
        if not match(name):
            continue
        path = os.path.join(folder, name)
        if _owned(path) and _last_touched(path) < cutoff:
            remove(path)
            removed += 1
    return removed


def _entries(folder: str):
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _owned(path: str) -> bool:
    try:
        return os.lstat(path).st_uid == os.getuid()
    except (OSError, AttributeError):  # gone, or no uids on this platform
        return False


def _last_touched(path: str) -> float:
    """Newest mtime of ``path`` and, for a folder, its direct entries (a write in progress is recent)."""
    try:
        newest = os.lstat(path).st_mtime
    except OSError:
        return float("inf")  # gone already: nothing to do
    if os.path.isdir(path) and not os.path.islink(path):
        for name in _entries(path):
            try:
                newest = max(newest, os.lstat(os.path.join(path, name)).st_mtime)
            except OSError:
                pass
    return newest


def _alive(pid_text: str) -> bool:
    try:
        pid = int(pid_text)
    except ValueError:
        return True  # not a name we made: leave it
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True

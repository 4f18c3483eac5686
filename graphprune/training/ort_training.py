"""The on-device half of onnxruntime-training, imported without torch, and a quiet-stderr guard.

``import onnxruntime.training`` runs the package ``__init__``, which imports ``optim`` and through it
torch.  The on-device pieces fine-tuning needs (``artifacts``, ``onnxblock``, ``api``) do not use
torch, so when torch is absent we register a bare package module for ``onnxruntime.training`` whose
``__path__`` points at the real folder: its submodules import normally and the ``__init__`` never runs.
``onnxruntime.tools`` (which ``artifacts`` imports) gets the same treatment when its ``__init__`` fails,
as it does where torch is installed but broken: it imports a torch helper whenever torch is findable.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import tempfile
import types
from typing import Iterator, List, NamedTuple

from graphprune.errors import UserError
from graphprune.runtime import ort

__all__ = ["OrtTraining", "ort_training", "quiet_native_stderr"]

_PACKAGE = "onnxruntime.training"


class OrtTraining(NamedTuple):
    """The training modules graphprune uses."""

    artifacts: types.ModuleType  # generate_artifacts, LossType, OptimType
    onnxblock: types.ModuleType  # optimizer blocks (AdamW / SGD with weight decay, gradient clipping)
    api: types.ModuleType  # Module, Optimizer, CheckpointState


def _register_bare_package(onnxruntime: types.ModuleType, name: str) -> None:
    """Make ``onnxruntime.<name>`` a package whose submodules import without running its ``__init__``."""
    full = f"onnxruntime.{name}"
    package = types.ModuleType(full)
    package.__path__ = [os.path.join(os.path.dirname(onnxruntime.__file__), name)]
    package.__package__ = full
    sys.modules.setdefault(full, package)
    setattr(onnxruntime, name, sys.modules[full])


def _ensure_tools_package(onnxruntime: types.ModuleType) -> None:
    try:
        importlib.import_module("onnxruntime.tools")
    except Exception:  # torch findable but not importable: skip the torch-only __init__
        sys.modules.pop("onnxruntime.tools", None)
        _register_bare_package(onnxruntime, "tools")


def _torch_importable() -> bool:
    # find_spec does not import torch (which takes seconds); a blocked torch (sys.modules[...] = None)
    # raises ValueError here.
    try:
        return sys.modules.get("torch", False) is not None and importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def ort_training() -> OrtTraining:
    """Import the on-device training API, with or without torch.

    With torch installed the real package is imported (so later ``import onnxruntime.training`` by the
    user still sees the full package); without it, or if that import fails, the bare package is used.
    Raises ``UserError`` when the installed onnxruntime has no training support.
    """
    rt = ort()
    if not os.path.isdir(os.path.join(os.path.dirname(rt.__file__), "training")):
        raise UserError(
            "fine-tuning needs onnxruntime-training: pip install 'graphprune[training]' "
            "(it replaces the plain onnxruntime package)"
        )
    if _PACKAGE not in sys.modules and _torch_importable():
        try:
            importlib.import_module(_PACKAGE)
        except Exception:  # a broken torch install must not block torch-free fine-tuning
            for name in [m for m in sys.modules if m == _PACKAGE or m.startswith(_PACKAGE + ".")]:
                sys.modules.pop(name, None)
    if _PACKAGE not in sys.modules:
        _register_bare_package(rt, "training")
    _ensure_tools_package(rt)
    try:
        artifacts = importlib.import_module(_PACKAGE + ".artifacts")
        onnxblock = importlib.import_module(_PACKAGE + ".onnxblock")
        api = importlib.import_module(_PACKAGE + ".api")
    except ImportError as exc:
        raise UserError(f"onnxruntime-training is installed but its on-device API does not import ({exc})") from None
    return OrtTraining(artifacts, onnxblock, api)


@contextlib.contextmanager
def quiet_native_stderr(captured: List[str]) -> Iterator[None]:
    """Silence native (C++) writes to file descriptor 2 inside the block; their text goes to ``captured``.

    The gradient-graph builder logs every graph transformer at info level whatever the Python-side
    severity; the text is kept so that an error can quote its last line.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))

"""The pass contract: ``Pass`` (requires -> call -> ensures), ``PassResult`` and ``Pipeline``."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, ClassVar, Dict, Iterable, List, Type

import onnx

from graphprune.errors import GraphpruneError, UserError

__all__ = [
    "Pass",
    "PassResult",
    "Pipeline",
    "PassContractError",
    "register_pass",
    "registered_passes",
    "pass_class",
]


class PassContractError(GraphpruneError):
    """A pass broke its own contract (returned a non-model, produced an invalid graph...)."""


@dataclasses.dataclass
class PassResult:
    """What a pass returns.

    Attributes:
        model: the resulting model (a new object when ``modified``; may be the input when not).
        modified: whether the pass changed anything.
        stats: small JSON-able facts for the report (channels removed, sparsity, nodes quantized...).
    """

    model: onnx.ModelProto
    modified: bool
    stats: Dict[str, Any] = dataclasses.field(default_factory=dict)


def debug_checks_enabled() -> bool:
    """Whether ``ensures`` runs the (slow) full checker after every pass: set GRAPHPRUNE_DEBUG=1."""
    return os.environ.get("GRAPHPRUNE_DEBUG", "") not in ("", "0")


class Pass:
    """Base class of every graph pass.

    Subclasses implement ``call``; they may override ``requires`` to refuse a model they cannot
    handle (raise ``UserError`` with the reason) and ``ensures`` to check their output.  Passes never
    mutate the model they are given: they work on a copy and return it in the ``PassResult``.

    ``name`` is the pass's command-line and recipe name (``canonicalize``, ``prune``...).
    """

    name: ClassVar[str] = ""

    def requires(self, model: onnx.ModelProto) -> None:
        """Raise ``UserError`` when the pass cannot run on ``model``."""

    def call(self, model: onnx.ModelProto) -> PassResult:
        raise NotImplementedError

    def ensures(self, model: onnx.ModelProto) -> None:
        """Check the output; by default the full ONNX checker, only in debug mode (it is slow)."""
        if debug_checks_enabled():
            from graphprune.model_io import check_model

            check_model(model, full=True)

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        self.requires(model)
        result = self.call(model)
        if not isinstance(result, PassResult) or not isinstance(result.model, onnx.ModelProto):
            raise PassContractError(f"pass {self.display_name} did not return PassResult(model, ...)")
        if result.modified:
            self.ensures(result.model)
        return result

    @property
    def display_name(self) -> str:
        return self.name or type(self).__name__

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Pipeline(Pass):
    """Runs passes in order; itself a pass.  Records per-pass stats and wall time.

    Args:
        passes: the passes, run first to last; each receives the previous one's model.
        progress: show a progress bar over the passes (the CLI turns it on).
    """

    name = "pipeline"

    def __init__(self, passes: Iterable[Pass], progress: bool = False):
        self.passes: List[Pass] = list(passes)
        self.progress = progress

    def call(self, model: onnx.ModelProto) -> PassResult:
        from graphprune.progress import progress_bar

        records = []
        modified = False
        with progress_bar(total=len(self.passes), desc="passes", enabled=self.progress) as bar:
            for p in self.passes:
                bar.set_postfix_str(p.display_name)
                start = time.perf_counter()
                result = p(model)
                records.append(
                    {
                        "pass": p.display_name,
                        "modified": result.modified,
                        "seconds": round(time.perf_counter() - start, 4),
                        "stats": result.stats,
                    }
                )
                modified = modified or result.modified
                model = result.model
                bar.update(1)
        return PassResult(model, modified, {"passes": records})

    def ensures(self, model: onnx.ModelProto) -> None:
        """Each pass already checked its own output."""

    def __repr__(self) -> str:
        return f"Pipeline({self.passes!r})"


_REGISTRY: Dict[str, Type[Pass]] = {}


def register_pass(cls: Type[Pass]) -> Type[Pass]:
    """Class decorator: make a pass available to recipes and ``graphprune run --pass NAME``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name` to be registered")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> Dict[str, Type[Pass]]:
    """Name -> class of every registered pass (importing graphprune.passes registers them all)."""
    import graphprune.passes  # noqa: F401  (registers the built-in passes)

    return dict(_REGISTRY)


def pass_class(name: str) -> Type[Pass]:
    passes = registered_passes()
    if name not in passes:
        raise UserError(f"unknown pass {name!r} (known: {', '.join(sorted(passes))})")
    return passes[name]

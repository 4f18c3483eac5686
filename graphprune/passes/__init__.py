"""Built-in passes; importing this package registers them for recipes and the CLI."""

from graphprune.passes.base import Pass, PassResult, Pipeline, register_pass, registered_passes
from graphprune.passes.canonicalize import CanonicalizePass, canonicalize

__all__ = [
    "Pass",
    "PassResult",
    "Pipeline",
    "register_pass",
    "registered_passes",
    "CanonicalizePass",
    "canonicalize",
]

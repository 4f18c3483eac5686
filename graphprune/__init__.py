"""graphprune: structured pruning, sparsification, quantization and fine-tuning of ONNX graphs."""

from graphprune.errors import GraphpruneError, UserError
from graphprune.model_io import load, save
from graphprune.passes import CanonicalizePass, Pass, PassResult, Pipeline, canonicalize
from graphprune.passes import FineTunePass, finetune
from graphprune.passes import InsertQDQPass, insert_qdq
from graphprune.passes import PruneChannelsPass, prune_channels
from graphprune.passes import SparsifyWeightsPass, sparsify_weights
from graphprune.validate import ValidationReport, validate

__all__ = [
    "GraphpruneError",
    "UserError",
    "load",
    "save",
    "Pass",
    "PassResult",
    "Pipeline",
    "CanonicalizePass",
    "canonicalize",
    "FineTunePass",
    "finetune",
    "InsertQDQPass",
    "insert_qdq",
    "PruneChannelsPass",
    "prune_channels",
    "SparsifyWeightsPass",
    "sparsify_weights",
    "validate",
    "ValidationReport",
]
__version__ = "0.1.0"

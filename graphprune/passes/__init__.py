"""Built-in passes; importing this package registers them for recipes and the CLI."""

from graphprune.passes.base import Pass, PassResult, Pipeline, register_pass, registered_passes
from graphprune.passes.canonicalize import CanonicalizePass, canonicalize
from graphprune.passes.finetune import FineTunePass, finetune
from graphprune.passes.fuse_hardswish import FuseHardSwishPass, fuse_hardswish
from graphprune.passes.insert_qdq import InsertQDQPass, insert_qdq
from graphprune.passes.prune_blocks import PruneBlocksPass, prune_blocks
from graphprune.passes.prune_channels import PruneChannelsPass, prune_channels
from graphprune.passes.reconstruct import ReconstructPass, reconstruct_pruned
from graphprune.passes.quantize_weights import QuantizeWeightsPass, quantize_weights
from graphprune.passes.sparsify_weights import SparsifyWeightsPass, sparsify_weights

__all__ = [
    "Pass",
    "PassResult",
    "Pipeline",
    "register_pass",
    "registered_passes",
    "CanonicalizePass",
    "canonicalize",
    "FineTunePass",
    "finetune",
    "FuseHardSwishPass",
    "fuse_hardswish",
    "InsertQDQPass",
    "insert_qdq",
    "PruneBlocksPass",
    "prune_blocks",
    "PruneChannelsPass",
    "prune_channels",
    "ReconstructPass",
    "reconstruct_pruned",
    "QuantizeWeightsPass",
    "quantize_weights",
    "SparsifyWeightsPass",
    "sparsify_weights",
]

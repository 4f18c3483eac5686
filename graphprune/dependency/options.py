"""Analysis options: choices the per-op rules make differently when pruning asks for them."""

from __future__ import annotations

import dataclasses

__all__ = ["AnalysisOptions"]


@dataclasses.dataclass(frozen=True)
class AnalysisOptions:
    """What the dependency analysis couples beyond the lossless default.

    Attributes:
        head_dim: in attention, couple the head dim (the same dims inside every head: Q/K columns
            through the Q.K^T contraction, V columns and output-projection rows) instead of whole
            heads; the head count is kept.
        hidden: couple the hidden size (the residual stream) through LayerNormalization, its
            decomposed form and the fused SkipLayerNormalization.  Lossy: the normalization's mean and
            variance are then taken over fewer features, so masked is not removed.  Off by default:
            those axes block with a reason saying so.
    """

    head_dim: bool = False
    hidden: bool = False

"""Gradual pruning: reach a channel ratio in K prune rounds with fine-tuning after each round.

Pruning a large fraction at once destroys accuracy that fine-tuning must then rebuild from little;
removing it in rounds lets each fine-tuning start from a model that still works.  Each round removes
the same fraction r of the channels left, so that after K rounds (1 - r)^K = 1 - ratio.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

from graphprune.errors import UserError
from graphprune.passes.base import Pass, Pipeline

__all__ = ["round_ratios", "gradual_prune_specs", "gradual_prune_pipeline"]

PassSpec = Tuple[str, Dict[str, Any]]


def round_ratios(ratio: float, steps: int) -> List[float]:
    """Per-round prune ratios (each relative to the channels left) that compose to ``ratio``."""
    if int(steps) != steps or steps < 1:
        raise UserError(f"steps must be a positive integer, got {steps}")
    if not 0 < ratio < 1:
        raise UserError(f"prune ratio {ratio} is outside (0, 1)")
    per_round = 1.0 - (1.0 - ratio) ** (1.0 / steps)
    return [per_round] * int(steps)


def gradual_prune_specs(
    ratio: float,
    steps: int,
    prune_args: Optional[Mapping[str, Any]] = None,
    finetune_args: Optional[Mapping[str, Any]] = None,
    quantize_args: Optional[Mapping[str, Any]] = None,
) -> List[PassSpec]:
    """The pass list prune, finetune, ... (K times), then quantize when ``quantize_args`` is given.

    This is the shape of the bundled recipe ``passes/prune-finetune-quantize.yaml``.
    """
    specs: List[PassSpec] = []
    for per_round in round_ratios(ratio, steps):
        specs.append(("prune", {**dict(prune_args or {}), "ratio": per_round}))
        specs.append(("finetune", dict(finetune_args or {})))
    if quantize_args is not None:
        specs.append(("quantize", dict(quantize_args)))
    return specs


def gradual_prune_pipeline(
    ratio: float,
    steps: int,
    data=None,
    prune_args: Optional[Mapping[str, Any]] = None,
    finetune_args: Optional[Mapping[str, Any]] = None,
    quantize_args: Optional[Mapping[str, Any]] = None,
    progress: bool = False,
) -> Pipeline:
    """A ``Pipeline`` of ``gradual_prune_specs``; ``data`` goes to every pass that takes it.

    ``finetune_args`` carries the supervision (``labels``, ``teacher`` = the unpruned model) and the
    training settings; every round fine-tunes with them.  Raises ``UserError`` when the prune (or
    quantize) pass is not available.
    """
    from graphprune.recipes import build_pass

    specs = gradual_prune_specs(ratio, steps, prune_args, finetune_args, quantize_args)
    passes: List[Pass] = [build_pass(name, kwargs, context={"data": data}) for name, kwargs in specs]
    return Pipeline(passes, progress=progress)

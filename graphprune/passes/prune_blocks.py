"""Depth pruning: remove whole residual blocks (transformer layers, identity-shortcut CNN blocks)."""

from __future__ import annotations

import json
import math
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import onnx

from graphprune import ir
from graphprune.data import InputSet, input_specs, random_inputs
from graphprune.errors import UserError
from graphprune.passes.base import Pass, PassResult, register_pass
from graphprune.pruning.block_importance import block_scores
from graphprune.pruning.block_removal import REMOVED_BLOCKS_KEY, remove_blocks
from graphprune.pruning.blocks import Block, find_blocks
from graphprune.shapes import infer_shapes

__all__ = ["PruneBlocksPass", "prune_blocks", "analyze_blocks"]

# Random calibration samples when no data is given (seeded: the same blocks every run).
RANDOM_SAMPLES = 8
# The size given to dynamic non-batch dims of random samples (sequence length, image side).
DYNAMIC_DIM = 32


@register_pass
class PruneBlocksPass(Pass):
    """Remove the ``blocks`` least important residual blocks (or a ``ratio`` of them).

    Blocks are found in the graph (``graphprune.pruning.blocks``): transformer layers, pre-norm
    (GPT-2, Llama: ``x + f(LN(x))`` pairs) and post-norm (BERT: ``LN(x + f(x))``), as the TorchScript
    and dynamo exporters write them, and residual CNN blocks with an identity shortcut.  Each is
    scored by 1 - cosine similarity between its input and output on ``data`` (one ONNX Runtime run,
    batches streamed); the lowest go.  Removing a block points every reader of its output at its
    input; nodes and weights nothing reads any more are dropped and shapes re-inferred.  A pre-norm
    layer's removal equals zeroing its branches; a post-norm layer's drops its LayerNorms too (the
    next layer reads the previous layer's output: see the blocks module).  Removed blocks are
    listed in ``metadata_props["graphprune.removed_blocks"]``.

    Refuses (``UserError``): no count or several, a count that is negative or larger than the
    removable blocks, a ratio outside [0, 1), a model without residual blocks (with the reason),
    ``indices`` naming no removable block.  ``blocks=0`` (or a ratio rounding to 0) is a no-op.

    Args:
        blocks: how many blocks to remove.
        ratio: the fraction of the removable blocks to remove (rounded down).
        indices: remove exactly these blocks (by index in ``stats["blocks"]``), no scoring.
        data: calibration samples; None: ``RANDOM_SAMPLES`` seeded random samples (noted in stats).
        input_shapes: concrete shapes of dynamic inputs for the random samples (open dims not given:
            batch 1, others ``DYNAMIC_DIM``).
        batch_size: samples per ORT run.
        source_dir: the folder of a model loaded without its external data (ORT reads weights there).
        progress: a progress bar over the calibration batches.
    """

    name = "prune-blocks"

    def __init__(
        self,
        blocks: Optional[int] = None,
        ratio: Optional[float] = None,
        indices: Optional[Sequence[int]] = None,
        data: Optional[InputSet] = None,
        input_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None,
        batch_size: int = 8,
        source_dir: Optional[str] = None,
        progress: bool = False,
    ):
        given = [v is not None for v in (blocks, ratio, indices)]
        if sum(given) != 1:
            raise UserError("prune-blocks: give exactly one of blocks (a count), ratio or indices")
        if blocks is not None and (isinstance(blocks, bool) or int(blocks) != blocks or blocks < 0):
            raise UserError(f"prune-blocks: block count {blocks} must be a non-negative integer")
        if ratio is not None and not 0.0 <= float(ratio) < 1.0:
            raise UserError(f"prune-blocks: ratio {ratio} is outside [0, 1)")
        if int(batch_size) < 1:
            raise UserError(f"prune-blocks: batch_size {batch_size} must be at least 1")
        self.blocks = None if blocks is None else int(blocks)
        self.ratio = None if ratio is None else float(ratio)
        self.indices = None if indices is None else [int(i) for i in indices]
        self.data = data
        self.input_shapes = dict(input_shapes or {})
        self.batch_size = int(batch_size)
        self.source_dir = source_dir
        self.progress = progress

    def call(self, model: onnx.ModelProto) -> PassResult:
        start = time.perf_counter()
        found = analyze_blocks(model)
        if not found:
            raise UserError("prune-blocks: no residual block found (an Add of a tensor and a branch computed from "
                            "it through weights, with equal input and output shapes: a transformer layer or an "
                            "identity-shortcut CNN block)")
        removable = [b for b in found if b.removable]
        params = ir.count_params(model)
        stats: Dict = {"blocks_found": len(found), "blocks_removable": len(removable), "blocks_removed": 0,
                       "params_before": params, "params_after": params, "blocks": [_entry(b) for b in found]}
        count = self._count(removable)
        if count == 0:
            stats["note"] = "0 blocks to remove: model unchanged"
            return PassResult(model, False, stats)
        if self.indices is not None:
            chosen = _by_index(removable, self.indices)
        else:
            data, note = self._data(model)
            stats["calibration"] = note
            scores, refused = block_scores(model, removable, data, self.batch_size, self.source_dir, self.progress)
            for entry in stats["blocks"]:
                if entry["index"] in scores:
                    entry["score"] = round(scores[entry["index"]], 6)
                if entry["index"] in refused:
                    entry["removable"], entry["reason"] = False, refused[entry["index"]]
            ranked = sorted((b for b in removable if b.index in scores), key=lambda b: (scores[b.index], b.index))
            if count > len(ranked):
                raise UserError(f"prune-blocks: {count} blocks asked for, only {len(ranked)} can be removed")
            chosen = sorted(ranked[:count], key=lambda b: b.index)
        result = remove_blocks(model, chosen)
        infer_shapes(result, inplace=True)
        record = [{"index": b.index, "name": b.name, "input": b.input, "output": b.output} for b in chosen]
        entry = result.metadata_props.add()
        entry.key, entry.value = REMOVED_BLOCKS_KEY, json.dumps(record)
        stats["blocks_removed"] = len(chosen)
        stats["removed"] = [{k: e[k] for k in ("index", "name", "kind", "score") if k in e}
                            for e in stats["blocks"] if e["index"] in {b.index for b in chosen}]
        stats["params_after"] = ir.count_params(result)
        stats["seconds"] = round(time.perf_counter() - start, 4)
        return PassResult(result, True, stats)

    def _count(self, removable: List[Block]) -> int:
        """How many blocks go, checked against what the model has."""
        if self.indices is not None:
            return len(self.indices)
        if self.ratio is not None:
            return int(math.floor(self.ratio * len(removable) + 1e-9))
        if self.blocks > len(removable):
            raise UserError(f"prune-blocks: {self.blocks} blocks asked for, the model has {len(removable)} "
                            f"removable residual blocks")
        return self.blocks

    def _data(self, model: onnx.ModelProto) -> Tuple[InputSet, str]:
        if self.data is not None:
            return self.data, f"{len(self.data)} samples"
        shapes, guessed = dict(self.input_shapes), []
        for name, _, declared in input_specs(model):
            if name not in shapes and declared and any(not isinstance(d, int) or d <= 0 for d in declared):
                # an open batch is 1, other open dims (sequence, height, width) DYNAMIC_DIM
                shapes[name] = tuple(d if isinstance(d, int) and d > 0 else (1 if axis == 0 else DYNAMIC_DIM)
                                     for axis, d in enumerate(declared))
                guessed.append(f"{name}={'x'.join(str(d) for d in shapes[name])}")
        data = random_inputs(model, shapes, samples=RANDOM_SAMPLES, seed=0)
        note = f"{RANDOM_SAMPLES} seeded random samples (no data given)"
        if guessed:
            note += f" of shape {', '.join(guessed)} (dynamic dims; --input-shape sets them)"
        return data, note


def _entry(block: Block) -> dict:
    entry = {"index": block.index, "name": block.name, "kind": block.kind, "removable": block.removable}
    if block.reason:
        entry["reason"] = block.reason
    return entry


def _by_index(removable: List[Block], indices: Sequence[int]) -> List[Block]:
    by_index = {b.index: b for b in removable}
    missing = [i for i in indices if i not in by_index]
    if missing:
        raise UserError(f"prune-blocks: no removable block with index {missing[0]} "
                        f"(removable: {', '.join(str(i) for i in sorted(by_index))})")
    return [by_index[i] for i in sorted(set(indices))]


def analyze_blocks(model: onnx.ModelProto) -> List[Block]:
    """The residual blocks of ``model`` (removable or not), found on a weightless copy with inferred shapes."""
    light = ir.weightless_copy(model)
    try:
        light = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - shapes only sharpen the broadcast check; blocks are found without
        pass
    return find_blocks(light)


def prune_blocks(model: onnx.ModelProto, blocks: Optional[int] = None, ratio: Optional[float] = None,
                 **kwargs) -> onnx.ModelProto:
    """Functional form of ``PruneBlocksPass``: the model without its least important blocks."""
    return PruneBlocksPass(blocks=blocks, ratio=ratio, **kwargs)(model).model

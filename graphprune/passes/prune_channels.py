"""Structured channel pruning: remove (or mask) whole channels of coupled groups."""

from __future__ import annotations

import contextlib
import gc
import time
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import onnx

from graphprune import ir
from graphprune.data import InputSet
from graphprune.dependency import AnalysisOptions, DependencyGraph, Group, build_dependency_graph, reported_groups
from graphprune.errors import UserError
from graphprune.passes.base import Pass, PassResult, register_pass
from graphprune.progress import progress_bar
from graphprune.pruning import (
    CRITERIA,
    MODES,
    activation_stats,
    apply_selection,
    group_scores,
    removal_masks,
)
from graphprune.pruning.group_ratios import group_keys, select_by_group
from graphprune.pruning.kind_ratios import KindRatios, select_by_kind

__all__ = ["PruneChannelsPass", "prune_channels", "analyze", "criterion_stats", "gc_paused"]


@register_pass
class PruneChannelsPass(Pass):
    """Prune a fraction of the channels of every prunable coupled group.

    The model is analysed into groups (``graphprune.dependency``): the channels that must go
    together (a conv's outputs, its BatchNorm, the next conv's inputs, every conv feeding the same
    residual Add...).  Each group's channels are ranked by importance summed over all its members,
    the lowest ``ratio`` are chosen, and then either deleted (``remove``: every member constant
    shrinks, Reshape/Split/Slice/Expand/Resize constants and ``group`` attributes are rewritten,
    shapes re-inferred) or zeroed (``mask``: shapes kept, recorded in ``metadata_props``).

    Preparation is done here, not required of the caller: Constant nodes are read as constants
    and shapes come from onnx shape inference (dynamic dims stay dynamic).  Shape subgraphs that
    are not folded (Shape -> Gather -> Reshape) block the axes they read; run ``canonicalize``
    first to fold them (the bundled ``prune`` recipe does).

    Transformers: groups have a kind (``graphprune.dependency.kinds``): ``heads`` (whole attention
    heads of Q/K/V and the output projection; with ``head_dim`` the same dims of every head
    instead), ``ffn`` (neurons between up- and down-projections, gated ones included), ``hidden``
    (the residual stream, lossy, pruned only when ``hidden_ratio`` asks), ``channels`` (the rest).
    ``ratio`` applies to channels, heads and FFN neurons; ``heads_ratio`` / ``ffn_ratio`` override
    it; at least one head stays per layer (a heads ratio of 1 keeps exactly one, and says so).

    Refuses (``UserError``): ratio outside [0, 1) (heads ratio outside [0, 1]), unknown criterion
    or mode, ``activation``/``output`` without data, ``exclude`` naming no node.  Never prunes: blocked groups (graph inputs/outputs,
    ops without a rule, Softmax/LayerNormalization/reductions over the channel axis, sizes read by
    Shape...); ``stats["blocked"]`` lists them with reasons.  Outputs keep their shapes.

    Args:
        ratio: fraction of each group's channels to prune (of all channels with ``global_ranking``).
        criterion: ``l1``, ``l2`` (weight magnitudes), ``bn`` (BatchNorm scales), ``activation``
            (mean |activation| on ``data``) or ``output`` (the error a channel's removal causes in
            its consumers' outputs on ``data``, ``graphprune.pruning.output_error``).
        global_ranking: rank channels across groups (normalized scores), each group losing at most
            ``max_group_ratio`` of its channels.
        round_to: kept channel counts are multiples of this; at least one channel stays.
        exclude: node names whose inputs and outputs keep every channel.
        mode: ``remove`` or ``mask``.
        data: calibration samples (``activation`` only).
        max_group_ratio: cap per group for ``global_ranking``.
        progress: progress bars (stages, and batches of the activation pass) on stderr.
        heads_ratio: fraction of heads (or head dims) to prune, in [0, 1]; None: ``ratio``.
        ffn_ratio: fraction of FFN neurons to prune; None: ``ratio``.
        hidden_ratio: fraction of the hidden size to prune (lossy); None or 0: none.
        head_dim: prune the same dims inside every head (head count kept) instead of whole heads.
        group_ratios: group name (``graphprune.pruning.group_ratios.group_keys``, e.g.
            ``conv2.weight:0``) -> its own ratio, as a budget allocation chose it; the groups it
            does not name take their kind's ratio (``ratio`` defaults to 0 then, else 0.5).  Not
            with ``global_ranking``; a name that is no prunable group is refused.
        source_dir: the folder of the model's file when it was loaded without its external data
            (``load(path, load_external_data=False)``): weights are read from there one at a time
            and untouched ones stay records (``save(..., source_dir=)`` copies them file to file).
            Weight criteria only: a data criterion runs the model in memory.
    """

    name = "prune"

    def __init__(
        self,
        ratio: Optional[float] = None,
        criterion: str = "l2",
        global_ranking: bool = False,
        round_to: int = 1,
        exclude: Sequence[str] = (),
        mode: str = "remove",
        data: Optional[InputSet] = None,
        max_group_ratio: float = 0.9,
        progress: bool = False,
        heads_ratio: Optional[float] = None,
        ffn_ratio: Optional[float] = None,
        hidden_ratio: Optional[float] = None,
        head_dim: bool = False,
        group_ratios: Optional[Mapping[str, float]] = None,
        source_dir: Optional[str] = None,
    ):
        if ratio is None:  # default 0.5, but per-group ratios alone prune only the groups they name
            ratio = 0.0 if group_ratios else 0.5
        self.ratios = KindRatios.from_options(ratio, heads_ratio, ffn_ratio, hidden_ratio)  # checks each ratio
        if criterion not in CRITERIA:
            raise UserError(f"prune: unknown criterion {criterion!r} (choose from {', '.join(CRITERIA)})")
        if mode not in MODES:
            raise UserError(f"prune: unknown mode {mode!r} (choose from {', '.join(MODES)})")
        if criterion in ("activation", "output", "wanda") and data is None:
            raise UserError(f"prune: criterion {criterion!r} needs calibration data (--data FILE.npz)")
        if int(round_to) < 1:
            raise UserError(f"prune: round_to {round_to} must be at least 1")
        if not 0.0 < float(max_group_ratio) <= 1.0:
            raise UserError(f"prune: max_group_ratio {max_group_ratio} is outside (0, 1]")
        self.ratio = self.ratios.channels
        self.criterion = criterion
        self.global_ranking = bool(global_ranking)
        self.round_to = int(round_to)
        self.exclude = [exclude] if isinstance(exclude, str) else list(exclude or ())
        self.mode = mode
        self.data = data
        self.max_group_ratio = float(max_group_ratio)
        self.progress = progress
        self.head_dim = bool(head_dim)
        self.group_ratios = dict(group_ratios or {})
        self.source_dir = source_dir
        if self.group_ratios and self.global_ranking:
            raise UserError("prune: per-group ratios and global ranking exclude each other")

    def requires(self, model: onnx.ModelProto) -> None:
        if not self.exclude:  # nothing to look up: no set of every node's name
            return
        names = {n.name for n in model.graph.node if n.name}
        missing = [n for n in self.exclude if n not in names]
        if missing:
            raise UserError(f"prune: --exclude names no node of the model: {', '.join(missing)}")

    def call(self, model: onnx.ModelProto) -> PassResult:
        with progress_bar(total=3, desc="prune", enabled=self.progress, unit="step") as bar, gc_paused():
            return self._prune(model, bar)

    def _prune(self, model: onnx.ModelProto, bar) -> PassResult:
        start = time.perf_counter()
        bar.set_postfix_str("analysis")
        options = AnalysisOptions(head_dim=self.head_dim, hidden=self.ratios.hidden > 0)
        dep = build_dependency_graph(model, options=options, source_dir=self.source_dir)
        channel_groups = reported_groups(dep.groups())
        excluded = _excluded_groups(dep, channel_groups, self.exclude)
        prunable = [g for g in channel_groups if g.prunable and g.id not in excluded]
        stats = _base_stats(channel_groups, excluded, prunable, model)
        stats["kinds"] = _kind_stats(prunable, {})
        bar.update(1)
        nothing = self.ratios.nothing and not any(float(r) > 0 for r in self.group_ratios.values())
        if nothing or not prunable:
            if self.group_ratios:  # names are checked even when nothing is to be pruned
                select_by_group(prunable, {g.id: np.zeros(g.channels) for g in prunable}, self.group_ratios)
            stats["note"] = "ratio 0: nothing to prune" if nothing else "nothing prunable: every group is blocked"
            return PassResult(model, False, stats)
        bar.set_postfix_str("importance")
        stats_by_dim = criterion_stats(model, prunable, self.criterion, self.data, self.progress, self.source_dir)
        scores = group_scores(dep, prunable, self.criterion, stats_by_dim)
        named, rest = {}, prunable
        if self.group_ratios:
            named = select_by_group(prunable, scores, self.group_ratios, self.round_to)
            keys = group_keys(prunable)
            rest = [g for g in prunable if keys[g.id] not in self.group_ratios]
            stats["group_ratios"] = {keys[g.id]: float(self.group_ratios.get(keys[g.id], self.ratios.for_kind(g.kind)))
                                     for g in prunable}
        selected, notes = select_by_kind(rest, scores, self.ratios, self.global_ranking, self.round_to,
                                         self.max_group_ratio)
        selected.update(named)
        masks = removal_masks(prunable, selected)
        removed = _removed_counts(selected)
        stats["kinds"] = _kind_stats(prunable, removed)
        if notes:
            stats["notes"] = notes
        stats["groups_pruned"] = sum(1 for count in removed.values() if count)
        stats["channels_removed"] = sum(removed.values())
        bar.update(1)
        if not masks:
            stats["note"] = "the ratio rounds to no channel in any group"
            return PassResult(model, False, stats)
        bar.set_postfix_str(self.mode)
        result, zeroed = apply_selection(dep, masks, self.mode, release=True)  # dep is not used again
        stats["params_after"] = ir.count_params(result)
        if self.mode == "mask":
            stats["params_zeroed"] = zeroed
        stats["seconds"] = round(time.perf_counter() - start, 4)
        bar.update(1)
        return PassResult(result, True, stats)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic collector off for the pass: the analysis allocates hundreds of thousands of
    long-lived objects (dims, couplings, members), and each collection of the older generations
    walks all of them again (0.7 s of a 20,000-node graph's prune).  Nothing the pass builds relies
    on the collector: its garbage is freed by reference counting, the rest when the block ends."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def criterion_stats(model: onnx.ModelProto, prunable: List[Group], criterion: str, data: Optional[InputSet],
                    progress: bool = False, source_dir: Optional[str] = None):
    """What a data-aware criterion scores channels by (None for the weight criteria): mean
    |activation|, the output error of removing each channel, or Wanda's input norms on ``data``.
    Shared with the sensitivity measurements, so that they rank channels exactly as the pass does.
    ``source_dir``: where the weights ``model`` left on disk are (the activation criterion only)."""
    if criterion == "activation":
        return activation_stats(model, [m.dim for g in prunable for m in g.members], data, progress=progress,
                                source_dir=source_dir)
    if criterion == "output":
        from graphprune.pruning.output_error import output_error_stats

        return output_error_stats(model, prunable, data, progress=progress)
    if criterion == "wanda":
        from graphprune.pruning.importance import wanda_norms

        return wanda_norms(model, prunable, data, progress=progress)
    return None


def _excluded_groups(dep: DependencyGraph, groups: List[Group], exclude: Sequence[str]) -> Dict[int, str]:
    """Group id -> the excluded node it touches."""
    if not exclude:
        return {}
    tensors: Dict[str, str] = {}
    for node in dep.model.graph.node:
        if node.name in exclude:
            for name in list(node.input) + list(node.output):
                if name:
                    tensors.setdefault(name, node.name)
    out = {}
    for g in groups:
        hit = next((tensors[m.dim.tensor] for m in g.members if m.dim.tensor in tensors), None)
        if hit is not None:
            out[g.id] = hit
    return out


def _base_stats(groups: List[Group], excluded: Dict[int, str], prunable: List[Group], model) -> dict:
    blocked = [g for g in groups if g.blocked]
    params = ir.count_params(model)
    return {
        "groups_found": len(groups),
        "groups_prunable": len(prunable),
        "groups_blocked": len(blocked),
        "groups_excluded": len(excluded),
        "groups_pruned": 0,
        "channels_removed": 0,
        "params_before": params,
        "params_after": params,
        "blocked": [{"kind": g.kind, "channels": g.channels, "params": g.param_names()[:4], "reasons": g.reasons[:3]}
                    for g in blocked],
    }


def _removed_counts(selected: Dict[int, np.ndarray]) -> Dict[int, int]:
    """Group id -> how many of its channels are selected (``count_nonzero`` is what the sum of a
    boolean mask is, at a tenth of the cost of ``sum`` on small arrays)."""
    return {gid: int(np.count_nonzero(s) if s.dtype == bool else s.sum()) for gid, s in selected.items()}


def _kind_stats(prunable: List[Group], removed: Dict[int, int]) -> Dict[str, dict]:
    """Per kind (heads, ffn...): prunable groups, their channels, and how many were selected
    (``removed``: group id -> count)."""
    kinds: Dict[str, dict] = {}
    for g in prunable:
        entry = kinds.setdefault(g.kind, {"groups": 0, "channels": 0, "removed": 0})
        entry["groups"] += 1
        entry["channels"] += g.channels
        entry["removed"] += removed.get(g.id, 0)
    return kinds


def analyze(model: onnx.ModelProto, options: Optional[AnalysisOptions] = None) -> List[Group]:
    """The channel groups of ``model`` (prunable and blocked), as ``inspect --groups`` lists them;
    ``options`` asks for head-dim or hidden-size coupling."""
    return reported_groups(build_dependency_graph(model, options=options).groups())


def prune_channels(
    model: onnx.ModelProto,
    ratio: float = 0.5,
    criterion: str = "l2",
    mode: str = "remove",
    **kwargs,
) -> onnx.ModelProto:
    """Functional form of ``PruneChannelsPass``: the pruned model (``model`` itself when nothing
    was pruned).  Extra keyword arguments are the pass's (``global_ranking``, ``round_to``,
    ``exclude``, ``data``...)."""
    return PruneChannelsPass(ratio=ratio, criterion=criterion, mode=mode, **kwargs)(model).model

"""``graphprune prune MODEL -o OUT --ratio R ...``: structured channel pruning; ``format_groups``
is also what ``graphprune inspect --groups`` prints."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Callable, List, Optional

import numpy as np
import onnx

from graphprune.cli.budget_opts import add_budget_options, budget_plan, run_budget
from graphprune.cli.common import add_data_options, add_output_options, check_output_path, parse_number, read_inputs
from graphprune.cli.prune_blocks import add_block_options, remove_blocks_first, run_blocks, wants_blocks, with_budget
from graphprune.dependency import Group
from graphprune.errors import UserError
from graphprune.metrics import count_macs
from graphprune.model_io import load
from graphprune.passes.prune_channels import PruneChannelsPass, gc_paused
from graphprune.pruning import CRITERIA, MODES
from graphprune.validation import deferred_session_check

__all__ = ["register", "run", "format_groups", "groups_json", "nothing_pruned"]

_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
_CHUNK = 1 << 22  # finite checks in chunks of this many values: no second weight-sized array
# Attribute types that can hold tensors (Constant values, subgraphs' initializers).
_HOLDING_ATTRIBUTES = frozenset({onnx.AttributeProto.TENSOR, onnx.AttributeProto.TENSORS, onnx.AttributeProto.GRAPH,
                                 onnx.AttributeProto.GRAPHS, onnx.AttributeProto.SPARSE_TENSOR,
                                 onnx.AttributeProto.SPARSE_TENSORS})


def register(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="remove (or mask) whole channels of coupled groups: smaller and faster",
        description="Structured pruning on the ONNX graph: channels that must go together (a conv's "
        "outputs, its BatchNorm, the next conv's inputs, every branch of a residual Add...) form a group; "
        "the least important fraction of each group is removed. Output shapes never change. "
        "Transformers: whole attention heads, FFN neurons and (on request, lossy) the hidden size.",
    )
    p.add_argument("model", help="the ONNX model")
    add_output_options(p)
    p.add_argument("--ratio", metavar="R",
                   help="fraction of channels (and attention heads and FFN neurons) to prune, in [0, 1)")
    p.add_argument("--heads-ratio", metavar="R",
                   help="fraction of attention heads to prune, in [0, 1] (overrides --ratio; one head stays per layer)")
    p.add_argument("--ffn-ratio", metavar="R", help="fraction of FFN neurons to prune, in [0, 1) (overrides --ratio)")
    p.add_argument("--hidden-ratio", metavar="R",
                   help="fraction of the hidden size (residual stream) to prune, in [0, 1); lossy, off by default")
    p.add_argument("--head-dim", action="store_true",
                   help="prune the same dims inside every attention head (keeps the head count) instead of whole heads")
    p.add_argument("--criterion", default="l2", metavar="|".join(CRITERIA),
                   help="importance: l1/l2 weight magnitude (default l2), bn (BatchNorm scale), "
                   "activation (mean |activation| on --data), output (error its removal causes in the next "
                   "layers' outputs on --data: |W[:,c]|^2 E[x_c^2])")
    p.add_argument("--global", dest="global_ranking", action="store_true",
                   help="rank channels across groups instead of pruning R of every group")
    p.add_argument("--max-group-ratio", default="0.9", metavar="C",
                   help="with --global: no group loses more than this fraction (default 0.9)")
    p.add_argument("--round-to", type=int, default=1, metavar="N",
                   help="keep channel counts at multiples of N (at least one channel stays)")
    p.add_argument("--exclude", action="extend", nargs="+", default=[], metavar="NODE",
                   help="nodes whose inputs and outputs keep every channel (repeatable)")
    p.add_argument("--mode", default="remove", metavar="|".join(MODES),
                   help="remove the channels (default) or mask them (zero weights, shapes kept)")
    add_block_options(p)
    p.add_argument("--reconstruct", action="store_true",
                   help="after removal, refit each layer that lost input channels to the original's outputs on "
                   "--data (closed-form ridge regression, no training)")
    add_data_options(p, "calibration samples (.npz) for --criterion activation, --blocks or --reconstruct")
    p.add_argument("--stats", action="store_true", help="print the pass statistics as JSON")
    add_budget_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from graphprune.runtime import share_malloc_arena
    from graphprune.shapes import sharing_inference
    from graphprune.weights_on_disk import files_kept_open

    share_malloc_arena()  # the result's session check (a thread) reuses the memory the pass freed

    # Without data, blocks or budgets nothing runs the input in ORT: the door's session check of it
    # waits for the result's (validation.deferred_session_check; ~1 s a session on 20,000 nodes).
    # The shapes the full checks infer serve the analysis and the MAC counts (nothing edits a model
    # once checked); weights left on disk are read one at a time, and those the dependency graph
    # would cache anyway (below 1 MiB) once: the finite check's read serves the scoring, until the
    # pass is done (``done_reading``: the result holds what it keeps, and the runtime's session of
    # it reuses that memory). The cyclic collector waits for the end, as in the pass (0.14 s of
    # collections around it).
    with sharing_inference(), gc_paused(), contextlib.ExitStack() as reading:
        reading.enter_context(files_kept_open(keep_below=2**20))
        if args.data or wants_blocks(args) or any(getattr(args, f"target_{k}", None) for k in ("macs", "params", "latency")):
            return _run(args, reading.close)
        with deferred_session_check():
            return _run(args, reading.close)


def _run(args, done_reading: Callable[[], None]) -> int:
    if wants_blocks(args) and not with_budget(args):  # depth pruning: graphprune/cli/prune_blocks.py
        if args.reconstruct:
            raise UserError("--reconstruct refits layers after channel pruning: not with --blocks/--blocks-ratio")
        return run_blocks(args)
    # every argument is checked before the model is read or anything is written
    per_kind = {"--heads-ratio": args.heads_ratio, "--ffn-ratio": args.ffn_ratio, "--hidden-ratio": args.hidden_ratio}
    plan = budget_plan(args)  # --target-*, --group-ratios: per-group ratios instead of --ratio
    if args.ratio is None and all(v is None for v in per_kind.values()) and plan is None:
        raise UserError("give --ratio R (or a per-kind ratio: --heads-ratio, --ffn-ratio, --hidden-ratio), "
                        "or --blocks K / --blocks-ratio R for depth pruning")
    ratio = parse_number(args.ratio, "--ratio", 0.0, 1.0) if args.ratio is not None else 0.0
    kind_ratios = {flag: None if text is None else parse_number(text, flag, 0.0, 1.0, high_inclusive=flag == "--heads-ratio")
                   for flag, text in per_kind.items()}
    cap = parse_number(args.max_group_ratio, "--max-group-ratio", 0.0, 1.0, high_inclusive=True)
    if args.criterion not in CRITERIA:
        raise UserError(f"unknown --criterion {args.criterion!r} (choose from {', '.join(CRITERIA)})")
    if args.mode not in MODES:
        raise UserError(f"unknown --mode {args.mode!r} (choose from {', '.join(MODES)})")
    if args.criterion in ("activation", "output", "wanda") and not args.data:
        raise UserError(f"--criterion {args.criterion} needs calibration data: give --data FILE.npz")
    if args.round_to < 1:
        raise UserError(f"--round-to {args.round_to} must be at least 1")
    if args.reconstruct and not args.data:
        raise UserError("--reconstruct needs calibration data: give --data FILE.npz")
    if args.reconstruct and args.mode != "remove":
        raise UserError("--reconstruct refits layers whose channels were removed: not with --mode mask")
    check_output_path(args)
    # Channel pruning reads each weight when it scores, slices or masks it: the weights stay on disk
    # (records) and the untouched ones are copied file to file when the result is written; the
    # activation criterion's session maps them.  Depth pruning, budgets, reconstruction and the
    # output/wanda criteria load them.
    lazy = not (args.reconstruct or wants_blocks(args) or plan is not None or args.criterion in ("output", "wanda"))
    model, source_dir, finite = _load_leaving_weights(args.model) if lazy else (load(args.model), None, frozenset())
    data, shapes, _ = read_inputs(args, model)
    if with_budget(args):  # blocks first, then the budget (rescaled) or the ratios on what is left
        model, plan = remove_blocks_first(args, model, data, shapes, plan)
    if plan is not None and plan.target:
        return run_budget(args, plan, model, data, shapes, args.criterion, args.mode)
    prune = PruneChannelsPass(
        ratio=ratio,
        criterion=args.criterion,
        global_ranking=args.global_ranking,
        round_to=args.round_to,
        exclude=[n.strip() for item in args.exclude for n in item.split(",") if n.strip()],
        mode=args.mode,
        data=data,
        max_group_ratio=cap if cap > 0 else 1.0,
        progress=sys.stderr.isatty(),
        heads_ratio=kind_ratios["--heads-ratio"],
        ffn_ratio=kind_ratios["--ffn-ratio"],
        hidden_ratio=kind_ratios["--hidden-ratio"],
        head_dim=args.head_dim,
        group_ratios=plan.group_ratios if plan else None,
        source_dir=source_dir,
    )
    prune.requires(model)  # --exclude names are checked before the (possibly long) analysis
    result = prune(model)
    done_reading()
    asked = not prune.ratios.nothing or bool(plan and any(plan.group_ratios.values()))
    if not result.modified and asked:
        # a ratio was asked for and nothing at all could be pruned: say why instead of copying the model
        raise UserError(nothing_pruned(result.stats, prune.ratios))
    if args.reconstruct:
        from graphprune.passes.reconstruct import ReconstructPass, describe

        refit = ReconstructPass(original=model, data=data, progress=sys.stderr.isatty())(result.model)
        result.stats["reconstruct"] = refit.stats
        result = type(result)(refit.model, result.modified or refit.modified, result.stats)
    stats = result.stats
    print(_write_checked(args, result.model, source_dir, lambda: _summary(stats, model, result.model, shapes), finite))
    if args.reconstruct:
        print(describe(stats["reconstruct"]))
    if args.stats:
        print(json.dumps(stats, indent=2, default=str))
    print(f"wrote {args.output}" + ("" if result.modified else " (unchanged)"))
    return 0


def _load_leaving_weights(path: str):
    """(model, folder to read its weights left on disk from or None when none are, the records of
    the weights the door found finite), after what reading them at load would have refused: a data
    file reached through a symlink, NaN or Inf.  Tensors stored outside the main graph's
    initializers (Constant attributes, subgraphs) are read as before."""
    import os

    from graphprune.external_data import SymlinkedData, external_tensors
    from graphprune.validation import door_policy

    try:  # symlinks are refused while the records are checked, as reading them at load would
        model = load(path, load_external_data=False, direct_paths=True)
    except SymlinkedData:
        raise
    except UserError:  # e.g. the door's checker on a Constant's unread record: load it as before, its own verdict
        return load(path), None, frozenset()
    in_initializers = sum(1 for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL)
    # records can be elsewhere only in sparse initializers, functions and tensor or graph attributes:
    # without any, the whole-model walk (0.04 s on 20,000 nodes) has nothing more to find
    plain = not model.functions and not model.graph.sparse_initializer and not any(
        attr.type in _HOLDING_ATTRIBUTES for node in model.graph.node if node.attribute for attr in node.attribute)
    records = in_initializers if plain else sum(1 for _ in external_tensors(model))
    if not records:
        return model, None, frozenset()
    if records != in_initializers:
        return load(path), None, frozenset()
    source_dir = os.path.dirname(os.path.abspath(path))
    finite = set()  # the records read here, whole (their serialized form: same record, same bytes)
    if door_policy() is not None:  # the door refuses non-finite weights; those on disk were not read
        from graphprune.weights_on_disk import read_kept

        floats = [i for i in model.graph.initializer
                  if i.data_location == onnx.TensorProto.EXTERNAL and i.data_type in _FLOAT_TYPES]
        for init, value in zip(floats, read_kept(floats, source_dir)):  # never all in memory but those kept
            flat = value.reshape(-1)
            if flat.size <= _CHUNK:  # most weights: one call, no chunk loop
                ok = bool(np.isfinite(flat).all())
            else:
                ok = all(np.isfinite(flat[i : i + _CHUNK]).all() for i in range(0, flat.size, _CHUNK))
            if not ok:
                raise UserError(f"{path}: model weight {init.name!r} holds NaN or Inf values")
            finite.add(init.SerializeToString())
    return model, source_dir, frozenset(finite)


def _write_checked(args, model, source_dir: Optional[str], describe: Callable[[], str],
                   finite: "frozenset[bytes]" = frozenset()) -> str:
    """Check and write the result as ``write_model`` does, and return ``describe()`` (the summary).

    ``result_check.result_check`` runs the same checks (the full checker: exit 1 on failure; finite
    weights and an ORT session: exit 2); while the runtime builds its session on another thread
    (a second on 20,000 nodes), the checker runs, the summary is computed and the file written
    to its temporary place; it replaces ``-o`` only after the session's verdict.  A result whose untouched weights are still records in the input's data
    file (``source_dir``) is written as the same result loaded in memory would be: below
    protobuf's limit those records are read in and the model written inline; above, they are
    copied file to file.  Records among ``finite`` (the door read them whole and found them
    finite: ``_load_leaving_weights``) are not checked again once read in.
    """
    from graphprune import ir
    from graphprune.external_data import load_external_data
    from graphprune.model_io import EXTERNAL_DATA_THRESHOLD, _inline_bytes, save
    from graphprune.result_check import result_check

    options = {}
    checked: "frozenset[str]" = frozenset()
    inline = _inline_bytes(model) if source_dir is not None else None  # save counts them otherwise
    if inline is not None and inline >= EXTERNAL_DATA_THRESHOLD:
        options["source_dir"] = source_dir
    elif inline is not None:
        if ir.has_external_data(model):  # the untouched weights (few: most are sliced)
            if finite:
                checked = frozenset(i.name for i in model.graph.initializer
                                    if i.data_location == onnx.TensorProto.EXTERNAL and i.SerializeToString() in finite)
            load_external_data(model, args.model)
        options["external_data"] = False  # all inline, below the limit: what save would count again
    with result_check(model, finite_checked=checked) as verdict:
        text = describe()
        save(model, args.output, input_path=args.model, overwrite_input=args.overwrite_input,
             before_commit=verdict, **options)
    return text


def nothing_pruned(stats: dict, ratios=None, reason_chars: int = 80) -> str:
    """One line on why a pass that was asked to prune pruned nothing: its note, the kinds asked for
    that the model lacks, and each blocked kind with its group count and first reason.

    Args:
        stats: the ``PruneChannelsPass`` stats.
        ratios: its ``KindRatios``: tells "no group of the kinds asked for" from a ratio too small.
        reason_chars: each first reason is cut to this length.
    """
    note = (stats.get("note") or "no channel selected").replace("nothing prunable: ", "")
    prunable = stats.get("kinds", {})
    if ratios is not None and prunable and not any(ratios.for_kind(kind) > 0 for kind in prunable):
        note = "no prunable group of the kinds asked for (prunable: " + ", ".join(
            f"{kind} x{entry['groups']}" for kind, entry in prunable.items()) + ")"
    parts = [f"nothing pruned (graphprune inspect MODEL --groups lists why): {note}"]
    parts.extend(stats.get("notes", []))
    if stats.get("groups_excluded"):
        parts.append(f"{stats['groups_excluded']} group(s) excluded by --exclude")
    by_kind: dict = {}
    for b in stats.get("blocked", []):
        by_kind.setdefault(b["kind"], []).append(b)
    if by_kind:
        kinds = []
        for kind, blocked in by_kind.items():
            first = blocked[0]["reasons"][0] if blocked[0]["reasons"] else "no reason recorded"
            if len(first) > reason_chars:
                first = first[: reason_chars - 3] + "..."
            kinds.append(f"{kind} x{len(blocked)} (first: {first})")
        parts.append("blocked: " + ", ".join(kinds))
    return "; ".join(parts)  # the hint comes first: a long line is cut at its end


def _summary(stats: dict, before, after, shapes) -> str:
    lines = [
        f"groups: {stats['groups_found']} found, {stats['groups_prunable']} prunable, "
        f"{stats['groups_blocked']} blocked, {stats['groups_excluded']} excluded, {stats['groups_pruned']} pruned"
    ]
    if stats.get("note"):
        lines.append(f"nothing pruned: {stats['note']}")
        lines.extend(f"note: {n}" for n in stats.get("notes", []))
        for b in stats["blocked"][:5]:
            lines.append(f"  blocked ({b['channels']} ch, {', '.join(b['params'])}): {b['reasons'][0]}")
        return "\n".join(lines)
    lines.append(f"channels removed: {stats['channels_removed']:,}" + (" (masked)" if "params_zeroed" in stats else ""))
    kinds = stats.get("kinds", {})
    if set(kinds) - {"channels"}:
        lines.append("by kind: " + ", ".join(f"{k} {v['removed']:,} of {v['channels']:,} in {v['groups']} groups"
                                             for k, v in kinds.items()))
    lines.extend(f"note: {n}" for n in stats.get("notes", []))
    lines.append(f"params: {stats['params_before']:,} -> {stats['params_after']:,}"
                 + (f" ({stats['params_zeroed']:,} zeroed)" if "params_zeroed" in stats else ""))
    macs_before, macs_after = count_macs(before, shapes or None), count_macs(after, shapes or None)
    if macs_before and macs_after is not None:
        lines.append(f"MACs: {macs_before:,} -> {macs_after:,} ({macs_after / macs_before:.1%})")
    return "\n".join(lines)


def groups_json(groups: List[Group]) -> dict:
    return {
        "prunable": [g.describe() for g in groups if not g.blocked],
        "blocked": [g.describe() for g in groups if g.blocked],
    }


def format_groups(groups: List[Group], max_params: int = 4) -> str:
    """Prunable groups (channels, kind, member params) then blocked groups with their reasons."""
    prunable = [g for g in groups if not g.blocked]
    blocked = [g for g in groups if g.blocked]
    lines = [f"channel groups: {len(groups)} ({len(prunable)} prunable, {len(blocked)} blocked)"]

    def params(g: Group) -> str:
        names = g.param_names()
        more = f" +{len(names) - max_params} more" if len(names) > max_params else ""
        return ", ".join(names[:max_params]) + more

    if prunable:
        lines.append("prunable:")
        for g in prunable:
            lines.append(f"  #{g.id:<4} {g.channels:>5} ch  {g.kind:<8}  {params(g)}")
    if blocked:
        lines.append("blocked:")
        for g in blocked:
            channels = "?" if g.channels is None else g.channels
            lines.append(f"  #{g.id:<4} {channels:>5} ch  {g.kind:<8}  {params(g)}")
            for reason in g.reasons[:3]:
                lines.append(f"          - {reason}")
            if len(g.reasons) > 3:
                lines.append(f"          - ... {len(g.reasons) - 3} more")
    return "\n".join(lines)

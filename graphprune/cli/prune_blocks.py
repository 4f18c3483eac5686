"""``graphprune prune MODEL -o OUT --blocks K | --blocks-ratio R``: depth pruning, the part of ``prune``
that removes whole residual blocks (options added to the ``prune`` parser by ``add_block_options``)."""

from __future__ import annotations

import json
import os
import sys

from graphprune.cli.common import check_output_path, parse_number, read_inputs, write_model
from graphprune.errors import UserError

__all__ = ["add_block_options", "wants_blocks", "with_budget", "run_blocks", "remove_blocks_first"]

# The channel-pruning options that --blocks does not combine with (one kind of pruning per command).
_CHANNEL_OPTIONS = (("ratio", "--ratio"), ("heads_ratio", "--heads-ratio"), ("ffn_ratio", "--ffn-ratio"),
                    ("hidden_ratio", "--hidden-ratio"))
# The budget options it does combine with: the blocks go first, then the budget prunes the channels
# of what is left (on a small CNN per-node overhead is much of the time, and only depth removes nodes).
_BUDGET_OPTIONS = (("target_macs", "--target-macs"), ("target_params", "--target-params"),
                   ("target_latency", "--target-latency"), ("group_ratios", "--group-ratios"))


def add_block_options(parser) -> None:
    parser.add_argument("--blocks", metavar="K",
                        help="depth pruning: remove the K least important residual blocks (transformer layers, "
                        "identity-shortcut CNN blocks), importance 1 - cosine(block input, output) on --data "
                        "(seeded random inputs without it)")
    parser.add_argument("--blocks-ratio", metavar="R", help="depth pruning: remove this fraction of the residual blocks, in [0, 1)")


def wants_blocks(args) -> bool:
    return getattr(args, "blocks", None) is not None or getattr(args, "blocks_ratio", None) is not None


def with_budget(args) -> bool:
    """Depth pruning asked together with a budget or a ratios file (``remove_blocks_first``)."""
    return wants_blocks(args) and any(getattr(args, attr, None) is not None for attr, _ in _BUDGET_OPTIONS)


def _parse(args):
    if args.blocks is not None and args.blocks_ratio is not None:
        raise UserError("give --blocks K or --blocks-ratio R, not both")
    combined = [flag for attr, flag in _CHANNEL_OPTIONS if getattr(args, attr, None) is not None]
    if combined:
        raise UserError(f"--blocks/--blocks-ratio do not combine with {', '.join(combined)} in one command: remove "
                        "the blocks first, then run prune --ratio on the result (or give a budget: --target-macs...)")
    if args.mode != "remove":
        raise UserError("--blocks removes blocks; --mode mask applies to channel pruning only")
    if args.blocks is not None:
        try:
            count = int(args.blocks)
        except ValueError:
            raise UserError(f"--blocks {args.blocks!r} is not an integer") from None
        if count < 0:
            raise UserError(f"--blocks {count} must be 0 or more")
        return count, None
    return None, parse_number(args.blocks_ratio, "--blocks-ratio", 0.0, 1.0)


def run_blocks(args) -> int:
    """Depth pruning from the command line; a model with external data is pruned without reading its
    weights into memory (ONNX Runtime reads them for the importance run; the output copies them file
    to file), so the tool needs about the model's size once."""
    from graphprune import ir
    from graphprune.model_io import load
    from graphprune.passes.prune_blocks import PruneBlocksPass
    from graphprune.validation import check_session, door

    count, ratio = _parse(args)
    check_output_path(args)
    with door(need_session=False):  # the session check comes below, from the weights where they are
        model = load(args.model, load_external_data=False)
    folder = os.path.dirname(os.path.abspath(args.model))
    on_disk = ir.has_external_data(model)
    if not on_disk:
        check_session(model)
    data, shapes, _ = read_inputs(args, model)
    prune = PruneBlocksPass(blocks=count, ratio=ratio, data=data, input_shapes=shapes,
                            source_dir=folder if on_disk else None, progress=sys.stderr.isatty())
    try:
        result = prune(model)
    except UserError as exc:  # the pass names its options as the API does; say them as flags
        text = str(exc).replace("prune-blocks: ", "")
        raise UserError(text.replace("blocks asked for", "blocks asked for (--blocks)" if count is not None
                                     else "blocks asked for (--blocks-ratio)")) from None
    if on_disk:
        _write_from_disk(args, result.model, folder)
    else:
        write_model(args, result.model)
    print(summary(result.stats, model, result.model, shapes, macs=not on_disk))
    if args.stats:
        print(json.dumps(result.stats, indent=2, default=str))
    print(f"wrote {args.output}" + ("" if result.modified else " (unchanged)"))
    return 0


def remove_blocks_first(args, model, data, shapes, plan):
    """``--blocks K`` with a budget: remove the blocks, then hand the shallower model to the budget.

    The budget stays a fraction of the *input* model's cost: it is rescaled to the shallower model
    (MACs and params counted, latency measured on ONNX Runtime as the budget measures it), so
    ``--blocks 1 --target-macs 0.6`` writes a model with at most 60% of the input's MACs.  Blocks
    that alone meet the budget leave every channel.  Returns the shallower model and the plan.
    """
    from graphprune import ir
    from graphprune.metrics import count_macs
    from graphprune.passes.prune_blocks import PruneBlocksPass

    count, ratio = _parse(args)
    try:
        result = PruneBlocksPass(blocks=count, ratio=ratio, data=data, input_shapes=shapes,
                                 progress=sys.stderr.isatty())(model)
    except UserError as exc:
        raise UserError(str(exc).replace("prune-blocks: ", "")) from None
    shallow = result.model
    print(summary(result.stats, model, shallow, shapes))
    if plan is None or not plan.target:
        return shallow, plan
    kept = _cost_kept(plan.target, model, shallow, data, shapes, count_macs, ir.count_params)
    asked = plan.fraction
    plan.fraction = min(1.0, asked / kept) if kept > 0 else 1.0
    print(f"budget: the blocks removed leave {kept:.3f} of the {plan.target}; the channels are pruned to "
          f"{plan.fraction:.3f} of the rest ({asked:g} of the input model)")
    return shallow, plan


def _cost_kept(target, model, shallow, data, shapes, count_macs, count_params) -> float:
    """The fraction of ``model``'s MACs / params / latency that ``shallow`` keeps."""
    if target == "params":
        return count_params(shallow) / max(count_params(model), 1)
    if target == "macs":
        from graphprune.cli.budget_opts import batch_one_shapes
        from graphprune.sensitivity.run import feed_shapes

        probe = feed_shapes(data) if data is not None else batch_one_shapes(model, shapes)
        before, after = count_macs(model, probe or None), count_macs(shallow, probe or None)
        return after / before if before and after is not None else 1.0
    from graphprune.cli.budget_opts import batch_one_shapes
    from graphprune.data import random_inputs
    from graphprune.runtime import make_session
    from graphprune.sensitivity.measure import cpu_latency

    feed = data.first_batch(1) if data is not None else random_inputs(
        model, batch_one_shapes(model, shapes), samples=1, seed=0).first_batch(1)
    sessions = [make_session(m, threads=1, spinning=False) for m in (model, shallow)]
    base, after = cpu_latency(sessions, feed, 7, 20)
    return after / base


def _write_from_disk(args, model, folder: str) -> None:
    """Write a model whose weights are still in the input's data file: checked as structure, written
    by copying the surviving tensors file to file, then opened by ONNX Runtime from where it lies."""
    from graphprune.model_io import check_model, save
    from graphprune.passes.base import PassContractError
    from graphprune.runtime import ort

    try:
        check_model(model, full=True)
    except UserError as exc:
        raise PassContractError(f"refusing to write an invalid result: {exc}") from None
    save(model, args.output, input_path=args.model, overwrite_input=args.overwrite_input, source_dir=folder)
    rt = ort()
    options = rt.SessionOptions()
    options.graph_optimization_level = rt.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        rt.InferenceSession(args.output, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - whatever the runtime raises: our result is broken
        raise PassContractError(f"onnxruntime cannot load the written model {args.output}: "
                                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None


def summary(stats: dict, before, after, shapes, macs: bool = True) -> str:
    """Blocks found / removed, each block's kind and score (removed ones marked), params and MACs."""
    from graphprune.metrics import count_macs

    lines = [f"blocks: {stats['blocks_found']} found, {stats['blocks_removable']} removable, "
             f"{stats['blocks_removed']} removed"
             + (f" (importance 1 - cosine(input, output) on {stats['calibration']})" if "calibration" in stats else "")]
    removed = {e["index"] for e in stats.get("removed", [])}
    for e in stats["blocks"]:
        score = f"{e['score']:.4f}" if "score" in e else "-"
        mark = "removed" if e["index"] in removed else ("" if e["removable"] else f"kept: {e.get('reason', '')}")
        lines.append(f"  #{e['index']:<3} {e['kind']:<9} score {score:>8}  {e['name']}  {mark}".rstrip())
    if stats.get("note"):
        lines.append(f"note: {stats['note']}")
    before_params, after_params = stats["params_before"], stats["params_after"]
    lines.append(f"params: {before_params:,} -> {after_params:,} ({after_params / max(before_params, 1):.1%})")
    if macs and stats["blocks_removed"]:
        macs_before, macs_after = count_macs(before, shapes or None), count_macs(after, shapes or None)
        if macs_before and macs_after is not None:
            lines.append(f"MACs: {macs_before:,} -> {macs_after:,} ({macs_after / macs_before:.1%})")
    return "\n".join(lines)

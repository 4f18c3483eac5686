"""``graphprune inspect MODEL``: inputs/outputs, op counts, parameters, MACs."""

from __future__ import annotations

import json
import os

from graphprune.data import parse_input_shapes
from graphprune.metrics import model_stats
from graphprune.model_io import load, model_file_size


def register(sub) -> None:
    p = sub.add_parser("inspect", help="summarize a model: ops, params, MACs, inputs/outputs")
    p.add_argument("model", help="the ONNX model")
    p.add_argument("--input-shape", action="append", metavar="NAME=1x3x224x224",
                   help="concrete shape of a dynamic input, for MACs (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--groups", action="store_true",
                   help="list the channel groups structured pruning sees (kind: channels, heads, ffn, hidden): "
                   "prunable ones, blocked ones with reasons")
    p.add_argument("--head-dim", action="store_true", help="with --groups: attention head dims instead of whole heads")
    p.add_argument("--hidden", action="store_true",
                   help="with --groups: the hidden size as --hidden-ratio sees it (coupled through LayerNorm)")
    p.set_defaults(func=run)


def run(args) -> int:
    from graphprune.shapes import sharing_inference

    # The shapes the door's full check infers serve the MAC count and the group analysis (nothing
    # edits the model once checked): one inference of a 20,000-node graph, not two (0.2 s).
    with sharing_inference():
        return _run(args)


def _run(args) -> int:
    # the summary needs no weights: they stay on disk (sizes come from the external-data records)
    model = load(args.model, load_external_data=args.groups)
    if args.groups:
        from graphprune.cli.prune_cmd import format_groups, groups_json
        from graphprune.dependency import AnalysisOptions
        from graphprune.passes.prune_channels import analyze

        groups = analyze(model, AnalysisOptions(head_dim=args.head_dim, hidden=args.hidden))
        print(json.dumps(groups_json(groups), indent=2) if args.json else format_groups(groups))
        return 0
    stats = model_stats(model, parse_input_shapes(args.input_shape), size_bytes=model_file_size(args.model),
                        external_dir=os.path.dirname(os.path.abspath(args.model)))
    if args.json:
        print(json.dumps(stats.to_dict(), indent=2))
        return 0
    print(f"model: {args.model}  (IR {model.ir_version}, opsets "
          + ", ".join(f"{i.domain or 'ai.onnx'}:{i.version}" for i in model.opset_import) + ")")
    for kind, values in (("input", stats.inputs), ("output", stats.outputs)):
        for name, shape in values.items():
            print(f"  {kind:<7} {name}: [{', '.join(str(d) for d in shape)}]")
    print(f"params: {stats.params:,}   size: {stats.size_bytes:,} bytes   "
          f"MACs: {f'{stats.macs:,}' if stats.macs is not None else 'n/a (give --input-shape for dynamic inputs)'}")
    print(f"nodes: {stats.nodes}  ops: " + ", ".join(f"{op} {n}" for op, n in stats.ops.items()))
    return 0


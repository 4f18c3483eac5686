"""``graphprune run MODEL -o OUT --recipe FILE | --pass NAME[:k=v,...] ...``: run a pipeline."""

from __future__ import annotations

import json
import sys
import warnings

from graphprune.cli.common import add_data_options, add_output_options, check_output_path, read_inputs, write_model
from graphprune.errors import UserError
from graphprune.model_io import load
from graphprune.passes.base import registered_passes
from graphprune.recipes import build_pipeline, load_recipe, parse_pass_spec


def register(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run a pipeline of passes from a recipe or --pass options",
        description="Passes: " + ", ".join(sorted(registered_passes())),
    )
    p.add_argument("model", help="the ONNX model")
    add_output_options(p)
    p.add_argument("--recipe", metavar="FILE.yaml", help="a recipe file (or the name of one in passes/)")
    p.add_argument("--pass", dest="passes", action="append", metavar="NAME[:k=v,...]",
                   help="a pass and its arguments; repeat to chain (after the recipe's passes)")
    add_data_options(p, "samples (.npz) handed to passes that take data (calibration, fine-tuning)")
    p.add_argument("--stats", action="store_true", help="print per-pass statistics as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    specs = load_recipe(args.recipe) if args.recipe else []
    specs += [parse_pass_spec(text) for text in args.passes or []]
    if not specs:
        raise UserError("nothing to run: give --recipe FILE or at least one --pass NAME")
    check_output_path(args)
    model = load(args.model)
    data, shapes, _ = read_inputs(args, model)
    pipeline = build_pipeline(specs, context={"data": data, "input_shapes": shapes or None}, progress=sys.stderr.isatty())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = pipeline(model)
    for message in dict.fromkeys(str(w.message) for w in caught):  # a warning once, however many passes raise it
        print(f"graphprune run: warning: {message}", file=sys.stderr)
    write_model(args, result.model)
    for record in result.stats["passes"]:
        print(f"{record['pass']:<14} modified={str(record['modified']):<5} {record['seconds']:.3f}s")
    if args.stats:
        print(json.dumps(result.stats, indent=2, default=str))
    print(f"wrote {args.output}")
    return 0

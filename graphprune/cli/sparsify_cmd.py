"""``graphprune sparsify MODEL -o OUT --sparsity S [--pattern N:M] [--criterion wanda --data F.npz] ...``: prune individual weights."""

from __future__ import annotations

import os
import sys

from graphprune.cli.common import (
    add_output_options,
    read_inputs,
    add_report_option,
    check_output_path,
    check_report_path,
    parse_number,
    write_model,
    write_report,
)
from graphprune.errors import UserError
from graphprune.model_io import load
from graphprune.passes.sparsify_weights import SparsifyWeightsPass
from graphprune.runtime import share_malloc_arena
from graphprune.sparsity.report import file_sizes, format_sparsity_report
from graphprune.sparsity.targets import DEFAULT_OP_TYPES
from graphprune.validation import deferred_session_check
from graphprune.weights_on_disk import files_kept_open


def register(sub) -> None:
    p = sub.add_parser(
        "sparsify",
        help="zero small weights (unstructured or N:M), optionally stored compactly",
        description="Pruning of individual weights by magnitude, Wanda (|w| x input norm) or SparseGPT "
        "(OBS reconstruction), the last two from calibration data. Unstructured sparsity does not make ONNX "
        "Runtime faster on CPU: it shrinks the compressed file (with --storage sparse, or zip/gzip). "
        "N:M (e.g. 2:4) is the pattern sparse tensor cores run.",
    )
    p.add_argument("model", help="the ONNX model")
    add_output_options(p)
    p.add_argument("--sparsity", metavar="S", help="fraction of weights to zero, in [0, 1) "
                   "(required for unstructured; implied by N:M)")
    p.add_argument("--pattern", default="unstructured", metavar="unstructured|N:M",
                   help="unstructured (default) or N:M, e.g. 2:4 along the reduction axis")
    p.add_argument("--criterion", choices=("magnitude", "wanda", "sparsegpt"), default="magnitude",
                   help="magnitude (default), wanda (|w| x ||x||) or sparsegpt (prune + update the kept weights); "
                   "wanda and sparsegpt need --data")
    p.add_argument("--data", metavar="FILE.npz", help="calibration samples, one array per model input (wanda, sparsegpt)")
    p.add_argument("--compare", choices=("row", "layer"), default="row",
                   help="wanda: rank each output row's weights (default, as in the paper) or the whole layer's")
    p.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="calibration samples per ONNX Runtime run (default 8; memory is one batch of layer inputs)")
    p.add_argument("--scope", choices=("global", "layer"), default=None,
                   help="one threshold over all layers (capped per layer; default for magnitude) or per layer "
                   "(default for wanda/sparsegpt)")
    p.add_argument("--max-layer-sparsity", metavar="C",
                   help="global scope: no layer above this sparsity (default max(0.99, S))")
    p.add_argument("--op-types", default=",".join(DEFAULT_OP_TYPES), metavar="Conv,Gemm,MatMul",
                   help="op types whose weights are sparsified (also ConvTranspose)")
    p.add_argument("--exclude", action="extend", nargs="+", default=[], metavar="NODE",
                   help="node or weight names to leave untouched (repeatable, or comma-separated)")
    p.add_argument("--storage", choices=("dense", "sparse"), default="dense",
                   help="dense: zeros in place; sparse: non-zeros + 1-byte steps, rebuilt when ORT loads it")
    p.add_argument("--gzip-size", action="store_true",
                   help="also report the input and output files' gzip sizes (deflates both files: seconds per 100 MB)")
    add_report_option(p, "the per-layer report")
    p.set_defaults(func=run)


def run(args) -> int:
    # Every argument is checked before the model is read or anything written.
    sparsity = parse_number(args.sparsity, "--sparsity", 0.0, 1.0) if args.sparsity is not None else None
    cap = (parse_number(args.max_layer_sparsity, "--max-layer-sparsity", 0.0, 1.0)
           if args.max_layer_sparsity is not None else None)
    check_report_path(args)
    exclude = [name.strip() for item in args.exclude for name in item.split(",") if name.strip()]
    if args.criterion != "magnitude" and not args.data:
        raise UserError(f"--criterion {args.criterion} needs calibration data: give --data FILE.npz")
    if args.criterion == "magnitude" and args.data:
        raise UserError("--data is only used by --criterion wanda or sparsegpt")
    if args.compare != "row" and args.criterion != "wanda":
        raise UserError("--compare is only used by --criterion wanda")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be at least 1")
    placeholder = object()  # the samples are read after the model; every other check first
    sparsify = SparsifyWeightsPass(
        sparsity=sparsity,
        pattern=args.pattern,
        scope=args.scope,
        op_types=args.op_types,
        exclude=exclude,
        storage=args.storage,
        max_layer_sparsity=cap,
        criterion=args.criterion,
        group=args.compare,
        data=placeholder if args.data else None,
        batch_size=args.batch_size,
        progress=sys.stderr.isatty(),
    )
    check_output_path(args)
    share_malloc_arena()  # the result's session check (a thread) reuses the memory the pass freed
    # Magnitude runs nothing in the runtime: the door's session check of the input waits for the
    # result's (``validation.deferred_session_check``; ~1 s a session on 20,000 nodes).  The weights
    # on disk are read two or three times each (the global ranking): their file stays open.
    # (``shapes.sharing_inference`` saved no time here and kept 7 MB of the input's shapes.)
    with files_kept_open():
        if args.data:
            return _run(args, sparsify)
        with deferred_session_check():
            return _run(args, sparsify)


def _run(args, sparsify: SparsifyWeightsPass) -> int:
    # Weights left on disk are read one at a time (an LLM's 2 GB are never all in memory; save
    # streams the untouched ones across), for dense and compact storage alike.
    sparsify.source_dir = os.path.dirname(os.path.abspath(args.model))
    model = load(args.model, load_external_data=False)
    sparsify.data, _, _ = read_inputs(args, model)
    result = sparsify(model)
    stats = result.stats
    if sparsify.sparsity > 0 and not stats["layers"]:
        reasons = "; ".join(f"{s['node']}: {s['reason']}" for s in stats["skipped"][:3])
        raise UserError(
            f"no {'/'.join(sparsify.op_types)} weight could be sparsified"
            + (f" ({reasons})" if reasons else " (the model has no such layers with stored weights)")
        )
    write_model(args, result.model)
    sizes = {"input": file_sizes(args.model, sparsify.progress, gzip=args.gzip_size),
             "output": file_sizes(args.output, sparsify.progress, gzip=args.gzip_size)}
    print(format_sparsity_report(stats, sizes))
    write_report(args, {**stats, "sizes": sizes})
    print(f"wrote {args.output}")
    return 0

"""``graphprune quantize MODEL -o OUT``: int8 QDQ quantization placed where it pays on ONNX Runtime."""

from __future__ import annotations

import collections
import os
import sys
import warnings

from graphprune.cli import quantize_weight_only as weight_only
from graphprune.cli.common import (
    add_data_options,
    add_output_options,
    add_report_option,
    check_output_path,
    check_report_path,
    read_inputs,
    write_model,
    write_report,
)
from graphprune.errors import UserError
from graphprune.ir import has_external_data
from graphprune.model_io import load
from graphprune.quantization.config import ACTIVATION_TYPES, METHODS, QuantConfig, check_max_error
from graphprune.quantization.weight_only import ALGORITHMS, KERNELS

# Reasons listing more layers than this print the first few and a count.
_NAMES_SHOWN = 6


def register(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="int8 QDQ quantization, placed only where it makes ONNX Runtime faster",
        description="Calibrate on --data (or random inputs), insert QuantizeLinear/DequantizeLinear where "
        "int8 kernels pay for their borders, time the placements against float on ONNX Runtime (CPU time "
        "per run), write the fastest whose output error is not far above the best one's (int8 weight-only "
        "storage when int8 kernels do not pay).  With --weights-only, only the weights are stored in int8 or "
        "int4 and activations stay float (--kernel: which kernel reads them).",
    )
    p.add_argument("model", help="the float ONNX model")
    add_output_options(p)
    add_data_options(p, "calibration samples as .npz, one array per model input (first axis = samples)")
    p.add_argument("--method", choices=METHODS, default="minmax", help="calibration method (default minmax)")
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor, not per channel")
    p.add_argument("--activation-type", choices=ACTIVATION_TYPES, default="uint8",
                   help="activation type (default uint8, asymmetric: the x86 fast path)")
    p.add_argument("--max-error", metavar="E", help="relative L2 output error budget on --data (mixed precision)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="NODE", help="node names that stay float")
    p.add_argument("--op-types", nargs="+", metavar="OP", help="only quantize these op types (e.g. Conv MatMul)")
    p.add_argument("--no-measure", dest="measure", action="store_false",
                   help="trust the cost model instead of timing candidates on ONNX Runtime")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for the timing (default 1)")
    p.add_argument("--calibration-samples", type=int, default=64, help="samples used to calibrate (default 64)")
    p.add_argument("--weights-only", choices=("int8", "int4"),
                   help="store only the weights quantized (activations stay float): int8 per output channel, "
                   "int4 in blocks along K as MatMulNBits; embedding tables too")
    p.add_argument("--block-size", type=int, metavar="B",
                   help="int4 block length along K: 16, 32, 64, 128 or 256 (default 32)")
    p.add_argument("--algorithm", choices=ALGORITHMS,
                   help="how int4 weights are chosen: rtn (round to nearest, default), awq (activation-aware "
                   "scales) or gptq (error compensation); awq and gptq need --data")
    p.add_argument("--kernel", choices=KERNELS,
                   help="the kernel int4/int8 weight-only MatMul/Gemm weights are written for: auto (default: both "
                   "timed on one layer on this machine), matmulnbits (int8 as DequantizeLinear, which ONNX Runtime "
                   "fuses into 8-bit MatMulNBits; on x86 fastest for a few rows, e.g. decoding), int8 "
                   "(DynamicQuantizeMatMul, int4 expanded to int8 at load; fastest for many rows, e.g. a prompt) "
                   "or dispatch (int4 only: one If runs MatMulNBits for a one-row input and the int8 kernel "
                   "otherwise, the weights stored once; its session needs more memory while it loads)")
    p.add_argument("--int4-kernel", choices=KERNELS, help="the old spelling of --kernel, int4 only")
    add_report_option(p, "the placement report")
    p.set_defaults(func=run)


def run(args) -> int:
    from graphprune.passes.insert_qdq import InsertQDQPass

    if args.weights_only:
        return weight_only.run(args)
    weight_only.refuse_weight_options(args)
    max_error = check_max_error(args.max_error)
    if max_error is not None and not args.data:
        raise UserError("--max-error needs --data (the budget is measured on real samples)")
    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    QuantConfig(args.method, not args.per_tensor, args.activation_type, args.calibration_samples)
    check_output_path(args)
    check_report_path(args)
    # Weights in an external-data file stay there: copies of the model are then only its graph,
    # the runtime maps the file, and each weight is read when it is quantized (bounded memory).
    model = load(args.model, load_external_data=False)
    source_dir = os.path.dirname(os.path.abspath(args.model)) if has_external_data(model) else None
    data, shapes, _ = read_inputs(args, model)
    quantize = InsertQDQPass(
        data=data,
        method=args.method,
        per_channel=not args.per_tensor,
        activation_type=args.activation_type,
        max_error=max_error,
        exclude=args.exclude,
        op_types=args.op_types,
        input_shapes=shapes or None,
        measure=args.measure,
        threads=args.threads,
        calibration_samples=args.calibration_samples,
        progress=sys.stderr.isatty(),
        source_dir=source_dir,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = quantize(model)
    for message in dict.fromkeys(str(w.message) for w in caught):  # once, however many candidates raise it
        print(f"graphprune quantize: warning: {message}", file=sys.stderr)
    if not result.modified:  # int8 kernels pay nowhere: a smaller file is still what was asked for
        result = weight_only.fallback(args, model, result)
    write_model(args, result.model)
    print(format_summary(result.stats, result.modified))
    if result.stats.get("fallback"):
        print(weight_only.format_fallback(result.stats["fallback"]))
    write_report(args, result.stats)
    print(f"wrote {args.output}")
    return 0


def format_summary(stats: dict, modified: bool) -> str:
    """Chosen placement, candidate latencies and errors, and the layers that stayed float grouped by reason."""
    lines = []
    threads = stats.get("threads")
    if stats.get("float_latency_ms") is not None:
        lines.append(f"CPU time per run ({threads} thread{'s' if threads != 1 else ''}, median of interleaved runs): "
                     f"float {stats['float_latency_ms']:.3f} ms")
        for name, cand in stats["candidates"].items():
            speedup = stats["float_latency_ms"] / cand["latency_ms"] if cand.get("latency_ms") else float("nan")
            lines.append(
                f"  {name:<13} {cand['latency_ms']:.3f} ms ({speedup:.2f}x)  int8 nodes {cand['int8_nodes']:<4} "
                f"rel L2 error {cand['error']:.4g}"
            )
    for name, reason in stats.get("discarded", {}).items():
        lines.append(f"  {name:<13} discarded: {reason}")
    if modified and stats.get("fallback"):
        lines.append("int8 does not make this model faster on ONNX Runtime: no int8 kernels placed")
    elif modified:
        ops = ", ".join(f"{op} {n}" for op, n in stats["quantized_ops"].items())
        lines.append(f"chosen: {stats['chosen']}: {stats['nodes_quantized']} nodes in int8 ({ops}); "
                     f"output rel L2 error {stats['error']:.4g}")
    else:
        lines.append("int8 does not make this model faster on ONNX Runtime: the float model is written unchanged")
    by_reason = collections.defaultdict(list)
    for name, reason in stats["float_layers"].items():
        by_reason[reason.split(" (est.")[0]].append(name)  # group without the per-layer estimates
    if by_reason:
        lines.append("layers kept float:")
        for reason, names in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(names[:_NAMES_SHOWN]) + (f" (+{len(names) - _NAMES_SHOWN} more)" if len(names) > _NAMES_SHOWN else "")
            lines.append(f"  {len(names):>3} x {reason}: {shown}")
    return "\n".join(lines)

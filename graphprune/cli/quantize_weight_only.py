"""``graphprune quantize --weights-only int8|int4``, and the int8 weight-only fallback of static quantization."""

from __future__ import annotations

import os

from graphprune.cli.common import check_output_path, check_report_path, read_inputs, write_model, write_report
from graphprune.errors import UserError
from graphprune.passes.base import PassResult

__all__ = ["run", "fallback", "format_fallback", "refuse_weight_options"]

# Options of static int8 quantization that mean nothing for weight-only storage.
_STATIC_ONLY = (("max_error", "--max-error"), ("exclude", "--exclude"), ("op_types", "--op-types"),
                ("per_tensor", "--per-tensor"))


def refuse_weight_options(args) -> None:
    """Static int8: --block-size and --algorithm belong to --weights-only."""
    for attr, flag in (("block_size", "--block-size"), ("algorithm", "--algorithm")):
        if getattr(args, attr, None) is not None:
            raise UserError(f"{flag} applies to --weights-only int4")


def _settings(args):
    bits = 4 if args.weights_only == "int4" else 8
    if bits == 8:
        for attr, flag in (("block_size", "--block-size"), ("algorithm", "--algorithm")):
            if getattr(args, attr, None) is not None:
                raise UserError(f"{flag} applies to --weights-only int4 (int8 is per output channel, rounded to nearest)")
    for attr, flag in _STATIC_ONLY:
        if getattr(args, attr, None):
            raise UserError(f"{flag} applies to static int8 quantization, not --weights-only")
    algorithm = args.algorithm or "rtn"
    if algorithm != "rtn" and not args.data:
        raise UserError(f"--algorithm {algorithm} needs calibration data (--data FILE.npz)")
    return bits, 32 if args.block_size is None else args.block_size, algorithm


def run(args) -> int:
    """Weight-only quantization: weights read one at a time (from disk when external), one copy held."""
    from graphprune.model_io import load
    from graphprune.passes.quantize_weights import QuantizeWeightsPass
    from graphprune.quantization.weight_only import check_block_size

    bits, block_size, algorithm = _settings(args)
    check_block_size(block_size)
    check_output_path(args)
    check_report_path(args)
    model = load(args.model, load_external_data=False)  # weights on disk stay there until read
    data, _, _ = read_inputs(args, model) if args.data else (None, None, None)
    source_dir = os.path.dirname(os.path.abspath(args.model))
    result = QuantizeWeightsPass(bits=bits, block_size=block_size, algorithm=algorithm, data=data,
                                 source_dir=source_dir)(model)
    if not result.modified:
        raise UserError(f"--weights-only {args.weights_only}: the model has no MatMul, Gemm, Conv or embedding "
                        "weight to quantize (nothing written)")
    del model
    write_model(args, result.model)
    print(format_weights(result.stats))
    write_report(args, result.stats)
    print(f"wrote {args.output}")
    return 0


def fallback(args, model, static: PassResult) -> PassResult:
    """When no int8 kernel pays, the weights are still stored in int8 (about 4x smaller, float speed).

    ``static`` is the static pass's result (``modified=False``); its stats are kept and the weight-only
    stats added under "fallback".  A model without quantizable weights stays as it was.
    """
    from graphprune.passes.quantize_weights import QuantizeWeightsPass

    source_dir = os.path.dirname(os.path.abspath(args.model))
    result = QuantizeWeightsPass(bits=8, source_dir=source_dir)(model)
    if not result.modified:
        return static
    stats = dict(static.stats)
    stats["fallback"] = result.stats
    stats["chosen"] = "int8 weight-only storage"
    return PassResult(result.model, True, stats)


def format_fallback(stats: dict) -> str:
    before, after = stats["float_bytes"], stats["quantized_bytes"]
    return (f"falling back to int8 weight-only storage: {stats['weights_quantized']} weights in int8 per channel "
            f"({before / 1e6:.3f} MB -> {after / 1e6:.3f} MB of weights, {before / max(after, 1):.1f}x smaller); "
            "activations stay float, so it runs at the float model's speed")


def format_weights(stats: dict) -> str:
    before, after = stats["float_bytes"], stats["quantized_bytes"]
    formats = ", ".join(f"{kind} {n}" for kind, n in stats["formats"].items())
    lines = [f"weight-only int{stats['bits']}"
             + (f" (block {stats['block_size']}, {stats['algorithm']})" if stats["bits"] == 4 else " (per channel)")
             + f": {stats['weights_quantized']} weights ({formats}); {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB "
             f"of weights ({before / max(after, 1):.2f}x smaller)"]
    for name, reason in list(stats["skipped"].items())[:6]:
        lines.append(f"  {name}: {reason}")
    if len(stats["skipped"]) > 6:
        lines.append(f"  (+{len(stats['skipped']) - 6} more)")
    return "\n".join(lines)

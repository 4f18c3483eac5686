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
    """Static int8: --block-size, --algorithm and the kernel options belong to --weights-only."""
    for attr, flag in (("block_size", "--block-size"), ("algorithm", "--algorithm"), ("int4_kernel", "--int4-kernel")):
        if getattr(args, attr, None) is not None:
            raise UserError(f"{flag} applies to --weights-only int4")
    if getattr(args, "kernel", None) is not None:
        raise UserError("--kernel applies to --weights-only int8|int4 (static int8 places its own QDQ kernels)")


def _settings(args):
    bits = 4 if args.weights_only == "int4" else 8
    if bits == 8:
        for attr, flag in (("block_size", "--block-size"), ("algorithm", "--algorithm")):
            if getattr(args, attr, None) is not None:
                raise UserError(f"{flag} applies to --weights-only int4 (int8 is per output channel, rounded to nearest)")
        if getattr(args, "int4_kernel", None) is not None:
            raise UserError("--int4-kernel applies to --weights-only int4 (use --kernel for int8)")
    for attr, flag in _STATIC_ONLY:
        if getattr(args, attr, None):
            raise UserError(f"{flag} applies to static int8 quantization, not --weights-only")
    algorithm = args.algorithm or "rtn"
    if algorithm != "rtn" and not args.data:
        raise UserError(f"--algorithm {algorithm} needs calibration data (--data FILE.npz)")
    return bits, 32 if args.block_size is None else args.block_size, algorithm


def run(args) -> int:
    """Weight-only quantization: weights read one at a time (from disk when external), one copy held."""
    from graphprune.ir import has_external_data
    from graphprune.model_io import load
    from graphprune.passes.quantize_weights import QuantizeWeightsPass
    from graphprune.quantization.weight_only import check_block_size

    bits, block_size, algorithm = _settings(args)
    check_block_size(block_size)
    check_output_path(args)
    check_report_path(args)
    model = load(args.model, load_external_data=False)  # weights on disk stay there until read
    external = has_external_data(model)
    data, _, _ = read_inputs(args, model) if args.data else (None, None, None)
    source_dir = os.path.dirname(os.path.abspath(args.model))
    result = QuantizeWeightsPass(bits=bits, block_size=block_size, algorithm=algorithm, data=data,
                                 source_dir=source_dir, kernel=getattr(args, "kernel", None),
                                 int4_kernel=getattr(args, "int4_kernel", None))(model)
    if not result.modified:
        raise UserError(f"--weights-only {args.weights_only}: the model has no MatMul, Gemm, Conv or embedding "
                        "weight to quantize (nothing written)")
    del model
    # Weights on disk in, weights on disk out: ONNX Runtime then maps them instead of holding the
    # parsed file's copy (0.5B Llama, int8 kernel: session peak 1.77 -> 1.49 GB).
    write_model(args, result.model, external_data=True if external else None)
    print(format_weights(result.stats))
    write_report(args, result.stats)
    print(f"wrote {args.output}")
    return 0


def fallback(args, model, static: PassResult) -> PassResult:
    """When no int8 kernel pays, the weights are still stored in int8 (about 4x smaller, float speed).

    The model is first brought to its storage form (``storage_form``: BatchNormalization folded,
    Constant nodes as initializers), then every weight whose int8 form is smaller is stored in int8
    per channel as Cast and Mul, which ONNX Runtime folds back into a float weight when it loads
    the model: the float model's speed and math, rounded weights; then ``weight_storage.compact``
    packs the int8 weights and the scales and biases by shape (float16 where it rounds little;
    Cast, Mul and Split folded at load too), drops default attributes and duplicate constants and
    gives every tensor but the graph's inputs and outputs a short name.  ``static`` is the static pass's
    result (``modified=False``); its stats are kept and the weight-only stats added under
    "fallback".  A model without quantizable weights stays as it was.
    """
    from graphprune.ir import has_external_data, is_large
    from graphprune.passes.quantize_weights import QuantizeWeightsPass
    from graphprune.quantization.weight_storage import compact

    source_dir = os.path.dirname(os.path.abspath(args.model))
    # Weights left on disk are streamed by the weight-only pass; folding needs them in memory.
    prepared, folded = (model, 0) if has_external_data(model) else storage_form(model)
    result = QuantizeWeightsPass(bits=8, source_dir=source_dir, folded=True)(prepared)
    if not result.modified:
        return static
    # Packed float16 scales and biases, short names, no defaults: fewer bytes, the same optimized graph.
    compacted = {} if has_external_data(model) else compact(result.model)
    stats = dict(static.stats)
    stats["fallback"] = dict(result.stats, batchnorms_folded=folded, compacted=compacted)
    if not is_large(model):  # serialized sizes, cheap for a model of this size
        stats["fallback"]["model_bytes"] = [model.ByteSize(), result.model.ByteSize()]
    stats["chosen"] = "int8 weight-only storage"
    return PassResult(result.model, True, stats)


def storage_form(model):
    """(the model as int8 storage wants it, the number of BatchNormalizations folded).

    Constant nodes become initializers, constant subgraphs are folded and dead nodes dropped
    (``CanonicalizePass``); each BatchNormalization after a Conv is folded into it
    (``prepare.fold_batchnorms``), so its four parameter vectors become one bias and the weight it
    scaled is stored in int8; value_info the input did not have (shape inference's) is dropped:
    bytes the file does not need.  The outputs are those of ``model``, which is not modified.
    """
    from graphprune.passes.canonicalize import CanonicalizePass
    from graphprune.quantization.prepare import fold_batchnorms

    canonical = CanonicalizePass()(model)
    prepared = fold_batchnorms(canonical.model, copy=not canonical.modified)  # never the caller's proto
    annotated = {vi.name for vi in model.graph.value_info}
    kept = [vi for vi in prepared.graph.value_info if vi.name in annotated]
    del prepared.graph.value_info[:]
    prepared.graph.value_info.extend(kept)
    count = sum(1 for n in model.graph.node if n.op_type == "BatchNormalization")
    return prepared, count - sum(1 for n in prepared.graph.node if n.op_type == "BatchNormalization")


def format_fallback(stats: dict) -> str:
    before, after = stats["float_bytes"], stats["quantized_bytes"]
    folded = f", {stats['batchnorms_folded']} BatchNormalization folded into Conv" if stats.get("batchnorms_folded") else ""
    compacted = stats.get("compacted", {})
    if compacted.get("float16_constants"):
        folded += f", {compacted['float16_constants']} scales and biases in float16"
    if compacted.get("renamed_tensors"):
        folded += f", {compacted['renamed_tensors']} tensors renamed short (graph inputs and outputs kept)"
    line = (f"falling back to int8 weight-only storage: {stats['weights_quantized']} weights in int8 per channel{folded} "
            f"({before / 1e6:.3f} MB -> {after / 1e6:.3f} MB of weights, {before / max(after, 1):.1f}x smaller")
    if stats.get("model_bytes"):
        line += f"; model {stats['model_bytes'][0]:,} -> {stats['model_bytes'][1]:,} bytes"
    return line + "); activations stay float and the weights are dequantized at load: the float model's speed"


def format_weights(stats: dict) -> str:
    before, after = stats["float_bytes"], stats["quantized_bytes"]
    formats = ", ".join(f"{kind} {n}" for kind, n in stats["formats"].items())
    lines = [f"weight-only int{stats['bits']}"
             + (f" (block {stats['block_size']}, {stats['algorithm']}, {stats['kernel']} kernel)" if stats["bits"] == 4
                else f" (per channel, {stats['kernel']} kernel)")
             + f": {stats['weights_quantized']} weights ({formats}); {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB "
             f"of weights ({before / max(after, 1):.2f}x smaller)"]
    if stats.get("kernel_choice"):
        lines.append(f"  kernel {stats['kernel']} (--kernel auto): {stats['kernel_choice']['reason']}")
    for name, reason in list(stats["skipped"].items())[:6]:
        lines.append(f"  {name}: {reason}")
    if len(stats["skipped"]) > 6:
        lines.append(f"  (+{len(stats['skipped']) - 6} more)")
    return "\n".join(lines)

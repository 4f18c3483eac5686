"""Weight-only quantization pass: int8 per-channel DequantizeLinear, int4 MatMulNBits / QDQ, quantized embeddings.

onnxruntime's ``quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`` is reused for what
serves (its C++ block quantizer ``quantize_matmul_4bits`` does our RTN, and its output format is
what we write), not as a whole: it imports ``onnx_ir`` (not a dependency here), holds the whole
model with every weight in memory and saves it through ``onnx.save`` (a 2 GB model needs several
times its size, against our 1.5x goal), rewrites MatMul only (not Gemm with transB, nor Conv), and
its GPTQ needs Intel's neural-compressor.  So the graph walk, the streaming of weights from external
data, Gemm, int8 per channel, AWQ and GPTQ are ours (``quantization/weight_targets.py``, ``weight_nodes.py``,
``quantization/weight_only.py``).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np
import onnx

from graphprune import ir
from graphprune.errors import UserError
from graphprune.passes.base import Pass, PassResult, register_pass
from graphprune.quantization import weight_only as wo
from graphprune.quantization.prepare import is_quantized
from graphprune.quantization.weight_nodes import Rewriter
from graphprune.quantization.weight_targets import Target, constant_tensors, find_targets

__all__ = ["QuantizeWeightsPass", "quantize_weights"]


@register_pass
class QuantizeWeightsPass(Pass):
    """Store weights in int8 or int4; activations stay float (the file shrinks, the math stays float).

    Handles, in the main graph, constant weights of:
    - MatMul (input B, 2-D) and Gemm (input B; int4 only when ``transA`` is 0, ``alpha`` 1 and C, if
      any, is added with ``beta`` 1): int8 symmetric per output channel through DequantizeLinear
      (ONNX Runtime fuses it with the MatMul into 8-bit ``MatMulNBits``) or read as it is by
      com.microsoft ``DynamicQuantizeMatMul`` (``kernel``), or Cast and Mul with ``folded``;
      int4 symmetric in blocks of ``block_size`` along K as com.microsoft ``MatMulNBits`` when the
      runtime runs it (probed), else as opset-21 blocked DequantizeLinear -> MatMul, or in the int8
      kernel's form (``kernel``);
    - Conv (input W): int8 per output channel in both modes (no int4 convolution kernel exists), as
      Cast and Mul, which ONNX Runtime folds into a float weight at load (float speed);
    - embedding tables (Gather axis 0 on a 2-D initializer): int8 per row (Gather of the int8 rows
      and of their scales, then a multiply: the table is never dequantized whole), or with int4
      com.microsoft ``GatherBlockQuantized`` when the runtime runs it and the width divides into
      blocks.
    A weight is quantized once even when several nodes read it; one read by nodes of different
    kinds, or as anything but their weight, stays float (``stats["skipped"]`` says why), and so do
    weights whose int8 form with its scales and nodes would not be smaller (biases, tiny weights).

    int4 weights are chosen by ``algorithm``: "rtn" (round to nearest, onnxruntime's own kernel),
    "awq" (activation-aware scales: the rows multiplying large inputs are scaled up before rounding,
    the input divided by the same scale through one inserted Mul per shared input) or "gptq" (each
    row's rounding error compensated on the remaining rows through the input's Hessian).  Both need
    ``data``.

    Weights left on disk (external data, loaded without it) are read one tensor at a time from
    ``source_dir``, so peak memory is about the output plus the largest weight; tensors that stay
    float are read into the result too (it holds all its weights in memory).

    Refuses: a model already quantized; int4 when no MatMul/Gemm weight can take it; AWQ/GPTQ
    without data or with int8; block sizes the kernels do not take; ``kernel`` and ``int4_kernel``
    disagreeing, ``int4_kernel`` with int8, the int8 or dispatch kernel with GPTQ, dispatch with int8
    or on a runtime without its kernels.

    Args:
        bits: 8 or 4.
        block_size: int4 block length along K (16, 32, 64, 128 or 256).
        algorithm: "rtn", "awq" or "gptq".
        data: calibration samples for AWQ/GPTQ (an ``InputSet`` or iterable of feeds).
        source_dir: the folder the model was loaded from (for weights left on disk).
        embeddings: also quantize embedding tables.
        accuracy_level: ``MatMulNBits``' accuracy_level (4: int8 activations inside the kernel, the
            fast path on x86; 0: float activations).
        kernel: the kernel MatMul/Gemm weights are written for.  "matmulnbits": int4 as
            ``MatMulNBits``, int8 as DequantizeLinear (fused by ONNX Runtime into 8-bit
            ``MatMulNBits``); on x86 the fastest for a few rows, e.g. decoding.  "int8": read by
            com.microsoft ``DynamicQuantizeMatMul`` (integer GEMM, activations quantized per
            tensor at run time): int8 weights as they are, int4 values with integer block
            multipliers expanded into int8 at load (``quantization/weight_int8_kernel.py``; RTN
            and AWQ only); fastest for many rows, e.g. a prompt.  "dispatch" (int4, RTN and AWQ):
            both, behind one ``If`` on "the input holds one row", from one stored copy of the
            weights (``quantization/weight_dispatch.py``; the model raised to opset 21).  "auto"
            (default): both timed on one layer of the model's shape on this machine
            (``quantization/kernel_choice.py``; "dispatch" when they trade places; GPTQ takes
            ``MatMulNBits``).
        int4_kernel: the old name of ``kernel`` (int4 only).
        folded: every int8 weight as Cast and Mul, folded into a float weight when ONNX Runtime
            loads the model: a smaller file at float speed and with float math (static
            quantization's fallback), instead of int8 kernels for MatMul/Gemm (``kernel`` unused).
    """

    name = "quantize_weights"

    def __init__(self, bits: int = 8, block_size: int = 32, algorithm: str = "rtn", data=None,
                 source_dir: Optional[str] = None, embeddings: bool = True, accuracy_level: int = 4,
                 folded: bool = False, kernel: Optional[str] = None, int4_kernel: Optional[str] = None):
        if bits not in (4, 8):
            raise UserError(f"weight-only quantization takes int8 or int4, not {bits} bits")
        if algorithm not in wo.ALGORITHMS:
            raise UserError(f"--algorithm {algorithm!r}: choose one of {', '.join(wo.ALGORITHMS)}")
        if algorithm != "rtn" and bits != 4:
            raise UserError(f"--algorithm {algorithm} chooses int4 weights; int8 per channel is rounded to nearest")
        kernel = _kernel_option(bits, kernel, int4_kernel)
        if kernel in ("int8", "dispatch") and algorithm == "gptq":
            raise UserError(f"--algorithm gptq chooses float block scales, which the {kernel} kernel's form cannot "
                            "hold; use --kernel matmulnbits or --algorithm rtn|awq")
        if kernel == "dispatch" and bits != 4:
            raise UserError("--kernel dispatch applies to --weights-only int4 "
                            "(int8's two kernels are as fast at one row)")
        if algorithm != "rtn" and data is None:
            raise UserError(f"--algorithm {algorithm} needs calibration data (--data FILE.npz)")
        self.bits = bits
        self.block_size = wo.check_block_size(int(block_size))
        self.algorithm = algorithm
        self.data = data
        self.source_dir = None if source_dir is None else os.fspath(source_dir)
        self.embeddings = embeddings
        self.accuracy_level = int(accuracy_level)
        self.folded = bool(folded)
        self.kernel = kernel

    def requires(self, model: onnx.ModelProto) -> None:
        found = is_quantized(model)
        if found:
            raise UserError(f"the model is already quantized (it contains {found}); quantize the float model instead")

    def call(self, model: onnx.ModelProto) -> PassResult:
        targets, skipped = find_targets(model, self.bits, self.block_size, self.embeddings)
        if self.bits == 4 and not any(t.kind in ("matmul", "gemm") and t.bits == 4 for t in targets.values()):
            raise UserError("--weights-only int4: the model has no MatMul/Gemm weight to store in int4 "
                            "(int4 kernels exist for MatMul and embeddings only; use int8)")
        if not targets:
            return PassResult(model, False, {"weights_quantized": 0, "skipped": skipped})
        kernel, choice = self._kernel(model, targets)
        original = model
        if kernel == "dispatch":
            model = _for_dispatch(model)
            targets, skipped = find_targets(model, self.bits, self.block_size, self.embeddings)
        scales = self._data_aware(original, targets) if self.algorithm != "rtn" else {}
        originals = ir.initializer_map(original.graph) if model is not original else None
        rewriter = Rewriter(model, self.source_dir, self.block_size, self.accuracy_level, self.folded, kernel, originals)
        for target in targets.values():
            rewriter.quantize(target, self.algorithm, scales.get(target.name))
        result = rewriter.build()
        stats = rewriter.stats()
        stats.update({"bits": self.bits, "block_size": self.block_size if self.bits == 4 else None,
                      "kernel": kernel, "algorithm": self.algorithm, "skipped": skipped})
        if choice:
            stats["kernel_choice"] = choice
        if self.bits == 4:  # the keys' old names, for readers of earlier reports
            stats["int4_kernel"] = kernel
            if choice:
                stats["int4_kernel_choice"] = choice
        return PassResult(result, True, stats)

    def _kernel(self, model: onnx.ModelProto, targets: Dict[str, Target]):
        """(the kernel MatMul/Gemm weights are written for, how "auto" decided it or None; the kernel is
        None when ``folded``: every int8 weight is then dequantized at load)."""
        if self.folded:
            return None, None
        if self.kernel != "auto":
            return self.kernel, None
        if self.algorithm == "gptq":
            return "matmulnbits", {"reason": "GPTQ's float block scales fit MatMulNBits only"}
        from graphprune.quantization.kernel_choice import choose_kernel, probe_shape

        tensors = constant_tensors(model)
        shapes = [(t.k, int(tensors[t.name].dims[0 if t.transposed else 1])) for t in targets.values()
                  if t.bits == self.bits and t.kind in ("matmul", "gemm")
                  and tensors[t.name].data_type == onnx.TensorProto.FLOAT]
        if not shapes:  # nothing either kernel would read (Conv and embeddings only, float16 weights)
            return "matmulnbits", None
        block = self.block_size if self.bits == 4 else 1  # int4's int8 form needs K in whole blocks
        if not any(k % block == 0 for k, _ in shapes):
            return "matmulnbits", {"reason": f"no weight's K is a whole number of blocks of {self.block_size} "
                                             "(the int8 kernel's form needs it)"}
        return choose_kernel(self.bits, *probe_shape(shapes, block), self.block_size, self.accuracy_level,
                             dispatch=self.bits == 4 and _dispatch_fits(model))

    def _data_aware(self, model: onnx.ModelProto, targets: Dict[str, Target]) -> Dict[str, dict]:
        """Per int4 weight: {"awq_scale": s} or {"hessian": H}, from one run over the data."""
        from graphprune.quantization.weight_stats import collect_input_stats

        int4 = [t for t in targets.values() if t.bits == 4 and t.kind in ("matmul", "gemm") and t.input is not None]
        inputs = {t.input: t.k for t in int4}
        stats = collect_input_stats(model, inputs, self.data, hessian=self.algorithm == "gptq",
                                    source_dir=self.source_dir)
        reader = Rewriter(model, self.source_dir, self.block_size, self.accuracy_level)
        out: Dict[str, dict] = {}
        if self.algorithm == "gptq":
            for t in int4:
                if stats[t.input].rows:
                    out[t.name] = {"hessian": stats[t.input].xtx}
            return out
        by_input: Dict[str, List[Target]] = {}
        for t in int4:
            by_input.setdefault(t.input, []).append(t)
        for name, group in by_input.items():
            if not stats[name].rows:
                continue
            weights = [reader.weight_kn(t) for t in group]  # one group's weights at a time
            s = wo.awq_scale(weights, stats[name].sample, stats[name].absmean, self.block_size)
            if not np.allclose(s, 1.0):
                for t in group:
                    out[t.name] = {"awq_scale": s}
        return out


def _kernel_option(bits: int, kernel: Optional[str], int4_kernel: Optional[str]) -> str:
    """The kernel asked for (``--kernel``, or its old int4-only spelling ``--int4-kernel``), default "auto"."""
    if int4_kernel is not None:
        if bits != 4:
            raise UserError("--int4-kernel applies to --weights-only int4 (use --kernel for int8)")
        if kernel is not None and kernel != int4_kernel:
            raise UserError(f"--kernel {kernel} and --int4-kernel {int4_kernel} disagree; give one (--int4-kernel is "
                            "the old spelling of --kernel)")
        kernel = int4_kernel
    kernel = "auto" if kernel is None else kernel
    if kernel not in wo.KERNELS:
        raise UserError(f"--kernel {kernel!r}: choose one of {', '.join(wo.KERNELS)}")
    return kernel


def _dispatch_fits(model: onnx.ModelProto) -> bool:
    """Whether "auto" may choose the dispatch form: the runtime runs its kernels and the model has
    an input and can be raised to opset 21 (checked on a copy without weights)."""
    from graphprune.quantization.weight_nodes import _raises_to_21

    kernels = all(wo.runtime_has(k) for k in ("MatMulNBits", "DynamicQuantizeMatMul", "CastInt4"))
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 1)
    constants = {t.name for t in model.graph.initializer}
    fed = any(i.name not in constants for i in model.graph.input)
    return kernels and fed and (opset >= 21 or _raises_to_21(model))


def _for_dispatch(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` raised to opset 21 (the dispatch form's INT4 casts; raised before the rewrite, since
    its nodes then move into the ``If``'s branches) as a copy whose large initializers carry no data
    (the ``Rewriter`` reads them from ``model``), or ``UserError`` when the runtime or the model
    cannot take the form."""
    from graphprune.quantization.weight_nodes import _upgrade_opset

    missing = [k for k in ("MatMulNBits", "DynamicQuantizeMatMul", "CastInt4") if not wo.runtime_has(k)]
    if missing:
        raise UserError(f"--kernel dispatch needs the runtime to run {', '.join(missing)}; "
                        "use --kernel matmulnbits|int8")
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 1)
    return _upgrade_opset(ir.weightless_copy(model), 21) if opset < 21 else model


def quantize_weights(model: onnx.ModelProto, bits: int = 8, **kwargs) -> onnx.ModelProto:
    """Functional form of ``QuantizeWeightsPass``: the model with int8 or int4 weights."""
    return QuantizeWeightsPass(bits=bits, **kwargs)(model).model


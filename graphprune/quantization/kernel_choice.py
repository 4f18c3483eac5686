"""``--kernel auto``: which kernel int4 or int8 MatMul weights are written for, chosen by timing both on this machine.

Each width has two forms (``weight_nodes.Rewriter``) that trade places with the CPU and the runtime:

- int4: ``MatMulNBits`` (4-bit blocks) or the int8 kernel's form (4-bit values with integer block
  multipliers, folded to int8 at load, ``weight_int8_kernel``);
- int8: ``DequantizeLinear -> MatMul``, which ONNX Runtime fuses into 8-bit ``MatMulNBits``
  ("matmulnbits"), or the int8 weight read directly by com.microsoft ``DynamicQuantizeMatMul``
  ("int8").

On the x86 Xeon of the benchmarks (onnxruntime 1.32, avx512_vnni / AMX), ``MatMulNBits`` is slightly
faster for one row (1-token decoding) but no faster than fp32 for 128 rows (a prompt: 0.77-0.93x),
where ``DynamicQuantizeMatMul``'s integer GEMM runs 4-6x; other CPUs (ARM with KleidiAI, a later
MLAS) may invert that.  So the choice is measured, never assumed: one layer of the model's most
common shape (capped, so the probe stays short) is written in both forms by the pass itself, and
each is timed by CPU time of the calling thread (one intra-op thread: a busy machine cannot
inflate it) at M = 1 and M = 128 rows, interleaved over a few rounds, median per form.  The int8
form wins when the geometric mean of its speedups over ``MatMulNBits`` at the two row counts is
above 1: decoding and prompt processing weigh the same.  For int4, when the two trade places, each
winning at its row count by more than ``DISPATCH_MARGIN``, and the model can take it, the choice is
"dispatch" (``weight_dispatch``: both forms, chosen per run by the row count; the same file, but
its session holds both kernels' weights and folds more at load).

Not timed: a runtime that lacks one of the kernels gets the other; GPTQ's float block scales only
fit ``MatMulNBits``.  Costs the timing does not see are in docs/benchmarks.md: ``DynamicQuantizeMatMul``
quantizes the activations per tensor (uint8), a larger error than ``MatMulNBits``' per-block int8
activations; the int4 int8-kernel form's session holds int8 weights (twice the int4 bytes).
"""

from __future__ import annotations

import functools
import time
from typing import Dict, Iterable, Tuple

import numpy as np

__all__ = ["choose_kernel", "probe_shape", "ROWS", "KERNEL_NAMES", "DISPATCH_MARGIN"]

# Row counts timed: one token (weight-bound decoding) and a 128-token prompt (compute-bound).
ROWS = (1, 128)
# The probe layer's largest dimensions: a bigger layer says nothing more about the kernels.
_MAX_K, _MAX_N = 4096, 4096
_ROUNDS = 5
# Runs per round and row count: enough CPU time per sample to rise above the timer's resolution.
_RUNS = {1: 10, 128: 2}
# "dispatch" only when each kernel beats the other at its row count by more than this: below, the
# gain is within the probe's noise and does not pay for the session's second copy of the weights.
DISPATCH_MARGIN = 1.1
# What the "matmulnbits" form is, per width, for the reasons printed.
KERNEL_NAMES = {4: "MatMulNBits", 8: "DequantizeLinear (fused into 8-bit MatMulNBits)"}


def probe_shape(shapes: Iterable[Tuple[int, int]], block_size: int = 1) -> Tuple[int, int]:
    """The (K, N) that holds the most weight values among ``shapes`` (K in whole blocks only),
    capped at 4096 x 4096; (1024, 1024) when there is none.  int8: ``block_size`` 1."""
    totals: Dict[Tuple[int, int], int] = {}
    for k, n in shapes:
        if k % block_size == 0:
            totals[(k, n)] = totals.get((k, n), 0) + k * n
    if not totals:
        return 1024, 1024
    k, n = max(totals, key=lambda shape: (totals[shape], shape))
    return min(k, _MAX_K - _MAX_K % block_size), min(n, _MAX_N)


def choose_kernel(bits: int, k: int, n: int, block_size: int = 32, accuracy_level: int = 4,
                  dispatch: bool = False) -> Tuple[str, dict]:
    """("int8", "matmulnbits" or, with ``dispatch`` (the model and runtime can take that form),
    "dispatch"; what decided it) for ``bits``-bit weights of shape [k, n] on this machine."""
    from graphprune.quantization.weight_only import runtime_has

    if not runtime_has("DynamicQuantizeMatMul"):
        return "matmulnbits", {"reason": "the runtime has no DynamicQuantizeMatMul"}
    if bits == 4 and not runtime_has("MatMulNBits"):
        return "int8", {"reason": "the runtime has no MatMulNBits"}
    times = _timed(int(bits), int(k), int(n), int(block_size), int(accuracy_level))
    speedups = [times["matmulnbits"][m] / times["int8"][m] for m in ROWS]
    mean = float(np.sqrt(np.prod(speedups)))
    kernel = "int8" if mean > 1.0 else "matmulnbits"
    other = KERNEL_NAMES[bits]
    traded = speedups[0] * DISPATCH_MARGIN < 1.0 and speedups[1] > DISPATCH_MARGIN
    if bits == 4 and dispatch and traded:
        kernel = "dispatch"
    detail = {"reason": f"timed on one [{k}, {n}] layer: int8 form {speedups[0]:.2f}x {other} at 1 row, "
                        f"{speedups[1]:.2f}x at 128 (geometric mean {mean:.2f})"
                        + ("; each wins at its row count: both, dispatched by rows" if kernel == "dispatch" else ""),
              "shape": [int(k), int(n)], "cpu_ms": {kind: {str(m): round(t, 4) for m, t in by_rows.items()}
                                                  for kind, by_rows in times.items()}}
    return kernel, detail


@functools.lru_cache(maxsize=None)
def _timed(bits: int, k: int, n: int, block_size: int, accuracy_level: int) -> Dict[str, Dict[int, float]]:
    """Median CPU ms per run of each form, {kind: {rows: ms}} (one probe per shape and process)."""
    sessions = {kind: _session(bits, k, n, block_size, accuracy_level, kind) for kind in ("matmulnbits", "int8")}
    rng = np.random.default_rng(0)
    feeds = {m: {"x": rng.standard_normal((m, k)).astype(np.float32)} for m in ROWS}
    for session in sessions.values():  # warm-up: first runs allocate
        for m in ROWS:
            session.run(None, feeds[m])
    samples = {kind: {m: [] for m in ROWS} for kind in sessions}
    order = list(sessions)
    for r in range(_ROUNDS):
        for kind in order if r % 2 == 0 else order[::-1]:  # interleaved, each order as often
            for m in ROWS:
                start = time.thread_time()
                for _ in range(_RUNS[m]):
                    sessions[kind].run(None, feeds[m])
                samples[kind][m].append((time.thread_time() - start) * 1e3 / _RUNS[m])
    return {kind: {m: float(np.median(v)) for m, v in by_rows.items()} for kind, by_rows in samples.items()}


def _session(bits: int, k: int, n: int, block_size: int, accuracy_level: int, kind: str):
    """A one-MatMul model [M, k] x [k, n] written by the pass in ``kind``'s form, in a 1-thread session."""
    from onnx import TensorProto, helper, numpy_helper

    from graphprune.passes.quantize_weights import QuantizeWeightsPass
    from graphprune.runtime import make_session

    w = (np.random.default_rng(1).standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="probe")], "kernel_probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    del w
    written = QuantizeWeightsPass(bits=bits, block_size=block_size, accuracy_level=accuracy_level, kernel=kind,
                                  embeddings=False)(model).model
    return make_session(written, threads=1, spinning=False)

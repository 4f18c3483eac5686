"""Weight-only quantization numerics: int8 per channel, int4 block-wise (RTN, AWQ scaling, GPTQ), runtime probes."""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphprune.errors import UserError

__all__ = [
    "BLOCK_SIZES",
    "ALGORITHMS",
    "KERNELS",
    "INT4_KERNELS",
    "check_block_size",
    "int8_per_channel",
    "int4_blocks_rtn",
    "int4_blocks_gptq",
    "awq_scale",
    "pack_nbits",
    "pack_int4",
    "runtime_has",
]

BLOCK_SIZES = (16, 32, 64, 128, 256)
ALGORITHMS = ("rtn", "awq", "gptq")
# Kernels int4/int8 MatMul/Gemm weights are written for: MatMulNBits (int4 blocks; int8 as
# DequantizeLinear, which ONNX Runtime fuses into 8-bit MatMulNBits: fast with few rows, decoding)
# or int8 DynamicQuantizeMatMul (int4 after an expansion at load: fast with many rows, prefill).
# "dispatch" (int4): both, chosen per run by the row count (``weight_dispatch``).
KERNELS = ("auto", "matmulnbits", "int8", "dispatch")  # auto: timed on this machine (``kernel_choice``)
INT4_KERNELS = KERNELS  # the choices' old name (``--int4-kernel``)
# AWQ's grid of exponents for the activation scale s = mean|x| ** alpha (0: plain RTN).
_AWQ_GRID = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
# GPTQ: dampening of the Hessian's diagonal (fraction of its mean) and the lazy-update width.
_GPTQ_DAMP = 0.01
_GPTQ_BLOCK = 128


def check_block_size(block_size: int) -> int:
    """The block size, or ``UserError`` when it is not one the int4 kernels take."""
    if block_size not in BLOCK_SIZES:
        raise UserError(f"--block-size {block_size}: choose one of {', '.join(map(str, BLOCK_SIZES))}")
    return block_size


def int8_per_channel(w: np.ndarray, axis: int) -> Tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 (q in [-127, 127]) with one scale per index of ``axis``: (q, scale [w.shape[axis]])."""
    reduce = tuple(a for a in range(w.ndim) if a != axis)
    amax = np.max(np.abs(w), axis=reduce) if reduce else np.abs(w)
    scale = (amax / 127.0).astype(w.dtype)
    scale[scale == 0] = 1  # an all-zero channel: any scale dequantizes to zero; 0 would divide by zero
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def _block_scales(w: np.ndarray, block_size: int) -> np.ndarray:
    """ORT's symmetric int4 convention: scale = (the block's value of largest magnitude) / -8, so
    that value maps to -8 exactly and the whole range [-8, 7] is used.  ``w`` is [K, N]; scales are
    [ceil(K / block), N]."""
    k, n = w.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), dtype=np.float32)
    padded[:k] = w
    padded = padded.reshape(blocks, block_size, n)
    idx = np.abs(padded).argmax(axis=1)
    amax = np.take_along_axis(padded, idx[:, None, :], axis=1)[:, 0, :]
    scale = amax / -8.0
    scale[scale == 0] = 1.0
    return scale.astype(np.float32)


def _quantize_rows(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(w / scale), -8, 7).astype(np.int8)


def int4_blocks_rtn(w: np.ndarray, block_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest int4 in blocks of ``block_size`` along K of a [K, N] weight: (q int8 [K, N]
    in [-8, 7], scales [ceil(K / block), N])."""
    w = np.asarray(w, dtype=np.float32)
    scale = _block_scales(w, block_size)
    rows = np.repeat(scale, block_size, axis=0)[: w.shape[0]]
    return _quantize_rows(w, rows), scale


def dequantize_int4(q: np.ndarray, scale: np.ndarray, block_size: int) -> np.ndarray:
    """The float weight [K, N] that int4 ``q`` with block ``scale`` stands for."""
    return q.astype(np.float32) * np.repeat(scale, block_size, axis=0)[: q.shape[0]]


def awq_scale(weights, sample: np.ndarray, absmean: np.ndarray, block_size: int) -> np.ndarray:
    """AWQ's per-input-channel scale s for weights [K, N] that share an input X.

    Salient input channels (large mean |x|) lose least when the weight rows they multiply are
    scaled up by s before rounding and the input is divided by s: s = mean|x| ** alpha, alpha from a
    grid, chosen by the output error ||X W - (X / s) Q(s W)||² on ``sample`` rows of X (alpha 0 is
    plain RTN, so the choice is never worse than RTN on the sample).  Returns s [K] (ones for RTN).
    """
    x = np.asarray(sample, dtype=np.float32)
    base = np.maximum(np.asarray(absmean, dtype=np.float32), 1e-8)
    best, best_err = np.ones_like(base), None
    for alpha in _AWQ_GRID:
        s = base ** alpha
        s = s / np.sqrt(s.max() * s.min())  # centred on 1: scales stay in the weights' range
        err = 0.0
        for w in weights:
            q, scale = int4_blocks_rtn(w * s[:, None], block_size)
            err += float(np.square(x @ (dequantize_int4(q, scale, block_size) / s[:, None] - w)).sum())
        if best_err is None or err < best_err:
            best, best_err = s.astype(np.float32), err
    return best


def int4_blocks_gptq(w: np.ndarray, hessian: np.ndarray, block_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """GPTQ: int4 blocks of a [K, N] weight chosen one input row at a time, each row's rounding
    error spread over the rows not yet quantized through the inverse Hessian (X^T X) of its input,
    so the layer's output on the calibration data moves least (Frantar et al., 2022).

    Lazy batches of ``_GPTQ_BLOCK`` rows (a multiple of the block size, so a block's scale is taken
    from its rows once all earlier updates reached them); the Hessian is dampened by 1% of its mean
    diagonal, and inputs that never fired get zero weight rows (they contribute nothing).
    Returns (q int8 [K, N] in [-8, 7], scales [ceil(K / block), N]).
    """
    w = np.array(w, dtype=np.float64)
    k, n = w.shape
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h[np.diag_indices(k)] += _GPTQ_DAMP * np.mean(np.diag(h))
    try:
        inv = np.linalg.inv(h)
        upper = np.linalg.cholesky(inv).T  # inv(H) = U^T U: the rows of U drive the updates
    except np.linalg.LinAlgError:
        return int4_blocks_rtn(w.astype(np.float32), block_size)  # not positive definite: no better than RTN
    blocks = -(-k // block_size)
    scales = np.zeros((blocks, n), dtype=np.float32)
    q = np.zeros((k, n), dtype=np.int8)
    width = max(_GPTQ_BLOCK, block_size)
    for start in range(0, k, width):
        stop = min(start + width, k)
        chunk = w[start:stop].copy()
        errors = np.zeros_like(chunk)
        hinv = upper[start:stop, start:stop]
        for i in range(stop - start):
            row = start + i
            if row % block_size == 0:
                scales[row // block_size] = _block_scales(chunk[i:i + block_size].astype(np.float32), block_size)[0]
            s = scales[row // block_size].astype(np.float64)
            q[row] = np.clip(np.rint(chunk[i] / s), -8, 7)
            err = (chunk[i] - q[row] * s) / hinv[i, i]
            chunk[i:] -= np.outer(hinv[i, i:], err)
            errors[i] = err
        w[stop:] -= upper[start:stop, stop:].T @ errors
    return q, scales


def pack_nbits(q: np.ndarray, block_size: int) -> np.ndarray:
    """int4 ``q`` [K, N] in [-8, 7] as ``MatMulNBits``'s B: uint8 [N, blocks, block / 2], two values a
    byte (low nibble first) stored with the default zero point 8; K is padded with zeros to whole blocks."""
    k, n = q.shape
    blocks = -(-k // block_size)
    padded = np.full((blocks * block_size, n), 8, dtype=np.uint8)
    padded[:k] = (q.astype(np.int16) + 8).astype(np.uint8)
    cols = padded.T.reshape(n, blocks, block_size // 2, 2)
    return (cols[..., 0] | (cols[..., 1] << 4)).astype(np.uint8)


def pack_int4(q: np.ndarray) -> bytes:
    """int4 values in row-major order as ONNX INT4 raw data (two a byte, low nibble first)."""
    flat = q.reshape(-1).astype(np.int16) & 0xF
    if flat.size % 2:
        flat = np.append(flat, 0)
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def ort_rtn_nbits(w: np.ndarray, block_size: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """onnxruntime's own C++ int4 block quantizer (what ``matmul_nbits_quantizer`` calls) on a [K, N]
    float32 weight: (B packed [N, blocks, block / 2], scales [N, blocks]); None when this build has none.

    Used for RTN: it is the runtime's reference packing and several times faster than numpy on
    large weights.  ``matmul_nbits_quantizer`` itself is not imported: it needs ``onnx_ir`` (not a
    dependency here) and holds the whole model in memory (see passes/quantize_weights.py).
    """
    try:
        from onnxruntime.capi._pybind_state import quantize_matmul_4bits
    except ImportError:
        return None
    w = np.ascontiguousarray(w, dtype=np.float32)
    k, n = w.shape
    blocks = -(-k // block_size)
    if blocks * block_size != k:
        w = np.concatenate([w, np.zeros((blocks * block_size - k, n), np.float32)])
    packed = np.zeros((n, blocks, block_size // 2), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zero_points = np.zeros((n, (blocks + 1) // 2), dtype=np.uint8)
    quantize_matmul_4bits(packed, w, scales, zero_points, block_size, n, blocks * block_size, True)
    return packed, scales


@functools.lru_cache(maxsize=None)
def runtime_has(kind: str) -> bool:
    """Whether the installed onnxruntime runs ``kind`` on the CPU: "MatMulNBits",
    "GatherBlockQuantized", "DynamicQuantizeMatMul" (com.microsoft), "BlockedDequantize" (opset 21 DequantizeLinear with
    block_size on int4) or "CastInt4" (opset 21 Cast from INT4 to int8).  Probed by running a tiny model (never assumed from the version)."""
    from graphprune.runtime import ort

    rt = ort()
    model, feed = _PROBES[kind]()
    options = rt.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    try:
        session = rt.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        out = session.run(None, feed)[0]
    except Exception:  # noqa: BLE001 - the runtime's refusal, whatever its class
        return False
    return bool(np.all(np.isfinite(out)))


def _probe_matmul_nbits():
    w = np.linspace(-1, 1, 64 * 8, dtype=np.float32).reshape(64, 8)
    q, scale = int4_blocks_rtn(w, 32)
    graph = helper.make_graph(
        [helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=64, N=8, bits=4,
                          block_size=32)],
        "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(pack_nbits(q, 32), "b"), onnx.numpy_helper.from_array(scale.T.copy(), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model, {"x": np.ones((1, 64), np.float32)}


def _probe_gather_block_quantized():
    table = np.linspace(-1, 1, 4 * 32, dtype=np.float32).reshape(4, 32)
    q, scale = int4_blocks_rtn(table.T, 32)  # blocks along the embedding axis
    graph = helper.make_graph(
        [helper.make_node("GatherBlockQuantized", ["t", "i", "s"], ["y"], domain="com.microsoft", gather_axis=0,
                          quantize_axis=1, block_size=32)],
        "probe", [helper.make_tensor_value_info("i", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("t", TensorProto.INT4, [4, 32], pack_int4(q.T), raw=True),
         onnx.numpy_helper.from_array(scale.T.copy(), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model, {"i": np.array([0, 3], np.int64)}


def _probe_blocked_dequantize():
    w = np.linspace(-1, 1, 64 * 8, dtype=np.float32).reshape(64, 8)
    q, scale = int4_blocks_rtn(w, 32)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0, block_size=32),
         helper.make_node("MatMul", ["x", "w"], ["y"])],
        "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("q", TensorProto.INT4, [64, 8], pack_int4(q), raw=True),
         onnx.numpy_helper.from_array(scale, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model, {"x": np.ones((1, 64), np.float32)}


def _probe_dynamic_quantize_matmul():
    q = np.arange(-32, 32, dtype=np.int8).reshape(8, 8)
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeMatMul", ["x", "q", "s"], ["y"], domain="com.microsoft")],
        "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(q, "q"), onnx.numpy_helper.from_array(np.full(8, 0.01, np.float32), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model, {"x": np.ones((1, 8), np.float32)}


def _probe_cast_int4():
    """Cast from an INT4 initializer to int8 (opset 21): what the int8-kernel form's expansion folds."""
    q = np.arange(-8, 8, dtype=np.int8).reshape(2, 8)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["q"], ["q8"], to=TensorProto.INT8), helper.make_node("Cast", ["q8"], ["qf"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["x", "qf"], ["y"])],
        "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("q", TensorProto.INT4, [2, 8], pack_int4(q), raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model, {"x": np.ones((2, 8), np.float32)}


_PROBES = {
    "CastInt4": _probe_cast_int4,
    "DynamicQuantizeMatMul": _probe_dynamic_quantize_matmul,
    "MatMulNBits": _probe_matmul_nbits,
    "GatherBlockQuantized": _probe_gather_block_quantized,
    "BlockedDequantize": _probe_blocked_dequantize,
}

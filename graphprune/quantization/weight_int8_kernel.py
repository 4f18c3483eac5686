"""int4 weights for an int8 kernel: 4-bit values times integer block multipliers, expanded to int8 at load for DynamicQuantizeMatMul.

Why: onnxruntime's int4 ``MatMulNBits`` is the fast path of a 1-token forward (weight-bound), but
with many rows (a 128-token prefill) it is no faster than its fp32 GEMM on x86 (``tools/bench_llm.py
--kernels``: 0.74-1.18x at M = 128), while its u8s8 integer GEMM behind ``DynamicQuantizeMatMul``
(VNNI / AMX) is several times faster than fp32 at M = 128 and still ~2.8x at M = 1.  That kernel
takes an int8 weight with one scale per output column, so the file stores

    w[k, n] ~= q[k, n] * r[k // block, n] * u[n]      q in [-8, 7], 1 <= |r| <= 15, u float

q as two 4-bit values a byte, the block multipliers r as int8 and the column scales u as float:
0.53 bytes a weight for block 32 (``MatMulNBits``: 0.625), and about the error of int4 blocks with
float scales (relative L2 0.0896 against 0.0859 on a Gaussian 1280 x 3456 weight).
q * r is an exact int8 (|q * r| <= 120).  The expansion is made of standard ops on constants only,
which ONNX Runtime folds into one int8 initializer when it creates the session; the session then
holds int8 weights (twice the int4 file's bytes).  Two forms of q and its expansion:

- ``INT4`` tensor (opset 21, the model's import raised to it): Cast to int8, Mul, Reshape;
- uint8 nibbles (any opset from 11, or a runtime that cannot Cast INT4): Mod, BitShift, Concat,
  Cast, Sub, Mul, Reshape.

ONNX Runtime's constant folding keeps every intermediate tensor until the session is built, so the
expansion's length is the session's peak: 3 bytes a weight with INT4, 6 with nibbles.

int8 weight-only's form for this kernel needs no expansion: its int8 per-column weight is what
``DynamicQuantizeMatMul`` reads (``read_by_dynamic_matmul``, shared by both widths).
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np
from onnx import TensorProto, helper

__all__ = ["fits", "int4_with_multipliers", "nibbles", "dequantize", "expansion_nodes", "rewrite",
           "read_by_dynamic_matmul", "SHARED_CONSTANTS"]

# Largest block multiplier: q * r stays within int8 (8 * 15 = 120).
_MAX_MULTIPLIER = 15
# Columns quantized at a time (each step holds a few float copies of K x this many values).
_COLUMNS = 2048
# Constants every expansion reads, created once per model: name -> value.
SHARED_CONSTANTS = {
    "int4_int8_sixteen": np.array(16, np.uint8),  # low nibble: p mod 16
    "int4_int8_four": np.array(4, np.uint8),  # high nibble: p >> 4
    "int4_int8_eight": np.array(8, np.int8),  # the stored offset: q = nibble - 8
}


def fits(k: int, block_size: int) -> bool:
    """Whether a weight with reduction length ``k`` takes this form (whole blocks)."""
    return k % block_size == 0


def int4_with_multipliers(w: np.ndarray, block_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q int8 in [-8, 7], [K / block, block, N], multipliers int8 [K / block, N], column scales
    float32 [N]) of a float [K, N] weight.

    As onnxruntime's own int4 blocks, the value of largest magnitude in a block maps to -8 (the sign
    of the multiplier flips the block), so the whole range [-8, 7] is used; the column's widest block
    gets |r| = 15.  Each block tries the smallest |r| that covers its range and the next two and
    keeps the one of least squared error (a Gaussian 1280 x 3456 weight: relative error 0.0896,
    float block scales 0.0859).
    """
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    if n > _COLUMNS:  # columns are independent: a slice at a time bounds the temporaries (the LM head's)
        parts = [int4_with_multipliers(w[:, i:i + _COLUMNS], block_size) for i in range(0, n, _COLUMNS)]
        return tuple(np.concatenate(arrays, axis=-1) for arrays in zip(*parts))
    blocks = w.reshape(k // block_size, block_size, n)
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None, :], axis=1)[:, 0, :]
    unit = np.abs(extreme).max(axis=0) / (8 * _MAX_MULTIPLIER)
    unit[unit == 0] = 1.0  # an all-zero column: any scale gives zeros
    sign = np.where(extreme > 0, -1, 1)  # the extreme value becomes q = -8
    smallest = np.clip(np.ceil(np.abs(extreme) / (8 * unit) - 1e-6), 1, _MAX_MULTIPLIER)
    best_err = best_q = best_r = None
    for extra in (0, 1, 2):
        r = np.clip(smallest + extra, 1, _MAX_MULTIPLIER) * sign
        step = r[:, None, :] * unit
        q = np.clip(np.rint(blocks / step), -8, 7)
        err = np.square(q * step - blocks).sum(axis=1)
        if best_err is None:
            best_err, best_q, best_r = err, q, r
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_q = np.where(better[:, None, :], q, best_q)
            best_r = np.where(better, r, best_r)
    return best_q.astype(np.int8), best_r.astype(np.int8), unit.astype(np.float32)


def nibbles(q: np.ndarray) -> np.ndarray:
    """The uint8 form of q [K / block, block, N]: q + 8, a block's first half of rows in the low
    nibbles and its second half in the high ones (the expansion needs no reshape before the multiply)."""
    shifted = (q + 8).astype(np.uint8)
    half = q.shape[1] // 2
    return shifted[:, :half] | (shifted[:, half:] << 4)


def dequantize(q: np.ndarray, mult: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """The float [K, N] weight the stored form stands for (what the expansion computes, times ``unit``);
    ``q`` [K / block, block, N] in [-8, 7] (an INT4 tensor's values)."""
    blocks = q.astype(np.int32) * mult.reshape(mult.shape[0], 1, -1).astype(np.int32)
    return blocks.reshape(-1, blocks.shape[-1]).astype(np.float32) * unit


def expansion_nodes(name: str, names: Tuple[str, str, str, str], int4: bool = False) -> List:
    """Nodes computing the int8 [K, N] weight from the stored tensors.

    ``names``: (q [K / block, block, N] INT4 with ``int4``, else its nibbles [K / block, block / 2, N],
    multipliers [K / block, 1, N], weight shape [2], output).  Every input is a constant, so ONNX
    Runtime folds the chain at load.  Its folding keeps every intermediate tensor until the session
    is built, so the chain is as short and as narrow as possible: 3 bytes a weight with INT4, 6 with
    nibbles (two half-byte tensors, then int8 throughout), not the 23 of an int32 chain (the 0.5B
    LLM's session creation: measured in docs/benchmarks.md).
    """
    packed, mult, shape2, out = names
    sixteen, four, eight = SHARED_CONSTANTS
    t = f"{name}_int4_int8"
    if int4:
        return [helper.make_node("Cast", [packed], [f"{t}_q"], name=f"{t}_q", to=TensorProto.INT8),
                helper.make_node("Mul", [f"{t}_q", mult], [f"{t}_blocks"], name=f"{t}_blocks"),
                helper.make_node("Reshape", [f"{t}_blocks", shape2], [out], name=f"{t}_kn")]
    return [
        helper.make_node("Mod", [packed, sixteen], [f"{t}_low"], name=f"{t}_low"),
        helper.make_node("BitShift", [packed, four], [f"{t}_high"], name=f"{t}_high", direction="RIGHT"),
        helper.make_node("Concat", [f"{t}_low", f"{t}_high"], [f"{t}_nibbles"], name=f"{t}_nibbles", axis=1),
        helper.make_node("Cast", [f"{t}_nibbles"], [f"{t}_i8"], name=f"{t}_i8", to=TensorProto.INT8),
        helper.make_node("Sub", [f"{t}_i8", eight], [f"{t}_q"], name=f"{t}_q"),
        helper.make_node("Mul", [f"{t}_q", mult], [f"{t}_blocks"], name=f"{t}_blocks"),
        helper.make_node("Reshape", [f"{t}_blocks", shape2], [out], name=f"{t}_kn"),
    ]


def rewrite(rewriter, target, w: np.ndarray, awq) -> None:
    """Store one int4 MatMul/Gemm weight (``target``, float [K, N] ``w``) in this form through
    ``rewriter`` (a ``weight_nodes.Rewriter``): its tensors, the expansion before the first reader,
    and each reader replaced by com.microsoft ``DynamicQuantizeMatMul`` (a Gemm's C added after).
    ``awq``: AWQ's input scale (the weight already took the product), or None."""
    k, n = w.shape
    b, name = rewriter.block_size, target.name
    q, mult, unit = int4_with_multipliers(w, b)
    del w
    int4 = rewriter.int4_cast()
    if int4:
        stored = rewriter._add_int4(f"{name}_q4", q)
        rewriter.needs.add("opset21")
    else:
        stored = rewriter._add(f"{name}_q4_packed", nibbles(q))
        for constant, value in SHARED_CONSTANTS.items():
            if constant not in rewriter._shared:
                rewriter._shared.add(rewriter._add(constant, value))
    del q
    names = (stored, rewriter._add(f"{name}_q4_multipliers", mult.reshape(k // b, 1, n)),
             rewriter._add(f"{name}_q4_shape", np.array([k, n], np.int64)), f"{name}_int8")
    scale = rewriter._add(f"{name}_scale", unit)
    rewriter.before.setdefault(min(i for i, _ in target.uses), []).extend(expansion_nodes(name, names, int4))
    activation = rewriter._awq_input(target, awq, np.float32) if awq is not None else None
    read_by_dynamic_matmul(rewriter, target, names[3], scale, activation, "_Q4I8")


def read_by_dynamic_matmul(rewriter, target, weight: str, scale: str, activation=None, suffix: str = "_I8") -> None:
    """Replace each reader of ``target`` by com.microsoft ``DynamicQuantizeMatMul`` on the int8 [K, N]
    tensor ``weight`` with column scales ``scale`` (a Gemm's C added after; the int4 form's expanded
    weight and the int8 weight alike).  ``activation``: the input to read instead of the node's."""
    rewriter.needs.add("com.microsoft")
    for i, _ in target.uses:
        node = rewriter.model.graph.node[i]
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
        out = f"{node.output[0]}_nobias" if has_bias else node.output[0]
        base = node.name or target.name
        nodes = [helper.make_node("DynamicQuantizeMatMul", [activation or node.input[0], weight, scale], [out],
                                  name=base + suffix, domain="com.microsoft")]
        if has_bias:
            nodes.append(helper.make_node("Add", [out, node.input[2]], [node.output[0]], name=base + "_bias"))
        rewriter.instead[i] = nodes

"""``tools/bench_llm.py --kernels``: one MatMul of the Llama's FFN shape, MatMulNBits variants and int8 kernels.

fp32 against every ``KERNEL_VARIANTS`` entry at M = 1 and 128 rows, 1 thread.

Results and what they mean: docs/benchmarks.md ("Weight-only int4/int8 and a decoder LLM").
"""

from __future__ import annotations

from typing import Dict

import numpy as np

from bench_llm import interleaved

# The micro-benchmark's variants: (label, kind, settings).  kind "fp32" is MatMul; "nbits" is
# MatMulNBits with its accuracy_level ("acc"), block, bits, zero points (None, "uint8": packed like
# the weights, the asymmetric kernels; "float": T1-typed, which skips MLAS' packed kernels and
# dequantizes B before an fp32 GEMM on every run) and session config entries; "dynamic" is
# com.microsoft DynamicQuantizeMatMul (int8 per-column weights, activations quantized per run: the
# u8s8 QGEMM that uses VNNI / AMX), for reference.  accuracy_level 4 selects MLAS' CompInt8 path
# (int8 activations quantized per block); every other level is CompFp32 on x86.
KERNEL_VARIANTS = [
    ("fp32 MatMul", "fp32", {}),
    *[(f"int4 acc{a} block 32", "nbits", {"acc": a}) for a in (0, 1, 2, 3, 4)],
    *[(f"int4 acc4 block {b}", "nbits", {"acc": 4, "block": b}) for b in (16, 64, 128, 256)],
    ("int4 acc0 block 128", "nbits", {"acc": 0, "block": 128}),
    ("int4 acc4 block 32, uint8 zero points", "nbits", {"acc": 4, "zp": "uint8"}),
    ("int4 acc4 block 128, uint8 zero points", "nbits", {"acc": 4, "block": 128, "zp": "uint8"}),
    ("int4 block 32, float zero points (unpacked)", "nbits", {"acc": 4, "zp": "float"}),
    ("int4 acc4 block 128, mlas.qnbit.force_fp32=1", "nbits", {"acc": 4, "block": 128,
                                                                 "config": {"mlas.qnbit.force_fp32": "1"}}),
    ("int4 acc4 block 32, mlas.use_lut_gemm=1", "nbits", {"acc": 4, "config": {"mlas.use_lut_gemm": "1"}}),
    ("int8 MatMulNBits acc4 block 128", "nbits", {"acc": 4, "block": 128, "bits": 8}),
    ("int8 MatMulNBits acc4 block 32", "nbits", {"acc": 4, "bits": 8}),
    ("int8 DynamicQuantizeMatMul (per column)", "dynamic", {}),
    ("int4 block 32 for the int8 kernel (--kernel int8)", "int4i8", {}),
    ("int4 block 32, both behind one If on the rows (--kernel dispatch)", "int4dispatch", {}),
]


def _kernel_model(w: np.ndarray, kind: str, acc: int = 0, block: int = 32, bits: int = 4, zp=None):
    """One [M, K] x [K, N] product as a single-node model of ``kind`` (see ``KERNEL_VARIANTS``)."""
    from onnx import TensorProto, helper, numpy_helper

    from graphprune.quantization import weight_only as wo

    k, n = w.shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])
    if kind in ("int4i8", "int4dispatch"):  # what graphprune writes (folded at load)
        from graphprune.passes.quantize_weights import quantize_weights

        kernel = "int8" if kind == "int4i8" else "dispatch"
        return quantize_weights(_kernel_model(w, "fp32"), bits=4, block_size=block, kernel=kernel)
    if kind == "fp32":
        nodes, inits = [helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")]
    elif kind == "dynamic":
        q, scale = wo.int8_per_channel(w, 1)
        nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "q", "s"], ["y"], domain="com.microsoft")]
        inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s")]
    else:
        blocks = -(-k // block)
        if bits == 4:
            packed, scales = wo.ort_rtn_nbits(w, block)
        else:  # 8-bit blocks: uint8 with the default zero point 128, [N, blocks, block]
            wb = np.zeros((blocks * block, n), np.float32)
            wb[:k] = w
            wb = wb.T.reshape(n, blocks, block)
            scales = np.abs(wb).max(axis=2) / 127
            scales[scales == 0] = 1
            packed = (np.clip(np.rint(wb / scales[..., None]), -127, 127) + 128).astype(np.uint8)
        names = ["x", "b", "s"]
        inits = [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales.astype(np.float32), "s")]
        if zp == "uint8":  # the symmetric midpoint, stored: selects the kernels with zero points
            per_byte = 8 // bits
            mid = 8 if bits == 4 else 128
            value = (mid | (mid << 4)) if bits == 4 else mid
            inits.append(numpy_helper.from_array(np.full((n, -(-blocks // per_byte)), value, np.uint8), "z"))
            names.append("z")
        elif zp == "float":
            inits.append(numpy_helper.from_array(np.full((n, blocks), 8.0 if bits == 4 else 128.0, np.float32), "z"))
            names.append("z")
        attrs = dict(K=k, N=n, bits=bits, block_size=block, **({"accuracy_level": acc} if acc else {}))
        nodes = [helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", **attrs)]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def kernel_microbench(rounds: int = 7, shapes=((1280, 3456),), ms=(1, 128)) -> Dict[str, Dict[str, float]]:
    """One MatMul of the LLM's FFN shape (K 1280, N 3456) at M = 1 and 128, 1 thread, every
    ``KERNEL_VARIANTS`` entry against fp32; median CPU ms of ``rounds`` interleaved rounds of 5
    runs (M = 128: 2 runs), each variant's output rel L2 against fp32 beside it."""
    import onnxruntime as ort

    result = {}
    for k, n in shapes:
        w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32) * 0.02
        sessions = {}
        for label, kind, settings in KERNEL_VARIANTS:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.log_severity_level = 3
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            for key, value in settings.get("config", {}).items():
                options.add_session_config_entry(key, value)
            model = _kernel_model(w, kind, settings.get("acc", 0), settings.get("block", 32), settings.get("bits", 4),
                                  settings.get("zp"))
            sessions[label] = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for m in ms:
            feed = {"x": np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)}
            reference = sessions["fp32 MatMul"].run(None, feed)[0]
            times = interleaved(sessions, feed, rounds, 5 if m < 32 else 2)
            table = {}
            for label, s in sessions.items():
                y = s.run(None, feed)[0]
                table[label] = {"cpu_ms": round(times[label]["cpu_ms"], 3),
                                "speedup": round(times["fp32 MatMul"]["cpu_ms"] / times[label]["cpu_ms"], 2),
                                "rel_l2": float(np.linalg.norm(y - reference) / np.linalg.norm(reference))}
                print(f"K={k} N={n} M={m} {label:<46} {table[label]['cpu_ms']:8.3f} ms  "
                      f"{table[label]['speedup']:5.2f}x  rel L2 {table[label]['rel_l2']:.4f}", flush=True)
            result[f"K={k} N={n} M={m}"] = table
    return result

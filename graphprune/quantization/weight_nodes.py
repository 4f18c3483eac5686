"""The graph side of weight-only quantization: the quantized tensors and the nodes that read them (``Rewriter``).

Which weights, and in which format, is ``weight_targets``; the int8-kernel form of int4 weights is
``weight_int8_kernel``.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphprune.errors import UserError
from graphprune.ir import copy_fields
from graphprune.quantization import weight_dispatch as wd
from graphprune.quantization import weight_int8_kernel as ik
from graphprune.quantization import weight_only as wo
from graphprune.quantization.weight_targets import (FLOAT_TYPES, NODE_BYTES, Target, constant_tensors, find_targets,
                                                     gemm_is_matmul)

__all__ = ["Target", "find_targets", "constant_tensors", "Rewriter", "NODE_BYTES"]


class Rewriter:
    """Collects the quantized initializers and replacement nodes, then builds the new model once.

    The input model is never modified; weights are read one at a time (from ``source_dir`` when
    left on disk) and only their quantized form is kept.
    """

    def __init__(self, model: onnx.ModelProto, source_dir: Optional[str], block_size: int, accuracy_level: int,
                 folded: bool = False, kernel: str = "matmulnbits",
                 originals: Optional[Dict[str, TensorProto]] = None):
        """``originals``: name -> initializer with its data, for a ``model`` whose initializers of
        those names carry none (a weightless copy raised to a new opset: no second copy of the weights)."""
        self.model = model
        self._originals = originals or {}
        self.folded = folded  # every int8 weight as Cast and Mul (see ``_int8``)
        self.kernel = kernel  # MatMul/Gemm weights for "matmulnbits", "int8" (DynamicQuantizeMatMul) or "dispatch"
        self.source_dir = source_dir
        self.block_size = block_size
        self.accuracy_level = accuracy_level
        self.inits = constant_tensors(model)
        self.inits.update((name, self._originals[name]) for name in list(self.inits) if name in self._originals)
        self.opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 1)
        self.new_inits: List[TensorProto] = []
        self.replaced: Dict[str, int] = {}  # weight -> its float bytes
        self.before: Dict[int, List[onnx.NodeProto]] = {}  # node index -> nodes inserted before it
        self.instead: Dict[int, List[onnx.NodeProto]] = {}  # node index -> its replacement
        self.counts: Dict[str, int] = {}
        self.needs = set()  # "com.microsoft", "int4", "opset21"
        self._scaled_inputs: Dict[str, str] = {}
        self._shared = set()  # shared constants of the int8-kernel form, added once
        self._int4_cast: Optional[bool] = None  # see ``int4_cast``
        # "dispatch" (``weight_dispatch``): main-graph derivations, and the readers' MatMulNBits form
        self.hoisted: List[onnx.NodeProto] = []
        self.instead_then: Dict[int, List[onnx.NodeProto]] = {}

    # -- reading ------------------------------------------------------------------------------
    def read(self, name: str) -> np.ndarray:
        """The weight's values, from memory or from its external data file (one tensor's bytes)."""
        return self._read_tensor(self.inits[name])

    def _read_tensor(self, tensor: TensorProto) -> np.ndarray:
        name = tensor.name
        if tensor.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor)
        if self.source_dir is None:
            raise ValueError(f"tensor {name!r} has its data on disk; the pass needs source_dir")
        entries = {e.key: e.value for e in tensor.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        count = int(np.prod(tensor.dims))
        path = os.path.join(self.source_dir, entries["location"])
        array = np.fromfile(path, dtype=dtype, count=count, offset=int(entries.get("offset") or 0))
        if array.size != count:
            raise UserError(f"{path}: external data of {name!r} ends early (truncated?)")
        return array.reshape(tuple(tensor.dims))

    def weight_kn(self, target: Target) -> np.ndarray:
        """A MatMul/Gemm weight as [K, N] float32."""
        w = self.read(target.name).astype(np.float32, copy=False)
        return np.ascontiguousarray(w.T) if target.transposed else w

    # -- rewriting ----------------------------------------------------------------------------
    def quantize(self, target: Target, algorithm: str = "rtn", extra: Optional[dict] = None) -> None:
        tensor = self.inits[target.name]
        self.replaced[target.name] = int(np.prod(tensor.dims)) * np.dtype(FLOAT_TYPES[tensor.data_type]).itemsize
        if target.kind == "embedding":
            self._embedding(target, tensor)
        elif target.bits == 8:
            self._int8(target, tensor)
        else:
            self._int4(target, tensor, algorithm, extra or {})
        key = f"{target.kind} int{target.bits}"
        self.counts[key] = self.counts.get(key, 0) + 1

    def _add(self, name: str, array: np.ndarray) -> str:
        self.new_inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def _add_int4(self, name: str, q: np.ndarray) -> str:
        self.new_inits.append(helper.make_tensor(name, TensorProto.INT4, list(q.shape), wo.pack_int4(q), raw=True))
        self.needs.add("int4")
        return name

    def _int8(self, target: Target, tensor: TensorProto) -> None:
        """int8 per channel, dequantized into a tensor of the weight's own name (its readers are unchanged).

        Two forms.  ``DequantizeLinear`` (per axis from opset 13, float16 output from 19): ONNX
        Runtime keeps it in the graph (it does not constant-fold DequantizeLinear, which its QDQ
        fusions need) and fuses DequantizeLinear -> MatMul into 8-bit ``MatMulNBits``, the fast
        path of weight-bound MatMuls.  ``Cast`` + ``Mul``, the same math: ONNX Runtime folds it
        into a float weight when the session is created, so the model runs at float speed with
        float math.  Conv weights always take the latter (a DequantizeLinear before a Conv runs at
        every inference and keeps the Conv out of the NCHWc layout: PP-OCR cls 1.7x slower), and so
        does every weight with ``folded``.  With the "int8" kernel, a MatMul/Gemm weight that fits
        (``_dynamic_fits``) is instead read as it is by ``DynamicQuantizeMatMul`` (integer GEMM).
        """
        if self._dynamic_fits(target, tensor):
            q, scale = wo.int8_per_channel(self.weight_kn(target), 1)  # [K, N], one scale per column
            ik.read_by_dynamic_matmul(self, target, self._add(f"{target.name}_q8", q),
                                      self._add(f"{target.name}_scale", scale))
            return
        w = self.read(target.name)
        axis = 0 if target.kind == "conv" or target.transposed else 1
        q, scale = wo.int8_per_channel(w, axis)
        del w
        name = target.name
        qname = self._add(f"{name}_q8", q)
        first = min(i for i, _ in target.uses)
        per_axis = self.opset >= 13 and (tensor.data_type == TensorProto.FLOAT or self.opset >= 19)
        # (no DequantizeLinear in a dispatch branch: ORT's fusion of it fails on outer-scope weights)
        if per_axis and not self.folded and target.kind != "conv" and self.kernel != "dispatch":
            nodes = [helper.make_node("DequantizeLinear", [qname, self._add(f"{name}_scale", scale)], [name],
                                      name=f"{name}_DequantizeLinear", axis=axis)]
        else:
            shape = [1] * q.ndim
            shape[axis] = -1
            nodes = [helper.make_node("Cast", [qname], [f"{name}_q8f"], name=f"{name}_Cast", to=tensor.data_type),
                     helper.make_node("Mul", [f"{name}_q8f", self._add(f"{name}_scale", scale.reshape(shape))], [name],
                                      name=f"{name}_Dequantize")]
        self.before.setdefault(first, []).extend(nodes)

    def _embedding(self, target: Target, tensor: TensorProto) -> None:
        table = self.read(target.name)
        dtype = table.dtype
        if target.bits == 4:
            q, scale = wo.int4_blocks_rtn(table.T, self.block_size)  # blocks along the row
            del table
            qname = self._add_int4(f"{target.name}_q4", np.ascontiguousarray(q.T))
            sname = self._add(f"{target.name}_scales", scale.T.astype(dtype))
            self.needs.add("com.microsoft")
            for i, _ in target.uses:
                node = self.model.graph.node[i]
                self.instead[i] = [helper.make_node(
                    "GatherBlockQuantized", [qname, node.input[1], sname], list(node.output), name=node.name + "_Q4",
                    domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=self.block_size)]
            return
        q, scale = wo.int8_per_channel(table, 0)
        del table
        qname = self._add(f"{target.name}_q8", q)
        sname = self._add(f"{target.name}_row_scale", scale.reshape(-1, 1))  # [V, 1]: broadcasts over the row
        for i, _ in target.uses:  # gather int8 rows and their scales: the table is never dequantized whole
            node = self.model.graph.node[i]
            base = node.name or target.name
            rows, scales, floats = f"{base}_q8_rows", f"{base}_q8_scales", f"{base}_q8_float"
            self.instead[i] = [
                helper.make_node("Gather", [qname, node.input[1]], [rows], name=f"{base}_q8", axis=0),
                helper.make_node("Gather", [sname, node.input[1]], [scales], name=f"{base}_q8_scale", axis=0),
                helper.make_node("Cast", [rows], [floats], name=f"{base}_q8_cast", to=tensor.data_type),
                helper.make_node("Mul", [floats, scales], list(node.output), name=f"{base}_q8_dequantize"),
            ]

    def _int4(self, target: Target, tensor: TensorProto, algorithm: str, extra: dict) -> None:
        w = self.weight_kn(target)
        dtype = FLOAT_TYPES[tensor.data_type]
        s = extra.get("awq_scale")
        if s is not None:
            w = w * s[:, None]
        if self.kernel == "dispatch" and self._int8_kernel_fits(w.shape[0], tensor, extra):
            wd.rewrite(self, target, w, s)  # both kernels' forms from one stored form (``weight_dispatch``)
            return
        if self._int8_kernel_fits(w.shape[0], tensor, extra):
            ik.rewrite(self, target, w, s)  # int4 for the int8 kernel (``weight_int8_kernel``)
            return
        if "hessian" in extra:
            q, scale = wo.int4_blocks_gptq(w, extra["hessian"], self.block_size)
            packed, scales_nk = None, scale.T
        else:
            fast = wo.ort_rtn_nbits(w, self.block_size) if wo.runtime_has("MatMulNBits") else None
            if fast is not None:
                packed, scales_nk = fast
            else:
                q, scale = wo.int4_blocks_rtn(w, self.block_size)
                packed, scales_nk = None, scale.T
        k, n = w.shape
        del w
        activation = self._awq_input(target, s, dtype) if s is not None else None
        nbits = wo.runtime_has("MatMulNBits")
        if nbits:
            bname = self._add(f"{target.name}_Q4", packed if packed is not None else wo.pack_nbits(q, self.block_size))
            self.needs.add("com.microsoft")
        else:
            bname = self._add_int4(f"{target.name}_q4", q)
            self.needs.add("opset21")
        sname = self._add(f"{target.name}_scales", np.ascontiguousarray(scales_nk if nbits else scales_nk.T).astype(dtype))
        for i, _ in target.uses:
            node = self.model.graph.node[i]
            a = activation or node.input[0]
            if not nbits:  # QDQ int4: blocked DequantizeLinear -> the original MatMul / Gemm on [K, N]
                out = f"{target.name}_dequantized"
                if not any(o == out for nodes in self.before.values() for n_ in nodes for o in n_.output):
                    self.before.setdefault(min(u for u, _ in target.uses), []).append(helper.make_node(
                        "DequantizeLinear", [bname, sname], [out], name=f"{target.name}_DequantizeLinear",
                        axis=0, block_size=self.block_size))
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                copy.input[0], copy.input[1] = a, out
                if node.op_type == "Gemm":
                    for attr in copy.attribute:
                        if attr.name == "transB":
                            attr.i = 0
                self.instead[i] = [copy]
                continue
            attrs = dict(K=k, N=n, bits=4, block_size=self.block_size)
            if self.accuracy_level:
                attrs["accuracy_level"] = self.accuracy_level
            has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
            out = f"{node.output[0]}_nobias" if has_bias else node.output[0]
            nodes = [helper.make_node("MatMulNBits", [a, bname, sname], [out], name=(node.name or target.name) + "_Q4",
                                      domain="com.microsoft", **attrs)]
            if has_bias:
                nodes.append(helper.make_node("Add", [out, node.input[2]], [node.output[0]], name=(node.name or target.name) + "_bias"))
            self.instead[i] = nodes

    def int4_cast(self) -> bool:
        """Whether the int8-kernel form stores its 4-bit values as an INT4 tensor (3 bytes a weight
        of expansion at load instead of 6): the runtime casts INT4 to int8, and the model is at opset
        21 or can be raised to it (checked once, on a copy without weights)."""
        if self._int4_cast is None:
            self._int4_cast = wo.runtime_has("CastInt4") and (self.opset >= 21 or _raises_to_21(self.model))
        return self._int4_cast

    def _dynamic_fits(self, target: Target, tensor: TensorProto) -> bool:
        """int8 weights read by ``DynamicQuantizeMatMul``: asked for (not ``folded``), a float32
        MatMul/Gemm weight (the kernel's activations are float32), Gemms that are A @ B (+ C), a
        runtime with the kernel."""
        graph = self.model.graph
        return (self.kernel in ("int8", "dispatch") and not self.folded and target.kind in ("matmul", "gemm")
                and tensor.data_type == TensorProto.FLOAT
                and all(graph.node[i].op_type == "MatMul" or gemm_is_matmul(graph.node[i]) for i, _ in target.uses)
                and wo.runtime_has("DynamicQuantizeMatMul"))

    def _int8_kernel_fits(self, k: int, tensor: TensorProto, extra: dict) -> bool:
        """The int8-kernel form: asked for, a float32 weight in whole blocks, RTN or AWQ (GPTQ picks
        float block scales), opset 11 (BitShift) and a runtime with DynamicQuantizeMatMul."""
        return (self.kernel in ("int8", "dispatch") and tensor.data_type == TensorProto.FLOAT and "hessian" not in extra
                and self.opset >= 11 and ik.fits(k, self.block_size) and wo.runtime_has("DynamicQuantizeMatMul"))

    def _awq_input(self, target: Target, s: np.ndarray, dtype) -> str:
        """The activation divided by AWQ's scale, one Mul per shared input (the weights took the product)."""
        if target.input in self._scaled_inputs:
            return self._scaled_inputs[target.input]
        out = f"{target.input}_awq_scaled"
        inv = self._add(f"{target.input}_awq_inverse_scale", (1.0 / s).astype(dtype))  # the activation's type
        first = min(i for i, _ in target.uses)
        self.before.setdefault(first, []).append(helper.make_node("Mul", [target.input, inv], [out], name=f"{out}_Mul"))
        self._scaled_inputs[target.input] = out
        return out

    # -- result -------------------------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        """The new model: nodes rewritten in place of the old ones, every weight in memory."""
        model, graph = self.model, self.model.graph
        out = onnx.ModelProto()
        copy_fields(model, out, skip={"graph"})
        copy_fields(graph, out.graph, skip={"initializer", "node", "input"})
        out.graph.input.extend(i for i in graph.input if i.name not in self.replaced)
        out.graph.node.extend(self._nodes(self.instead))
        for tensor in graph.initializer:
            if tensor.name in self.replaced:
                continue
            tensor = self._originals.get(tensor.name, tensor)
            target = out.graph.initializer.add()
            if tensor.data_location == TensorProto.EXTERNAL:  # stays float: read it in (small next to the rest)
                target.CopyFrom(numpy_helper.from_array(self._read_tensor(tensor), tensor.name))
            else:
                target.CopyFrom(tensor)
        out.graph.initializer.extend(self.new_inits)
        if "com.microsoft" in self.needs and not any(i.domain == "com.microsoft" for i in out.opset_import):
            out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        if "int4" in self.needs or "opset21" in self.needs:
            out.ir_version = max(out.ir_version, 10)  # INT4 tensors exist from IR 10
        if "opset21" in self.needs and self.opset < 21:
            out = _upgrade_opset(out, 21)
        if self.hoisted:  # the pass raised a dispatch model's opset before: its branches need none
            wd.assemble(out, self.hoisted, self._nodes({**self.instead, **self.instead_then}), list(out.graph.node))
        return out

    def _nodes(self, instead: Dict[int, List[onnx.NodeProto]]) -> List[onnx.NodeProto]:
        """The graph's nodes with those in ``instead`` replaced and ``before`` inserted."""
        nodes: List[onnx.NodeProto] = []
        for i, node in enumerate(self.model.graph.node):
            nodes.extend(self.before.get(i, ()))
            if node.op_type == "Constant" and node.output and node.output[0] in self.replaced:
                continue  # a weight held by a Constant node: its quantized form replaces it
            nodes.extend(instead.get(i, [node]))
        return nodes

    def stats(self) -> dict:
        before = sum(self.replaced.values())
        after = sum(_stored_bytes(t) for t in self.new_inits)
        return {"weights_quantized": len(self.replaced), "formats": dict(sorted(self.counts.items())),
                "float_bytes": before, "quantized_bytes": after}


def _stored_bytes(tensor: TensorProto) -> int:
    from graphprune.external_data import tensor_bytes

    known = tensor_bytes(tensor)
    return known if known is not None else len(tensor.raw_data)


def _upgrade_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """Blocked DequantizeLinear and Cast from INT4 exist from opset 21: the rest of the graph is raised to it
    (``opset_upgrade.raise_opset``: a relabel where no op's schema differs, onnx's converter otherwise)."""
    from graphprune.opset_upgrade import raise_opset

    try:
        return raise_opset(model, version)
    except UserError as exc:
        raise UserError(f"int4 needs opset {version} here and the model cannot be converted to it: {exc}") from None


def _raises_to_21(model: onnx.ModelProto) -> bool:
    """Whether ``model``'s graph can be raised to opset 21 (tried on a copy without large weights)."""
    from graphprune.ir import weightless_copy

    try:
        _upgrade_opset(weightless_copy(model), 21)
    except UserError:
        return False
    return True

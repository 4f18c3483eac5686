"""Transformer test models written the way torch.onnx exports Hugging Face models (no torch needed).

Every builder is deterministic in ``seed`` and returns an opset 17 / IR 8 ``onnx.ModelProto`` with
an int64 ``input_ids`` input of shape [batch, seq]; ``batch`` and ``seq`` are symbolic names by
default and every reshape is written with 0 / -1 entries or shapes taken from ``Shape``, so any
batch size and any sequence length up to ``max_positions`` run.

Linear layers on [N, S, F] tensors are exported as ``MatMul`` + ``Add``; their weight initializers
(``<module>.weight``) are stored [in, out] (``x @ W``), the transposed torch layout an export
writes, so output features (and heads) are weight axis 1.  Weights are N(0, 1/fan_in) with a
per-output-feature magnitude spread (so head and neuron importance criteria have something to
rank); embeddings are N(0, 1), LayerNorm scales near 1.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import onnx
from onnx import TensorProto

from graphprune.testing.builder import GraphBuilder

__all__ = ["bert_encoder", "bert_base_like", "gpt_decoder"]

Dim = Union[int, str]

# Spread of per-output-feature weight magnitudes (log-normal sigma).
_FEATURE_SPREAD = 0.3
_LN_EPS = 1e-12


class _TransformerBuilder(GraphBuilder):
    """``GraphBuilder`` plus the layer idioms of exported transformers."""

    def linear(self, x: str, module: str, fan_in: int, fan_out: int, bias: bool = True) -> str:
        w = self.rng.standard_normal((fan_in, fan_out), dtype=np.float32) / np.float32(math.sqrt(fan_in))
        w *= np.exp(self.rng.normal(0.0, _FEATURE_SPREAD, size=(1, fan_out))).astype(np.float32)
        y = self.op("MatMul", [x, self.initializer(f"{module}.weight", w)], module)
        if not bias:
            return y
        b = self.rng.normal(0.0, 0.02, fan_out)
        return self.op("Add", [self.initializer(f"{module}.bias", b), y], module)

    def layer_norm(self, x: str, module: str, hidden: int, decomposed: bool = False) -> str:
        gamma = self.initializer(f"{module}.weight", 1.0 + self.rng.normal(0.0, 0.1, hidden))
        beta = self.initializer(f"{module}.bias", self.rng.normal(0.0, 0.02, hidden))
        if not decomposed:
            return self.op("LayerNormalization", [x, gamma, beta], module, axis=-1, epsilon=_LN_EPS)
        # The pre-opset-17 export: mean and variance over the last axis written out.
        mean = self.op("ReduceMean", [x], module, axes=[-1], keepdims=1)
        centered = self.op("Sub", [x, mean], module)
        square = self.op("Pow", [centered, self.constant(np.float32(2.0), module)], module)
        var = self.op("ReduceMean", [square], module, axes=[-1], keepdims=1)
        std = self.op("Sqrt", [self.op("Add", [var, self.constant(np.float32(_LN_EPS), module)], module)], module)
        normed = self.op("Div", [centered, std], module)
        return self.op("Add", [self.op("Mul", [normed, gamma], module), beta], module)

    def gelu(self, x: str, module: str) -> str:
        """x * 0.5 * (1 + erf(x / sqrt(2))), as exported before opset 20 added Gelu."""
        scaled = self.op("Div", [x, self.constant(np.float32(math.sqrt(2.0)), module)], module)
        erf = self.op("Erf", [scaled], module)
        one_plus = self.op("Add", [erf, self.constant(np.float32(1.0), module)], module)
        return self.op("Mul", [self.op("Mul", [x, one_plus], module), self.constant(np.float32(0.5), module)], module)

    def silu(self, x: str, module: str) -> str:
        return self.op("Mul", [x, self.op("Sigmoid", [x], module)], module)

    def dim(self, shape: str, index: int, module: str) -> str:
        """One dim of a ``Shape`` output as a 1-element int64 tensor (for Concat / Slice)."""
        scalar = self.op("Gather", [shape, self.constant(np.int64(index), module)], module, axis=0)
        return self.op("Unsqueeze", [scalar, self.ints([0], module)], module)

    def embeddings(self, ids: str, module: str, vocab: int, hidden: int, max_positions: int,
                   word: str = "word_embeddings", position: str = "position_embeddings") -> str:
        """Token Gather + learned position Gather (position ids sliced to the sequence length)."""
        table = self.initializer(f"{module}.{word}.weight", self.rng.standard_normal((vocab, hidden), dtype=np.float32))
        tokens = self.op("Gather", [table, ids], f"{module}.{word}", axis=0)
        position_ids = self.initializer(f"{module}.position_ids", np.arange(max_positions, dtype=np.int64)[None, :])
        seq = self.dim(self.op("Shape", [ids], module), 1, module)
        ids_now = self.op("Slice", [position_ids, self.ints([0], module), seq, self.ints([1], module)], module)
        pos_table = self.initializer(
            f"{module}.{position}.weight", self.rng.standard_normal((max_positions, hidden), dtype=np.float32)
        )
        positions = self.op("Gather", [pos_table, ids_now], f"{module}.{position}", axis=0)
        return self.op("Add", [tokens, positions], module)

    def split_heads(self, x: str, module: str, heads: int, head_dim: int) -> str:
        """[N, S, heads * hd] -> [N, heads, S, hd] with a Reshape that keeps dynamic N and S."""
        y = self.op("Reshape", [x, self.ints([0, 0, heads, head_dim], module)], module)
        return self.op("Transpose", [y], module, perm=[0, 2, 1, 3])

    def merge_heads(self, x: str, module: str, hidden: int) -> str:
        """[N, heads, S, hd] -> [N, S, heads * hd]."""
        y = self.op("Transpose", [x], module, perm=[0, 2, 1, 3])
        return self.op("Reshape", [y, self.ints([0, 0, hidden], module)], module)


def _ids_input(b: GraphBuilder, batch: Dim, seq: Dim) -> str:
    return b.input("input_ids", [batch, seq], TensorProto.INT64)


def bert_encoder(
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    ffn: int = 256,
    seq: Dim = "S",
    batch: Dim = "N",
    vocab: int = 100,
    max_positions: int = 128,
    num_labels: int = 2,
    decomposed_layernorm: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    """A BERT encoder (Hugging Face naming) with a pooled classifier.

    Exercises: embedding ``Gather`` + position ids ``Slice``d to the dynamic length; per layer
    Q/K/V ``MatMul`` + ``Add`` whose output features are coupled in head_dim blocks through
    ``Reshape [0, 0, heads, head_dim]`` and ``Transpose``; QK^T, ``Div`` by sqrt(head_dim),
    ``Softmax``; the output projection whose input rows follow the heads; residual ``Add`` +
    ``LayerNormalization`` (or, with ``decomposed_layernorm``, ReduceMean/Sub/Pow/ReduceMean/Add/
    Sqrt/Div/Mul/Add); an Erf-based GELU FFN whose hidden neurons couple its two weights.

    Outputs: ``last_hidden_state`` [batch, seq, hidden], ``logits`` [batch, num_labels] (first token
    -> pooler Gemm -> Tanh -> classifier Gemm).
    """
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
    head_dim = hidden // heads
    b = _TransformerBuilder("bert_encoder", seed)
    ids = _ids_input(b, batch, seq)
    x = b.embeddings(ids, "embeddings", vocab, hidden, max_positions)
    x = b.layer_norm(x, "embeddings.LayerNorm", hidden, decomposed_layernorm)
    scale = b.initializer("attention_scale", np.array(math.sqrt(head_dim), dtype=np.float32))
    for layer in range(layers):
        prefix = f"encoder.layer.{layer}"
        attn = f"{prefix}.attention.self"
        q = b.split_heads(b.linear(x, f"{attn}.query", hidden, hidden), f"{attn}", heads, head_dim)
        k = b.op("Reshape", [b.linear(x, f"{attn}.key", hidden, hidden), b.ints([0, 0, heads, head_dim], attn)], attn)
        k = b.op("Transpose", [k], attn, perm=[0, 2, 3, 1])  # [N, heads, hd, S]: K^T directly
        v = b.split_heads(b.linear(x, f"{attn}.value", hidden, hidden), attn, heads, head_dim)
        scores = b.op("Div", [b.op("MatMul", [q, k], attn), scale], attn)
        probs = b.op("Softmax", [scores], attn, axis=-1)
        context = b.merge_heads(b.op("MatMul", [probs, v], attn), attn, hidden)
        out = b.linear(context, f"{prefix}.attention.output.dense", hidden, hidden)
        x = b.layer_norm(b.op("Add", [out, x], f"{prefix}.attention.output"), f"{prefix}.attention.output.LayerNorm",
                         hidden, decomposed_layernorm)
        inner = b.gelu(b.linear(x, f"{prefix}.intermediate.dense", hidden, ffn), f"{prefix}.intermediate.intermediate_act_fn")
        out = b.linear(inner, f"{prefix}.output.dense", ffn, hidden)
        x = b.layer_norm(b.op("Add", [out, x], f"{prefix}.output"), f"{prefix}.output.LayerNorm", hidden, decomposed_layernorm)
    x = b.output(x, "last_hidden_state", [batch, seq, hidden])
    first = b.op("Gather", [x, b.constant(np.int64(0), "pooler")], "pooler", axis=1)
    pooled = b.op("Tanh", [_gemm(b, first, "pooler.dense", hidden, hidden)], "pooler.activation")
    b.output(_gemm(b, pooled, "classifier", hidden, num_labels), "logits", [batch, num_labels])
    return b.build(f"BERT encoder ({layers} layers, hidden {hidden}, {heads} heads, ffn {ffn})")


def bert_base_like(layers: int = 12, hidden: int = 768, heads: int = 12, ffn: int = 3072,
                   vocab: int = 30522, max_positions: int = 512, **kwargs) -> onnx.ModelProto:
    """``bert_encoder`` at BERT-base size (about 110M parameters), for benchmarks."""
    return bert_encoder(layers=layers, hidden=hidden, heads=heads, ffn=ffn, vocab=vocab,
                        max_positions=max_positions, **kwargs)


def _gemm(b: _TransformerBuilder, x: str, module: str, fan_in: int, fan_out: int) -> str:
    """nn.Linear on a 2-D tensor: Gemm(transB=1) with a torch-layout [out, in] weight."""
    w = b.rng.standard_normal((fan_out, fan_in), dtype=np.float32) / np.float32(math.sqrt(fan_in))
    bias = b.rng.normal(0.0, 0.02, fan_out)
    return b.op("Gemm", [x, b.initializer(f"{module}.weight", w), b.initializer(f"{module}.bias", bias)], module,
                alpha=1.0, beta=1.0, transB=1)


def gpt_decoder(
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: Optional[int] = None,
    ffn: int = 256,
    gated: bool = False,
    seq: Dim = "S",
    batch: Dim = "N",
    vocab: int = 100,
    max_positions: int = 128,
    seed: int = 0,
) -> onnx.ModelProto:
    """A pre-LayerNorm causal decoder (Llama-style naming) with an LM head.

    Exercises: a causal mask (a constant lower-triangular [1, 1, max, max] bool buffer ``Slice``d to
    [S, S] with bounds from ``Shape``, applied with ``Where`` before ``Softmax``); grouped-query
    attention when ``kv_heads`` < ``heads`` (K/V projections of kv_heads * head_dim features,
    repeated as Hugging Face exports ``repeat_kv``: Unsqueeze to [N, kv, 1, S, hd] -> ``Expand`` ->
    ``Reshape`` [N, heads, S, hd], shapes built from ``Shape``), so a pruned KV head drags its query
    group along; the FFN is GELU (``gated`` False, with biases) or SwiGLU (``gated`` True, no biases:
    silu(x @ Wg) * (x @ Wu) @ Wd, where gate and up neurons are coupled).

    Output: ``logits`` [batch, seq, vocab].
    """
    kv_heads = kv_heads or heads
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"need hidden % heads == 0 and heads % kv_heads == 0 (got {hidden}, {heads}, {kv_heads})")
    head_dim = hidden // heads
    bias = not gated
    b = _TransformerBuilder("gpt_decoder", seed)
    ids = _ids_input(b, batch, seq)
    x = b.embeddings(ids, "model", vocab, hidden, max_positions, word="embed_tokens", position="embed_positions")
    causal = b.initializer("model.causal_mask", np.tril(np.ones((max_positions, max_positions), dtype=bool))[None, None])
    scale = b.initializer("model.attention_scale", np.array(math.sqrt(head_dim), dtype=np.float32))
    masked_value = b.initializer("model.mask_value", np.array(np.finfo(np.float32).min, dtype=np.float32))
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        attn = f"{prefix}.self_attn"
        h = b.layer_norm(x, f"{prefix}.input_layernorm", hidden)
        q = b.split_heads(b.linear(h, f"{attn}.q_proj", hidden, hidden, bias), attn, heads, head_dim)
        k = b.split_heads(b.linear(h, f"{attn}.k_proj", hidden, kv_heads * head_dim, bias), attn, kv_heads, head_dim)
        v = b.split_heads(b.linear(h, f"{attn}.v_proj", hidden, kv_heads * head_dim, bias), attn, kv_heads, head_dim)
        if kv_heads != heads:
            k = _repeat_kv(b, k, attn, kv_heads, heads // kv_heads, head_dim)
            v = _repeat_kv(b, v, attn, kv_heads, heads // kv_heads, head_dim)
        k_t = b.op("Transpose", [k], attn, perm=[0, 1, 3, 2])
        scores = b.op("Div", [b.op("MatMul", [q, k_t], attn), scale], attn)
        length = b.dim(b.op("Shape", [scores], attn), 2, attn)
        bounds = b.op("Concat", [length, length], attn, axis=0)
        mask = b.op("Slice", [causal, b.ints([0, 0], attn), bounds, b.ints([2, 3], attn)], attn)
        probs = b.op("Softmax", [b.op("Where", [mask, scores, masked_value], attn)], attn, axis=-1)
        context = b.merge_heads(b.op("MatMul", [probs, v], attn), attn, hidden)
        x = b.op("Add", [x, b.linear(context, f"{attn}.o_proj", hidden, hidden, bias)], prefix)
        h = b.layer_norm(x, f"{prefix}.post_attention_layernorm", hidden)
        mlp = f"{prefix}.mlp"
        if gated:
            gate = b.silu(b.linear(h, f"{mlp}.gate_proj", hidden, ffn, bias=False), f"{mlp}.act_fn")
            up = b.linear(h, f"{mlp}.up_proj", hidden, ffn, bias=False)
            out = b.linear(b.op("Mul", [gate, up], mlp), f"{mlp}.down_proj", ffn, hidden, bias=False)
        else:
            inner = b.gelu(b.linear(h, f"{mlp}.fc1", hidden, ffn), f"{mlp}.act_fn")
            out = b.linear(inner, f"{mlp}.fc2", ffn, hidden)
        x = b.op("Add", [x, out], prefix)
    x = b.layer_norm(x, "model.norm", hidden)
    b.output(b.linear(x, "lm_head", hidden, vocab, bias=False), "logits", [batch, seq, vocab])
    kind = "SwiGLU" if gated else "GELU"
    return b.build(f"GPT decoder ({layers} layers, hidden {hidden}, {heads} heads / {kv_heads} kv, {kind} ffn {ffn})")


def _repeat_kv(b: _TransformerBuilder, x: str, module: str, kv_heads: int, repeats: int, head_dim: int) -> str:
    """[N, kv, S, hd] -> [N, kv * repeats, S, hd] as HF's repeat_kv exports (Expand, then Reshape)."""
    shape = b.op("Shape", [x], module)
    n, s = b.dim(shape, 0, module), b.dim(shape, 2, module)
    kv, rep, hd = b.ints([kv_heads], module), b.ints([repeats], module), b.ints([head_dim], module)
    expanded = b.op("Expand", [b.op("Unsqueeze", [x, b.ints([2], module)], module),
                               b.op("Concat", [n, kv, rep, s, hd], module, axis=0)], module)
    target = b.op("Concat", [n, b.ints([kv_heads * repeats], module), s, hd], module, axis=0)
    return b.op("Reshape", [expanded, target], module)

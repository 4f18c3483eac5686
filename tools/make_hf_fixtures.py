"""Developer-only: export tiny Hugging Face transformers to ONNX as tests/fixtures/hf/*.onnx.

Not a project dependency and not run by CI: it needs torch and transformers, installed in a side venv:

    python3.11 -m venv /tmp/hfenv
    /tmp/hfenv/bin/pip install torch==2.13.0 transformers onnx==1.23.2 onnxruntime==1.32.0 onnxscript
    /tmp/hfenv/bin/python tools/make_hf_fixtures.py [--out tests/fixtures/hf]

Each model is built from its config class with seeded random weights (no hub download; seed 0 before
each model, so adding one changes no other): 2 layers, hidden 64, 4 heads (Llama, Qwen2: 2 KV heads,
grouped-query attention), intermediate 128, vocab 100, eager attention: BERT, GPT-2, Llama, DistilBERT,
RoBERTa, Qwen2, ViT (32x32 images, 8x8 patches), T5's encoder and Whisper's encoder (16 mel bins, 32
frames); each exported by torch's TorchScript exporter (opset 17) and its dynamo exporter (opset 20).
Text models read ``input_ids`` [batch, sequence] (both axes dynamic), ViT ``pixel_values`` and Whisper
``input_features`` (batch dynamic); the only output is ``logits`` (GPT-2, Llama, Qwen2) or
``last_hidden_state``.  ``<name>.npz`` holds the example input and transformers' output for it.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnx
import torch
import transformers

_COMMON = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=100)


class Spec:
    """One architecture: its model, the graph's input (``input_ids`` [batch, sequence], or float
    features of a fixed trailing shape) and output names, and whether it takes an attention mask."""

    def __init__(self, make, feature_shape=None, output="logits", mask=True):
        self.make, self.feature_shape, self.output, self.mask = make, feature_shape, output, mask

    @property
    def input(self):
        return "input_ids" if self.feature_shape is None else ("pixel_values" if len(self.feature_shape) == 3
                                                                else "input_features")

    def example(self):
        """The example batch (also the inputs of the saved reference outputs)."""
        if self.feature_shape is None:
            return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
        return torch.randn(2, *self.feature_shape, generator=torch.Generator().manual_seed(1))


def _specs():
    """name -> Spec of each architecture (built from its config: no hub download)."""
    t = transformers
    hidden = "last_hidden_state"
    whisper = t.WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                              decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128, num_mel_bins=16,
                              max_source_positions=16, max_target_positions=16, vocab_size=100,
                              pad_token_id=1, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    return {
        "bert": Spec(lambda: t.BertModel(t.BertConfig(**_COMMON, max_position_embeddings=64)), output=hidden),
        "gpt2": Spec(lambda: t.GPT2LMHeadModel(t.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_inner=128, vocab_size=100,
                                                    n_positions=64))),
        "llama": Spec(lambda: t.LlamaForCausalLM(t.LlamaConfig(**_COMMON, num_key_value_heads=2, max_position_embeddings=64))),
        "distilbert": Spec(lambda: t.DistilBertModel(t.DistilBertConfig(n_layers=2, dim=64, n_heads=4, hidden_dim=128,
                                                                vocab_size=100, max_position_embeddings=64)),
                           output=hidden),
        "roberta": Spec(lambda: t.RobertaModel(t.RobertaConfig(**_COMMON, max_position_embeddings=80, pad_token_id=1)),
                        output=hidden),
        "qwen2": Spec(lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**_COMMON, num_key_value_heads=2, max_position_embeddings=64))),
        "vit": Spec(lambda: t.ViTModel(t.ViTConfig(**_COMMON, image_size=32, patch_size=8), add_pooling_layer=False),
                    feature_shape=(3, 32, 32), output=hidden, mask=False),
        "t5_encoder": Spec(lambda: t.T5EncoderModel(t.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                                       vocab_size=100, relative_attention_num_buckets=8)),
                           output=hidden),
        # the encoder reads exactly 2 * max_source_positions frames: only the batch is dynamic
        "whisper_encoder": Spec(lambda: t.WhisperModel(whisper).get_encoder(), feature_shape=(16, 32), output=hidden,
                                mask=False),
    }


def _bench_specs():
    """The same architectures at realistic sizes, for tools/bench_transformer.py (not committed):
    BERT-base (12 layers, 768, 12 heads, FFN 3072, vocab 30522); Llama and Qwen2 with GQA at hidden
    1024 (16 heads, 4 KV heads, FFN 2816, vocab 32000); the others at their base configs' widths; all
    but BERT with 6 layers (export and timing time; the pruned fraction per layer is the same)."""
    t = transformers
    hidden = "last_hidden_state"
    gqa = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, intermediate_size=2816,
               num_hidden_layers=6, vocab_size=32000, max_position_embeddings=512)
    whisper = t.WhisperConfig(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048,
                              decoder_layers=1, decoder_attention_heads=8, decoder_ffn_dim=2048, num_mel_bins=80,
                              max_source_positions=1500)
    return {
        "bert": Spec(lambda: t.BertModel(t.BertConfig()), output=hidden),
        "gpt2": Spec(lambda: t.GPT2LMHeadModel(t.GPT2Config(n_layer=6))),
        "llama": Spec(lambda: t.LlamaForCausalLM(t.LlamaConfig(**gqa))),
        "distilbert": Spec(lambda: t.DistilBertModel(t.DistilBertConfig()), output=hidden),
        "roberta": Spec(lambda: t.RobertaModel(t.RobertaConfig(num_hidden_layers=6, vocab_size=50265,
                                                               max_position_embeddings=514)), output=hidden),
        "qwen2": Spec(lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**gqa))),
        "vit": Spec(lambda: t.ViTModel(t.ViTConfig(num_hidden_layers=6), add_pooling_layer=False),
                    feature_shape=(3, 224, 224), output=hidden, mask=False),
        "t5_encoder": Spec(lambda: t.T5EncoderModel(t.T5Config(d_model=768, d_kv=64, d_ff=3072, num_layers=6,
                                                               num_heads=12)), output=hidden),
        "whisper_encoder": Spec(lambda: t.WhisperModel(whisper).get_encoder(), feature_shape=(80, 3000), output=hidden,
                                mask=False),
    }


class _Wrapper(torch.nn.Module):
    """The one input -> the first output, without cache (the exported graph has one input, one output)."""

    def __init__(self, spec: Spec, model: torch.nn.Module):
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, x):
        kwargs = {self.spec.input: x, "return_dict": True}
        if self.spec.mask:
            # an all-ones mask: without one, transformers 5.x looks for packed sequences (torch.diff,
            # which the TorchScript exporter cannot write)
            kwargs["attention_mask"] = torch.ones_like(x)
        if self.spec.output == "logits":
            kwargs["use_cache"] = False
        out = self.model(**kwargs)
        return out.logits if self.spec.output == "logits" else out.last_hidden_state


def _export(spec: Spec, model: torch.nn.Module, exporter: str, path: str) -> None:
    x = spec.example()
    kwargs = dict(input_names=[spec.input], output_names=[spec.output])
    varying = {0: "batch", 1: "sequence"} if spec.feature_shape is None else {0: "batch"}
    if exporter == "dynamo":
        dims = {0: torch.export.Dim("batch")}
        if spec.feature_shape is None:
            dims[1] = torch.export.Dim("sequence", max=64)
        torch.onnx.export(model, (x,), path, dynamo=True, opset_version=20, external_data=False,
                          dynamic_shapes={"x": dims}, **kwargs)
    else:
        axes = {spec.input: varying, spec.output: varying}
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, dynamic_axes=axes, **kwargs)
    checked = onnx.load(path)
    onnx.checker.check_model(checked, full_check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf"))
    parser.add_argument("--only", nargs="*", help="names to make (default: all)")
    parser.add_argument("--bench", action="store_true",
                        help="realistic sizes for tools/bench_transformer.py (no reference outputs)")
    parser.add_argument("--exporters", nargs="+", default=["torchscript", "dynamo"])
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, spec in (_bench_specs() if args.bench else _specs()).items():
        if args.only and name not in args.only:
            continue
        torch.manual_seed(0)
        inner = spec.make()
        inner.config._attn_implementation = "eager"
        model = _Wrapper(spec, inner).eval()
        with torch.no_grad():  # no two parameters equal (zero biases, unit norms): torch's exporter would
            for param in model.parameters():  # share one initializer between them, coupling layers
                param.add_(0.02 * torch.randn_like(param))
            x = spec.example()
            if not args.bench:
                np.savez(os.path.join(args.out, f"{name}.npz"), **{spec.input: x.numpy(), spec.output: model(x).numpy()})
        for exporter in args.exporters:
            path = os.path.join(args.out, f"{name}_{exporter}.onnx")
            try:
                with torch.no_grad():
                    _export(spec, model, exporter, path)
            except Exception as exc:  # noqa: BLE001 -- reported; the other exports go on
                print(f"{path}: export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                continue
            print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

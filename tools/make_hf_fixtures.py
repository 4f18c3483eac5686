"""Developer-only: export tiny Hugging Face transformers to ONNX as tests/fixtures/hf/*.onnx.

Not a project dependency and not run by CI: it needs torch and transformers, installed in a side venv:

    python3.11 -m venv /tmp/hfenv
    /tmp/hfenv/bin/pip install torch==2.13.0 transformers onnx==1.23.2 onnxruntime==1.32.0 onnxscript
    /tmp/hfenv/bin/python tools/make_hf_fixtures.py [--out tests/fixtures/hf]

Each model is built from its config class with seeded random weights (no hub download): 2 layers,
hidden 64, 4 heads (Llama: 2 KV heads, grouped-query attention), intermediate 128, vocab 100; and
exported by torch's TorchScript exporter (opset 17) and its dynamo exporter (opset 20), with
dynamic batch and sequence axes.  The graph's only input is ``input_ids`` [batch, sequence] and its
only output ``logits`` (GPT-2, Llama) or ``last_hidden_state`` (BERT).
"""

from __future__ import annotations

import argparse
import os

import onnx
import torch
import transformers

_COMMON = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=100)


def _configs():
    """name -> (model class, config) of each architecture."""
    return {
        "bert": (transformers.BertModel, transformers.BertConfig(**_COMMON, max_position_embeddings=64)),
        "gpt2": (transformers.GPT2LMHeadModel,
                 transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_inner=128, vocab_size=100, n_positions=64)),
        "llama": (transformers.LlamaForCausalLM,
                  transformers.LlamaConfig(**_COMMON, num_key_value_heads=2, max_position_embeddings=64)),
    }


class _Wrapper(torch.nn.Module):
    """input_ids -> the first output, without cache (the exported graph has one input, one output)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        # an all-ones mask: without one, transformers 5.x looks for packed sequences (torch.diff, which
        # the TorchScript exporter cannot write)
        mask = torch.ones_like(input_ids)
        out = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False, return_dict=True)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _export(name: str, model: torch.nn.Module, exporter: str, path: str) -> None:
    ids = torch.randint(0, 100, (2, 7))
    out_name = "last_hidden_state" if name == "bert" else "logits"
    kwargs = dict(input_names=["input_ids"], output_names=[out_name])
    if exporter == "dynamo":
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=64)
        torch.onnx.export(model, (ids,), path, dynamo=True, opset_version=20, external_data=False,
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}}, **kwargs)
    else:
        axes = {"input_ids": {0: "batch", 1: "sequence"}, out_name: {0: "batch", 1: "sequence"}}
        torch.onnx.export(model, (ids,), path, dynamo=False, opset_version=17, dynamic_axes=axes, **kwargs)
    checked = onnx.load(path)
    onnx.checker.check_model(checked, full_check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, (cls, config) in _configs().items():
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        model = _Wrapper(cls(config).eval())
        with torch.no_grad():  # no two parameters equal (zero biases, unit norms): torch's exporter would
            for param in model.parameters():  # share one initializer between them, coupling layers
                param.add_(0.02 * torch.randn_like(param))
        for exporter in ("torchscript", "dynamo"):
            path = os.path.join(args.out, f"{name}_{exporter}.onnx")
            with torch.no_grad():
                _export(name, model, exporter, path)
            print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

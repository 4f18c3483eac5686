"""Developer-only: export a Llama-style decoder of ~0.5B parameters to ONNX for the LLM benchmark.

Not a project dependency and not run by CI: it needs torch and transformers (the side venv of
tools/make_hf_fixtures.py):

    /tmp/hfenv/bin/python tools/make_llm_fixture.py [--out ~/.cache/graphprune-bench/llm]

The model is built from ``LlamaConfig`` with seeded random weights (no hub download): hidden 1280,
24 layers, 16 query heads and 4 KV heads (grouped-query attention), intermediate 3456, vocab 32000,
untied LM head: 0.50B parameters, 2.0 GB in fp32.  It is exported by torch's TorchScript exporter
(opset 17) without KV cache: one input ``input_ids`` [1, sequence] (sequence dynamic), one output
``logits``; then re-saved with all weights in one external data file ``llama.onnx.data`` (the
exporter alone writes one file per tensor once a model nears protobuf's 2 GiB limit).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import onnx
import torch
import transformers

CONFIG = dict(hidden_size=1280, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4,
              intermediate_size=3456, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


class _Wrapper(torch.nn.Module):
    """input_ids -> logits, without cache (one input, one output)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        # an all-ones mask: without one, transformers 5.x looks for packed sequences (torch.diff, which
        # the TorchScript exporter cannot write)
        mask = torch.ones_like(input_ids)
        return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False, return_dict=True).logits


def build(seed: int = 0) -> torch.nn.Module:
    """The seeded Llama model (eval mode) wrapped to input_ids -> logits."""
    config = transformers.LlamaConfig(**CONFIG)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = _Wrapper(transformers.LlamaForCausalLM(config).eval())
    with torch.no_grad():  # no two parameters equal (unit RMSNorm weights): torch's exporter would share
        for param in model.parameters():  # one initializer between them, coupling the layers
            if param.dim() == 1:
                param.add_(0.02 * torch.randn_like(param))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.expanduser("~/.cache/graphprune-bench/llm"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    model = build(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built: {n_params / 1e9:.3f}B parameters, {time.time() - start:.0f} s", flush=True)
    path = os.path.join(args.out, "llama.onnx")
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        raw = os.path.join(tmp, "raw.onnx")
        ids = torch.randint(0, CONFIG["vocab_size"], (1, 8))
        axes = {"input_ids": {1: "sequence"}, "logits": {1: "sequence"}}
        with torch.no_grad():
            torch.onnx.export(model, (ids,), raw, dynamo=False, opset_version=17, dynamic_axes=axes,
                              input_names=["input_ids"], output_names=["logits"])
        del model
        print(f"exported: {time.time() - start:.0f} s", flush=True)
        proto = onnx.load(raw)  # loads the per-tensor files too
        for name in ("llama.onnx", "llama.onnx.data"):
            if os.path.exists(os.path.join(args.out, name)):
                os.remove(os.path.join(args.out, name))
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="llama.onnx.data", size_threshold=1024)
    del proto
    onnx.checker.check_model(path, full_check=True)
    size = os.path.getsize(path) + os.path.getsize(path + ".data")
    print(f"{path}: {size / 1e9:.3f} GB, {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()

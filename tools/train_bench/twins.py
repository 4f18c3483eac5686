"""Torch twins of the benchmark's models: the same architecture with the ONNX weights, for the torch column."""

from __future__ import annotations


def torch_twin(meta: dict):
    """A torch module computing what the ONNX graph of ``meta['name']`` computes, with its weight names."""
    import torch
    from torch import nn

    F = nn.functional

    class Digits(nn.Module):
        def __init__(self):
            super().__init__()
            for i, (cin, cout) in enumerate(((1, 16), (16, 32), (32, 64))):
                setattr(self, f"conv{i + 1}", nn.Conv2d(cin, cout, 3, padding=1))
                setattr(self, f"bn{i + 1}", nn.BatchNorm2d(cout))
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
            x = F.relu(self.bn3(self.conv3(x)))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu(y + identity)

    class ResNet18(nn.Module):
        def __init__(self, classes):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            cin = 64
            for stage, cout in enumerate((64, 128, 256, 512)):
                stride = 1 if stage == 0 else 2
                setattr(self, f"layer{stage + 1}", nn.Sequential(Block(cin, cout, stride), Block(cout, cout, 1)))
                cin = cout
            self.fc = nn.Linear(512, classes)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    class Linear(nn.Module):
        """An exported Linear: weight stored [in, out] (x @ W + b), as the fixture writes it."""

        def __init__(self, fan_in, fan_out):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(fan_in, fan_out))
            self.bias = nn.Parameter(torch.empty(fan_out))

        def forward(self, x):
            return x @ self.weight + self.bias

    class Layer(nn.Module):
        def __init__(self, hidden, heads, ffn):
            super().__init__()
            self.heads, self.hidden = heads, hidden
            attention = nn.Module()
            attention.self = nn.Module()
            for name in ("query", "key", "value"):
                setattr(attention.self, name, Linear(hidden, hidden))
            attention.output = nn.Module()
            attention.output.dense = Linear(hidden, hidden)
            attention.output.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
            self.attention = attention
            self.intermediate = nn.Module()
            self.intermediate.dense = Linear(hidden, ffn)
            self.output = nn.Module()
            self.output.dense = Linear(ffn, hidden)
            self.output.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

        def forward(self, x):
            n, s, _ = x.shape
            h, d = self.heads, self.hidden // self.heads
            attn = self.attention.self
            q = attn.query(x).view(n, s, h, d).transpose(1, 2)
            k = attn.key(x).view(n, s, h, d).permute(0, 2, 3, 1)
            v = attn.value(x).view(n, s, h, d).transpose(1, 2)
            probs = torch.softmax((q @ k) / torch.tensor(d ** 0.5, dtype=x.dtype), dim=-1)
            context = (probs @ v).transpose(1, 2).reshape(n, s, self.hidden)
            x = self.attention.output.LayerNorm(self.attention.output.dense(context) + x)
            inner = F.gelu(self.intermediate.dense(x))
            return self.output.LayerNorm(self.output.dense(inner) + x)

    class Bert(nn.Module):
        def __init__(self, m):
            super().__init__()
            hidden = m["hidden"]
            self.embeddings = nn.Module()
            self.embeddings.word_embeddings = nn.Embedding(m["vocab"], hidden)
            self.embeddings.position_embeddings = nn.Embedding(m["max_positions"], hidden)
            self.embeddings.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
            self.encoder = nn.Module()
            self.encoder.layer = nn.ModuleList(Layer(hidden, m["heads"], m["ffn"]) for _ in range(m["layers"]))
            self.pooler = nn.Module()
            self.pooler.dense = nn.Linear(hidden, hidden)
            self.classifier = nn.Linear(hidden, m["classes"])

        def forward(self, ids):
            e = self.embeddings
            positions = torch.arange(ids.shape[1])
            x = e.LayerNorm(e.word_embeddings(ids) + e.position_embeddings(positions))
            for layer in self.encoder.layer:
                x = layer(x)
            return self.classifier(torch.tanh(self.pooler.dense(x[:, 0])))

    name = meta["name"]
    if name == "digits":
        return Digits()
    if name == "resnet18":
        return ResNet18(meta["classes"])
    return Bert(meta)


def load_twin(net, weights: dict, trainable) -> None:
    """Copy the ONNX initializers into ``net`` by name; only ``trainable`` ones require gradients."""
    import torch

    trainable = set(trainable)
    missing = []
    for name, tensor in list(net.named_parameters()) + list(net.named_buffers()):
        if name.endswith("num_batches_tracked"):
            continue
        if name not in weights:
            missing.append(name)
            continue
        with torch.no_grad():
            tensor.copy_(torch.from_numpy(weights[name].copy()).reshape(tensor.shape))
        if isinstance(tensor, torch.nn.Parameter):
            tensor.requires_grad_(name in trainable)
    params = {name for name, p in net.named_parameters() if p.requires_grad}
    if missing or params != trainable:
        raise SystemExit(f"torch twin does not match the ONNX model: missing {missing}, "
                         f"trainable differ by {sorted(params ^ trainable)}")

"""The benchmark models, their batches and losses.

Every contender builds its own copy with :func:`build` (same seed, so the same
initial weights) and steps through the same list of batches from :func:`batches`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Sequential):
    """784-512-512-10 with ReLU (the issue's reference model)."""

    def __init__(self):
        super().__init__(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )


class SmallCNN(nn.Module):
    """3x32x32 -> two 3x3 convs (16, 32 channels) with pooling -> 512 -> 128 -> 10."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 16 x 16 x 16
        h = F.max_pool2d(F.relu(self.conv2(h)), 4)  # 32 x 4 x 4
        return self.fc2(F.relu(self.fc1(h.flatten(1))))


class Attention(nn.Module):
    """Multi-head self-attention from plain ops, so that every projection is an
    ``nn.Linear`` that is *called* in forward (``nn.MultiheadAttention`` uses its
    ``out_proj`` weights without calling the module, so no hook would see it)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        n, s, w = x.shape
        q, k, v = self.qkv(x).reshape(n, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(w // self.heads))
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
        weights = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(n, s, w))


class TransformerBlock(nn.Module):
    """Token embedding, one pre-norm block (4 heads, MLP 4x), linear head over 256 tokens."""

    vocab = 256

    def __init__(self, width: int = 128, heads: int = 4, seq: int = 64):
        super().__init__()
        self.embed = nn.Embedding(self.vocab, width)
        self.pos = nn.Parameter(torch.randn(seq, width) * 0.02)
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)
        self.head = nn.Linear(width, self.vocab)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        h = h + self.attn(self.norm1(h))
        h = h + self.fc2(F.gelu(self.fc1(self.norm2(h))))
        return self.head(h)


class Wide(nn.Sequential):
    """Two ``Linear(d, d)`` with a ReLU between (issue 14's width sweep and memory model)."""

    def __init__(self, d: int):
        super().__init__(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))


# the widths of issue 14's scaling table: model "wide<d>" is Wide(d), batch 128
WIDTHS = (128, 512, 1024, 2048)


@dataclass(frozen=True)
class ModelSpec:
    """What a benchmark needs to know about one model."""

    name: str
    description: str
    batch: int
    loss_average: str  # what the (mean) cross-entropy below averages over


SPECS = {
    "mlp": ModelSpec("mlp", "MLP 784-512-512-10, batch 128", 128, "batch"),
    "cnn": ModelSpec("cnn", "CNN 3x32x32, conv16-conv32-fc128-fc10, batch 64", 64, "batch"),
    "transformer": ModelSpec(
        "transformer", "Transformer block, seq 64, width 128, 4 heads, batch 16", 16,
        "batch+sequence",
    ),
    # the character GPT of benchmarks/transformer_bench.py (issue: transformers)
    "chargpt": ModelSpec(
        "chargpt", "character GPT (nanoGPT-style), 2 blocks, width 64, context 64, batch 32, "
        "standard-library text", 32, "batch+sequence",
    ),
    **{f"wide{d}": ModelSpec(f"wide{d}", f"two Linear({d}, {d}), batch 128", 128, "batch")
       for d in WIDTHS},
}


@functools.lru_cache(maxsize=1)
def _corpus():
    from singd_functional.examples import chargpt

    return chargpt.load_corpus()


def build(name: str, seed: int = 0) -> nn.Module:
    """A fresh float32 model; the same ``seed`` gives the same weights."""
    if name == "chargpt":
        from singd_functional.examples import chargpt

        return chargpt.make_model("nanogpt", len(_corpus().vocab), seed=seed)
    torch.manual_seed(seed)
    if name.startswith("wide"):
        return Wide(int(name[4:]))
    return {"mlp": MLP, "cnn": SmallCNN, "transformer": TransformerBlock}[name]()


def batches(name: str, count: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` fixed (inputs, targets) batches of random data."""
    if name == "chargpt":
        from singd_functional.examples import chargpt

        return chargpt.batch_stream(_corpus(), count, SPECS[name].batch, 64, seed)
    g = torch.Generator().manual_seed(seed)
    n = SPECS[name].batch
    out = []
    for _ in range(count):
        if name == "mlp":
            out.append((torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)))
        elif name.startswith("wide"):
            d = int(name[4:])
            out.append((torch.randn(n, d, generator=g), torch.randint(0, d, (n,), generator=g)))
        elif name == "cnn":
            out.append(
                (torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
            )
        else:
            tokens = torch.randint(0, TransformerBlock.vocab, (n, 65), generator=g)
            out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def loss_fn(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every prediction (per sample, or per token)."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1))

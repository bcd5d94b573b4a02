"""Should SINGD precondition ``nn.Embedding`` by default? A small measurement.

The issue's character transformer (``nn.Embedding``, learned positions, two
``nn.TransformerEncoderLayer``, LayerNorm, Linear head; 115,560 parameters) trained on
the standard library's ``.py`` sources (last 10 % held out) with the drop-in ``SINGD``
on every other layer, and the embedding table trained three ways:

* ``singd``: preconditioned as a Kronecker layer (diagonal K over the vocabulary,
  dense C), the same lr as the rest;
* ``heavy-ball``: SINGD's step without preconditioner (SGD with momentum), its own lr;
* ``adamw``: ``torch.optim.AdamW`` on the table alone;
* ``frozen``: not trained, what ``SINGD(model)`` did before the embedding kind (a
  table that is not a layer is left out with ``params=None``).

Usage: ``python -m benchmarks.embedding_choice [--steps 300] [--seeds 0 1]``; writes
``benchmarks/results/embedding_choice.md``.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sysconfig
import time

import torch
import torch.nn.functional as F
from torch import nn

import singd_functional as sf

VOCAB, WIDTH, HEADS, FF, CONTEXT, BATCH = 104, 64, 4, 256, 32, 32
SINGD_HP = dict(lr=0.02, momentum=0.9, damping=0.1, lr_cov=0.01, T=5, alpha1=0.5)


class CharTransformer(nn.Module):
    """The issue's model: 115,560 parameters in 30 tensors."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(torch.zeros(CONTEXT, WIDTH))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(WIDTH, HEADS, FF, dropout=0.0, batch_first=True)
            for _ in range(2)
        )
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT))

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h, src_mask=self.mask, is_causal=True)
        return self.head(self.norm(h))


def corpus(limit=2_000_000):
    """The standard library's .py sources (sorted), mapped to VOCAB - 1 chars + unknown."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    text, size = [], 0
    for path in sorted(root.glob("*.py")):
        chunk = path.read_text(errors="replace")
        text.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    text = "".join(text)[:limit]
    counts: dict[str, int] = {}
    for ch in text:
        counts[ch] = counts.get(ch, 0) + 1
    chars = sorted(counts, key=lambda c: -counts[c])[: VOCAB - 1]
    index = {c: i + 1 for i, c in enumerate(chars)}  # 0: unknown
    ids = torch.tensor([index.get(c, 0) for c in text])
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:]


def batch(ids, g):
    start = torch.randint(0, len(ids) - CONTEXT - 1, (BATCH,), generator=g)
    x = torch.stack([ids[s:s + CONTEXT + 1] for s in start.tolist()])
    return x[:, :-1], x[:, 1:]


def lm_loss(logits, y):
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model, ids, batches=20):
    g = torch.Generator().manual_seed(12345)
    return sum(lm_loss(model(x), y).item() for x, y in (batch(ids, g) for _ in range(batches))) \
        / batches


def run(choice, seed, train_ids, val_ids, steps, emb_lr):
    torch.manual_seed(seed)
    model = CharTransformer()
    others = [p for n, p in model.named_parameters() if n != "embed.weight"]
    extra = None
    if choice == "singd":
        opt = sf.SINGD(model, list(model.parameters()), **SINGD_HP)
    elif choice == "frozen":
        opt = sf.SINGD(model, others, **SINGD_HP)
    else:
        with sf.register_layer_kind(nn.Embedding, None):  # the table is no layer
            groups = [{"params": others}]
            if choice == "heavy-ball":
                groups.append({"params": [model.embed.weight], "lr": emb_lr})
            opt = sf.SINGD(model, groups, **SINGD_HP)
        if choice == "adamw":
            extra = torch.optim.AdamW([model.embed.weight], lr=emb_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        x, y = batch(train_ids, g)
        opt.zero_grad()
        if extra is not None:
            extra.zero_grad()
        loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        if extra is not None:
            extra.step()
        if not math.isfinite(loss.item()):
            return float("nan"), time.perf_counter() - start
    return evaluate(model, val_ids), time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default="benchmarks/results/embedding_choice.md")
    parser.add_argument("--lr", type=float, default=SINGD_HP["lr"], help="SINGD's lr")
    parser.add_argument("--choices", nargs="+", default=None,
                        help="a subset, as name or name:emb_lr (e.g. singd frozen adamw:0.01)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    SINGD_HP["lr"] = args.lr
    train_ids, val_ids = corpus()
    choices = [("singd", None), ("heavy-ball", 0.02), ("heavy-ball", 0.2),
               ("adamw", 3e-3), ("adamw", 1e-2), ("frozen", None)]
    if args.choices:
        choices = [(c.split(":")[0], float(c.split(":")[1]) if ":" in c else None)
                   for c in args.choices]
    rows = []
    for choice, emb_lr in choices:
        for seed in args.seeds:  # interleaved per choice; the machine was shared
            val, seconds = run(choice, seed, train_ids, val_ids, args.steps, emb_lr)
            rows.append((choice, emb_lr, seed, val, seconds))
            print(f"{choice:10s} emb_lr={emb_lr} seed={seed} val={val:.4f} ({seconds:.0f} s)",
                  flush=True)
    lines = [
        f"# Embedding table: preconditioned or not ({args.steps} steps, batch {BATCH}, "
        f"context {CONTEXT}, SINGD {SINGD_HP})",
        "",
        "| embedding trained by | its lr | " + " | ".join(f"val loss seed {s}" for s in args.seeds)
        + " | mean |",
        "|---|---:|" + "---:|" * (len(args.seeds) + 1),
    ]
    for choice, emb_lr in choices:
        vals = [r[3] for r in rows if r[0] == choice and r[1] == emb_lr]
        lr = {"singd": "SINGD's", "frozen": "-"}.get(choice) or f"{emb_lr:g}"
        lines.append(f"| {choice} | {lr} | " + " | ".join(f"{v:.4f}" for v in vals)
                     + f" | {sum(vals) / len(vals):.4f} |")
    pathlib.Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

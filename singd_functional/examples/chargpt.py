"""A small GPT-style character model trained on the standard library's ``.py`` sources.

The corpus ships with every Python: the top-level ``.py`` files of the standard library
(``sysconfig.get_paths()["stdlib"]``), read at run time in sorted order and cut at a
fixed byte budget, so every run of one Python version sees the same text. Tokens are
bytes (the vocabulary is the set of byte values that occur, ~100). The last 10 % is
held out for validation; the validation loss is the mean cross-entropy on a fixed set
of windows of it.

Two model families of the same size (default: 2 blocks, width 64, 4 heads, context 64):

- ``"nanogpt"``: attention written with plain ``nn.Linear`` layers (q, k, v as one
  ``Linear(d, 3d)``, an output ``Linear(d, d)``), pre-norm blocks with a GELU MLP of
  width 4d, as in nanoGPT. Every linear map is an ``nn.Linear``, so SINGD
  preconditions all of them today.
- ``"stock"``: ``nn.TransformerEncoderLayer`` blocks (``norm_first=True``, GELU,
  ``dropout=0``) with a causal mask. Their ``nn.MultiheadAttention`` keeps its input
  projection as a raw parameter, so only ``linear1``, ``linear2`` and the head are
  SINGD layers unless a MultiheadAttention layer kind is registered; the rest goes to
  the fallback.

Both have learned token and position embeddings, a final LayerNorm and a linear head.
Everything that is not a SINGD layer (embeddings, norms, and whatever the model keeps
outside layers) is trained by the ``fallback`` of :func:`core_optimizer` (AdamW).

Run it::

    python -m singd_functional.examples.chargpt --model nanogpt --optimizer singd --steps 600
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optree
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import singd_functional as sf

FAMILIES = ("nanogpt", "stock")
DEFAULT_BUDGET = 1_000_000  # bytes of source text read (train + validation)


# -------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class CharData:
    """Byte-level corpus: ``train`` and ``val`` as int64 token ids, ``vocab`` the bytes."""

    train: Tensor
    val: Tensor
    vocab: bytes
    files: int  # how many source files the text came from


def stdlib_sources() -> list[Path]:
    """The standard library's top-level ``.py`` files, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(
            f"no .py files in the standard library folder {root}: this Python ships without "
            "its sources; pass a text file of your own to load_corpus(path=...)"
        )
    return files


def load_corpus(budget: int = DEFAULT_BUDGET, path: str | Path | None = None) -> CharData:
    """``budget`` bytes of the standard library's sources (or of ``path``), split 90/10.

    The order is deterministic (sorted file names, each file whole until the budget is
    reached, the last one cut); the validation part is the last 10 % of the bytes.
    """
    if budget < 1000:
        raise ValueError(f"budget must be at least 1000 bytes, got {budget}")
    if path is not None:
        text, files = Path(path).read_bytes()[:budget], 1
    else:
        chunks, size, files = [], 0, 0
        for p in stdlib_sources():
            if size >= budget:
                break
            data = p.read_bytes()
            chunks.append(data)
            size += len(data)
            files += 1
        text = b"".join(chunks)[:budget]
    vocab = bytes(sorted(set(text)))
    lookup = torch.zeros(256, dtype=torch.int64)
    lookup[torch.tensor(list(vocab))] = torch.arange(len(vocab))
    ids = lookup[torch.frombuffer(bytearray(text), dtype=torch.uint8).long()]
    n_train = int(0.9 * len(ids))
    return CharData(ids[:n_train], ids[n_train:], vocab, files)


def random_batch(
    tokens: Tensor, batch_size: int, context: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``batch_size`` random windows: inputs [B, context] and next-byte targets [B, context]."""
    start = torch.randint(0, len(tokens) - context - 1, (batch_size,), generator=generator)
    idx = start[:, None] + torch.arange(context + 1)
    windows = tokens[idx]
    return windows[:, :-1], windows[:, 1:]


def batch_stream(
    data: CharData, steps: int, batch_size: int, context: int, seed: int
) -> list[tuple[Tensor, Tensor]]:
    """The training batches of one run (``seed`` decides them; every optimizer gets them)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return [random_batch(data.train, batch_size, context, g) for _ in range(steps)]


def val_windows(data: CharData, context: int, n: int = 256) -> tuple[Tensor, Tensor]:
    """``n`` evenly spaced validation windows (the same for every run)."""
    starts = torch.linspace(0, len(data.val) - context - 2, n).long()
    windows = data.val[starts[:, None] + torch.arange(context + 1)]
    return windows[:, :-1], windows[:, 1:]


# ------------------------------------------------------------------------------ models
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention from two ``nn.Linear`` layers (nanoGPT's)."""

    future: Tensor  # [context, context] bool, True above the diagonal (a buffer)

    def __init__(self, width: int, heads: int, context: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        # a buffer cut with torch.narrow, not built in forward: torch.fx (the traced
        # capture) can neither size a new tensor nor slice a buffer by a traced length
        self.register_buffer("future", torch.ones(context, context, dtype=torch.bool).triu(1),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        q, k, v = (t.view(B, S, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        # written out (not F.scaled_dot_product_attention): torch.func.vmap has no batching
        # rule for the CPU flash kernel, and the sweeps vmap this model
        scores = (q @ k.transpose(-1, -2)) * (D // self.heads) ** -0.5
        future = self.future.narrow(0, 0, S).narrow(1, 0, S)
        y = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, context: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, context)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharGPT(nn.Module):
    """Token + position embeddings, ``blocks``, final LayerNorm, linear head."""

    mask: Tensor  # [context, context] additive causal mask (a buffer)

    def __init__(self, vocab: int, width: int, context: int, blocks: nn.ModuleList,
                 causal_mask: bool):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = blocks
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.causal_mask = causal_mask
        self.context = context
        future = torch.ones(context, context, dtype=torch.bool).triu(1)
        self.register_buffer("mask", torch.zeros(context, context).masked_fill(
            future, float("-inf")), persistent=False)

    def forward(self, idx: Tensor) -> Tensor:
        S = idx.shape[-1]
        x = self.tok(idx) + self.pos(torch.arange(S, device=idx.device))
        if self.causal_mask:
            mask = self.mask.narrow(0, 0, S).narrow(1, 0, S)
            for block in self.blocks:
                x = block(x, src_mask=mask, is_causal=True)
        else:
            for block in self.blocks:
                x = block(x)
        return self.head(self.ln(x))


def make_model(
    family: str,
    vocab: int,
    *,
    layers: int = 2,
    width: int = 64,
    heads: int = 4,
    context: int = 64,
    seed: int = 0,
) -> CharGPT:
    """A character GPT of ``family`` (``"nanogpt"`` or ``"stock"``) with weights from ``seed``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    torch.manual_seed(seed)
    if family == "nanogpt":
        blocks = nn.ModuleList(Block(width, heads, context) for _ in range(layers))
    else:
        blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
                batch_first=True, norm_first=True,
            )
            for _ in range(layers)
        )
    return CharGPT(vocab, width, context, blocks, causal_mask=family == "stock")


def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-byte cross-entropy over every position of every window."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten())


@torch.no_grad()
def val_loss(model: nn.Module, windows: tuple[Tensor, Tensor], params=None) -> float:
    """Validation loss of ``model`` (or of ``params`` in it) on ``windows``."""
    x, y = windows
    if params is None:
        return loss_fn(model(x), y).item()
    return loss_fn(torch.func.functional_call(model, params, (x,)), y).item()


def tree_bytes(tree: Any) -> int:
    """Bytes of every tensor in ``tree`` (optimizer state; structured factors included)."""
    leaves = optree.tree_leaves(tree, none_is_leaf=True, namespace="singd_functional")
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, Tensor))


# ------------------------------------------------------------------------- optimizers
SINGD_DEFAULTS: dict[str, Any] = dict(
    momentum=0.9, damping=1e-3, alpha1=0.5, lr_cov=1e-2, weight_decay=0.0, T=5,
)


def core_optimizer(
    model: nn.Module,
    *,
    structures="dense",
    fallback_lr: float = 3e-3,
    **hyperparams: Any,
) -> tuple[sf.GradientTransformation, Callable, int]:
    """SINGD (the pure core) for every layer of ``model``, AdamW for the other parameters.

    ``structures``: one name for K and C of every layer, a (K, C) pair, or a callable
    ``layer name -> (K, C)``. Returns ``(tx, capture, T)``.
    """
    hp = {**SINGD_DEFAULTS, **hyperparams}
    T = hp.pop("T")
    layers = sf.find_layers(model)
    if callable(structures):
        per_layer = {info.name: structures(info.name) for info in layers}
    elif isinstance(structures, str):
        per_layer = {info.name: (structures, structures) for info in layers}
    else:
        per_layer = {info.name: tuple(structures) for info in layers}
    tx = sf.singd(
        layers,
        structures=per_layer,
        loss_average="batch+sequence",
        fallback=sf.adamw(lr=fallback_lr, weight_decay=0.0),
        **hp,
    )
    capture = sf.make_capture(model, loss_fn, layers)
    return tx, capture, T


@dataclass
class Curve:
    """One run's record: validation loss at ``steps`` and the final numbers."""

    steps: list[int] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    train: list[float] = field(default_factory=list)  # mean training loss since last eval
    diverged: bool = False
    seconds: float = 0.0  # wall time of the training steps


def eval_points(steps: int, every: int) -> list[int]:
    return sorted({*range(every, steps + 1, every), steps})


def train_torch(
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    batches: Sequence[tuple[Tensor, Tensor]],
    windows: tuple[Tensor, Tensor],
    *,
    eval_every: int = 50,
) -> Curve:
    """Train with one or more ``torch.optim`` optimizers (stepped together)."""
    curve, losses = Curve(), []
    points = set(eval_points(len(batches), eval_every))
    for t, (x, y) in enumerate(batches, 1):
        start = time.perf_counter()
        for opt in optimizers:
            opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        curve.seconds += time.perf_counter() - start
        losses.append(loss.detach())
        if t in points:
            curve.steps.append(t)
            curve.train.append(torch.stack(losses).mean().item())
            curve.val.append(val_loss(model, windows))
            losses = []
            if not math.isfinite(curve.val[-1]):
                curve.diverged = True
                break
    return curve


def train_core(
    model: nn.Module,
    tx: sf.GradientTransformation,
    capture: Callable,
    T: int,
    batches: Sequence[tuple[Tensor, Tensor]],
    windows: tuple[Tensor, Tensor],
    *,
    eval_every: int = 50,
    hyperparams: Callable[[int], sf.HyperParams | None] | None = None,
) -> tuple[Curve, Any]:
    """Train with a pure transform (``sf.make_step``); ``hyperparams(t)`` may schedule."""
    step, plain_step = sf.make_step(tx, capture)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = tx.init(params)
    curve, losses = Curve(), []
    points = set(eval_points(len(batches), eval_every))
    for t, (x, y) in enumerate(batches):
        start = time.perf_counter()
        fn = step if t % T == 0 else plain_step
        hp = hyperparams(t) if hyperparams is not None else None
        params, state, loss = fn(params, state, x, y, hyperparams=hp)
        curve.seconds += time.perf_counter() - start
        losses.append(loss)
        if t + 1 in points:
            curve.steps.append(t + 1)
            curve.train.append(torch.stack(losses).mean().item())
            curve.val.append(val_loss(model, windows, params))
            losses = []
            if not math.isfinite(curve.val[-1]):
                curve.diverged = True
                break
    return curve, state


def sweep_core(
    model: nn.Module,
    tx: sf.GradientTransformation,
    capture: Callable,
    T: int,
    hyperparams: sf.HyperParams | dict[str, sf.HyperParams],
    batches: Sequence[tuple[Tensor, Tensor]],
    windows: tuple[Tensor, Tensor],
    *,
    eval_every: int = 50,
    schedule: Callable[[int, dict], dict] | None = None,
) -> tuple[list[Curve], Any]:
    """Every member of ``hyperparams`` trained in ONE vmapped run (``sf.make_sweep``).

    ``hyperparams``: an ``sf.HyperParams`` (it reaches SINGD and its AdamW fallback
    alike) or ``{"singd": sf.grid(...)}`` (SINGD's only; the fallback keeps its own).
    Same initial weights and batches for every member; a member that diverges is
    stopped by the sweep (its later values read NaN). ``schedule(t, base)`` may return
    per-member hyperparameters for step ``t`` from the initial ones ``base`` (the
    sweep state's ``hyperparams``, per label for a mapping).
    """
    sweep = sf.make_sweep(tx, capture, hyperparams)
    state = sweep.init({k: v.detach() for k, v in model.named_parameters()})
    base = dict(state.hyperparams)
    n = state.diverged.shape[0]
    curves = [Curve() for _ in range(n)]
    points = set(eval_points(len(batches), eval_every))
    losses = []

    def member_val(params):
        x, y = windows
        return loss_fn(torch.func.functional_call(model, params, (x,)), y)

    start = time.perf_counter()
    for t, (x, y) in enumerate(batches):
        if schedule is not None:
            state = state._replace(hyperparams=schedule(t, base))
        fn = sweep.step if t % T == 0 else sweep.plain_step
        state, loss = fn(state, x, y)
        losses.append(loss)
        if t + 1 in points:
            with torch.no_grad():
                vals = torch.func.vmap(member_val)(state.params)
            train = torch.stack(losses).mean(0)
            losses = []
            for i, c in enumerate(curves):
                bad = bool(state.diverged[i])
                c.steps.append(t + 1)
                c.train.append(math.nan if bad else train[i].item())
                c.val.append(math.nan if bad else vals[i].item())
                c.diverged = bad
    seconds = time.perf_counter() - start
    for c in curves:
        c.seconds = seconds / n
    return curves, state


# ----------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m singd_functional.examples.chargpt",
        description="Train a character GPT on the standard library's sources; print the "
        "validation loss every --eval-every steps.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", choices=FAMILIES, default="nanogpt")
    p.add_argument("--optimizer", choices=("singd", "adamw"), default="singd")
    p.add_argument("--structure", default="dense", help="SINGD structure of K and C")
    p.add_argument("--lr", type=float, default=None, help="default: 3e-3 (AdamW), 1e-2 (SINGD)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="corpus bytes")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_corpus(args.budget)
    model = make_model(args.model, len(data.vocab), layers=args.layers, width=args.width,
                       context=args.context, seed=args.seed)
    n_params = sum(q.numel() for q in model.parameters())
    print(f"{len(data.train):,} train / {len(data.val):,} val bytes from {data.files} files, "
          f"vocabulary {len(data.vocab)}; {args.model} with {n_params:,} parameters")
    batches = batch_stream(data, args.steps, args.batch_size, args.context, args.seed)
    windows = val_windows(data, args.context)
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr or 3e-3, weight_decay=0.0)
        curve = train_torch(model, [opt], batches, windows, eval_every=args.eval_every)
    else:
        tx, capture, T = core_optimizer(model, structures=args.structure, lr=args.lr or 1e-2)
        curve, _ = train_core(model, tx, capture, T, batches, windows,
                              eval_every=args.eval_every)
    for s, tr, va in zip(curve.steps, curve.train, curve.val):
        print(f"step {s:5d}  train {tr:.4f}  val {va:.4f}")
    print(f"{curve.seconds:.1f} s in training steps" + ("; diverged" if curve.diverged else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

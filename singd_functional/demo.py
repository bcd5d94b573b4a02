"""``make demo``: SINGD against AdamW and SGD on scikit-learn's handwritten digits.

A small CNN (two Conv2d with max-pooling, one Linear head) learns the 8x8 digits that ship inside
scikit-learn (1797 images, 10 classes, no download). Every optimizer starts from the
same initial weights and sees the same batches in the same order:

1. the drop-in :class:`~singd_functional.SINGD` with each structure of
   ``--structures`` (default: dense and diagonal K, C), ``torch.optim.AdamW`` and
   ``torch.optim.SGD`` with momentum, each for ``--epochs`` epochs;
2. one ``torch.func.vmap``-ed sweep over ``--sweep-size`` SINGD learning rates
   (:func:`~singd_functional.make_sweep`): all of them train in a single run;
3. a character transformer (:mod:`singd_functional.examples.chargpt`: 2 blocks, width
   64, on the standard library's ``.py`` sources, last 10 % held out) for
   ``--transformer-steps`` steps with the drop-in SINGD (dense and
   ``--transformer-structure``) and AdamW, same initial weights and batches; SINGD
   preconditions every ``nn.Linear``, AdamW trains the embeddings and norms.
   ``--transformer-steps 0`` skips it.

At the end it prints tables (test accuracy, test loss, wall time, optimizer-state
bytes; for the transformer the validation loss) and writes ``curves.png``,
``sweep.png``, ``transformer.png`` and ``results.json`` to ``--out``.

Run ``python -m singd_functional.demo --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optree
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import singd_functional as sf
from singd_functional import structures as _structures

# Hyperparameters of the comparison. SINGD's come from a small search on this task
# (lr in {3e-3, 5e-3, 1e-2} x damping in {1e-3, 1e-2, 1e-1}); the sweep shows how its
# result depends on lr. AdamW's and SGD's are common choices, not tuned here.
SINGD_HP: dict[str, Any] = dict(lr=1e-2, momentum=0.9, damping=1e-1, lr_cov=1e-2, T=2)
ADAMW_HP: dict[str, Any] = dict(lr=3e-3, weight_decay=1e-2)
SGD_HP: dict[str, Any] = dict(lr=0.03, momentum=0.9)
SWEEP_LRS = (1e-3, 3e-1)  # log-spaced range of the learning-rate sweep
# The character transformer's (benchmarks/transformer_bench.py tuned the lrs on this
# model: see benchmarks/results/transformer_bench.md).
# damping 1e-2 and lr_cov 1e-1 (not the defaults 1e-3, 1e-2): benchmarks/transformer_settings.py
GPT_SINGD_HP: dict[str, Any] = dict(lr=3e-2, momentum=0.9, damping=1e-2, lr_cov=1e-1, T=5)
GPT_ADAMW_HP: dict[str, Any] = dict(lr=3e-3, weight_decay=0.0)

_MISSING_EXTRA = (
    "the demo needs scikit-learn, matplotlib and tqdm; install them with "
    "`pip install -e '.[demo]'` (or run `make demo`, which does it)"
)


# ----------------------------------------------------------------------------- options
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m singd_functional.demo",
        description=(
            "Train a small CNN on scikit-learn's 8x8 handwritten digits with SINGD "
            "(one run per structure), AdamW and SGD with momentum (same initial weights, "
            "same batches), then sweep SINGD learning rates in ONE vmapped run. Prints a "
            "table and writes plots to --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=8, help="training epochs of every run")
    p.add_argument(
        "--structures",
        default="dense,diagonal",
        help="comma-separated SINGD structures, one run each; a name applies to K and C, "
        "'K:C' sets both (e.g. dense,diagonal,block8diagonal,dense:diagonal). Valid: "
        + ", ".join(_structures.VALID_NAMES),
    )
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda' or 'cuda:N'")
    p.add_argument("--out", default="results_demo", help="folder for plots and results.json")
    p.add_argument("--seed", type=int, default=0, help="seed of data split, weights and batches")
    p.add_argument("--batch-size", type=int, default=64, help="mini-batch size")
    p.add_argument(
        "--sweep-size", type=int, default=8,
        help=f"number of SINGD learning rates in the vmapped sweep, log-spaced in "
        f"[{SWEEP_LRS[0]:g}, {SWEEP_LRS[1]:g}]; 0 skips the sweep",
    )
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads on CPU (the model is tiny: more threads mostly add "
        "synchronization overhead, most of all in the vmapped sweep)",
    )
    p.add_argument(
        "--transformer-steps", type=int, default=300,
        help="training steps of the character transformer part; 0 skips it",
    )
    p.add_argument(
        "--transformer-structure", default="block16diagonal",
        help="the structured SINGD variant of the transformer part (besides dense)",
    )
    p.add_argument(
        "--quick", action="store_true",
        help="a smoke test: 256 training and 128 test images (use with --epochs 1), "
        "a 100 kB corpus and at most 10 transformer steps",
    )
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.sweep_size < 0:
        p.error(f"--sweep-size must be >= 0, got {args.sweep_size}")
    if args.transformer_steps < 0:
        p.error(f"--transformer-steps must be >= 0, got {args.transformer_steps}")
    try:
        _structures.get(args.transformer_structure)
    except ValueError as err:
        p.error(f"--transformer-structure: {err}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    try:
        args.structures = parse_structures(args.structures)
    except ValueError as err:
        p.error(f"--structures: {err}")
    try:
        args.device = resolve_device(args.device)
    except (RuntimeError, ValueError) as err:
        p.error(f"--device: {err}")
    return args


def parse_structures(text: str) -> list[tuple[str, str]]:
    """``"dense,diagonal,dense:block8diagonal"`` -> ``[(K name, C name), ...]``."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        pair = tuple(item.split(":")) if ":" in item else (item, item)
        if len(pair) != 2:
            raise ValueError(f"{item!r}: give one name or 'K:C'")
        for name in pair:
            _structures.get(name)  # a ValueError that lists the valid names
        out.append(pair)
    if not out:
        raise ValueError("give at least one structure, e.g. 'dense'")
    return out


def resolve_device(name: str) -> torch.device:
    """The torch device for ``name``; an error that says why when CUDA is not usable."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"expected 'cpu', 'cuda' or 'cuda:N', got {name!r}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"{name!r} was asked for but CUDA is not available "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}). "
                "`make` installs the CPU wheel; for a GPU install a CUDA build of torch "
                "into .venv first (https://pytorch.org), or run with --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"{name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif device.type != "cpu":
        raise ValueError(f"expected 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    return device


# -------------------------------------------------------------------------------- data
@dataclass
class Digits:
    """The split dataset on one device; images [N, 1, 8, 8] standardized, labels [N]."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits(seed: int, device: torch.device, quick: bool = False) -> Digits:
    """scikit-learn's digits, split 80/20 with ``seed``, standardized with train stats."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit(f"error: {_MISSING_EXTRA} ({err})") from err
    images, labels = _load(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(labels, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(y))
    train, test = perm[:n_train], perm[n_train:]
    if quick:
        train, test = train[:256], test[:128]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return Digits(*(t.to(device) for t in (x[train], y[train], x[test], y[test])))


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """Index tensors of one shuffled epoch (the last batch may be smaller)."""
    order = torch.randperm(n, generator=generator)
    return list(order.split(batch_size))


# ------------------------------------------------------------------------------- model
def make_model(seed: int) -> nn.Module:
    """The CNN: conv 1->16, pool (4x4), conv 16->32, pool (2x2), linear 128->10."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 10),
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``(x, y)``."""
    model.eval()
    logits = model(x)
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (structured factors included)."""
    states: Any = list(optimizer.state.values())  # optree's PyTree type admits no list
    leaves = optree.tree_leaves(states, namespace=sf.PYTREE_NAMESPACE)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, Tensor))


# ---------------------------------------------------------------------------- training
@dataclass
class Run:
    """One optimizer's history and final numbers."""

    name: str
    train_loss: list[float] = field(default_factory=list)  # per epoch, mean over batches
    test_loss: list[float] = field(default_factory=list)  # per epoch
    test_acc: list[float] = field(default_factory=list)  # per epoch
    wall_time: float = 0.0  # seconds spent in training steps (evaluation excluded)
    state_bytes: int = 0


def optimizers(
    structures: list[tuple[str, str]],
) -> dict[str, Callable[[nn.Module], torch.optim.Optimizer]]:
    """Name -> factory ``model -> torch.optim.Optimizer``, in table order."""

    def singd(pair: tuple[str, str]) -> Callable[[nn.Module], torch.optim.Optimizer]:
        return lambda m: sf.SINGD(m, structures=pair, **SINGD_HP)

    out = {f"SINGD ({K if K == C else f'{K}:{C}'})": singd((K, C)) for K, C in structures}
    out["AdamW"] = lambda m: torch.optim.AdamW(m.parameters(), **ADAMW_HP)
    out["SGD (momentum)"] = lambda m: torch.optim.SGD(m.parameters(), **SGD_HP)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    name: str,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    data: Digits,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> Run:
    """Train a fresh model (weights from ``seed``) with one optimizer; a tqdm bar per run."""
    from tqdm.auto import tqdm

    model = make_model(seed).to(device)
    optimizer = make_optimizer(model)
    generator = torch.Generator().manual_seed(seed)  # same batches for every optimizer
    run = Run(name)
    n = len(data.y_train)
    steps_per_epoch = math.ceil(n / batch_size)
    with tqdm(total=epochs * steps_per_epoch, desc=f"{name:<16}", unit="step",
              dynamic_ncols=True, file=sys.stderr) as bar:
        for _ in range(epochs):
            losses = []
            for idx in batches(n, batch_size, generator):
                idx = idx.to(device)
                _sync(device)
                start = time.perf_counter()
                optimizer.zero_grad()
                loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
                _sync(device)
                run.wall_time += time.perf_counter() - start
                bar.update(1)
            run.train_loss.append(torch.stack(losses).mean().item())
            test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
            run.test_loss.append(test_loss)
            run.test_acc.append(test_acc)
            bar.set_postfix(loss=f"{run.train_loss[-1]:.3f}", test_acc=f"{test_acc:.3f}")
    run.state_bytes = state_bytes(optimizer)
    return run


@dataclass
class SweepResult:
    """The learning-rate sweep: per member its lr and final numbers (NaN if diverged)."""

    structure: tuple[str, str]
    lrs: list[float]
    train_loss: list[float]
    test_loss: list[float]
    test_acc: list[float]
    diverged: list[bool]
    wall_time: float


def sweep_lrs(
    data: Digits,
    *,
    size: int,
    structure: tuple[str, str],
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> SweepResult:
    """``size`` SINGD learning rates trained in ONE vmapped run (same weights, same batches)."""
    from tqdm.auto import tqdm

    model = make_model(seed).to(device)
    layers = sf.find_layers(model)
    capture = sf.make_capture(model, F.cross_entropy, layers)
    hp = {k: v for k, v in SINGD_HP.items() if k != "T"}
    tx = sf.singd(layers, structures=structure, **hp)
    lrs = torch.logspace(math.log10(SWEEP_LRS[0]), math.log10(SWEEP_LRS[1]), size)
    sweep = sf.make_sweep(tx, capture, sf.grid(lr=lrs))
    state = sweep.init({k: v.detach() for k, v in model.named_parameters()})
    generator = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    T, t, wall = SINGD_HP["T"], 0, 0.0
    label = structure[0] if structure[0] == structure[1] else ":".join(structure)
    last_epoch: list[Tensor] = []
    with tqdm(total=epochs * math.ceil(n / batch_size), desc=f"sweep x{size} ({label})",
              unit="step", dynamic_ncols=True, file=sys.stderr) as bar:
        for _ in range(epochs):
            last_epoch = []
            for idx in batches(n, batch_size, generator):
                idx = idx.to(device)
                _sync(device)
                start = time.perf_counter()
                step = sweep.step if t % T == 0 else sweep.plain_step
                state, loss = step(state, data.x_train[idx], data.y_train[idx])
                _sync(device)
                wall += time.perf_counter() - start
                last_epoch.append(loss)
                t += 1
                bar.update(1)
            bar.set_postfix(diverged=int(state.diverged.sum()))

    def logits(params):
        return torch.func.functional_call(model, params, (data.x_test,))

    with torch.no_grad():
        out = torch.func.vmap(logits)(state.params)  # [members, N_test, 10]
        members = out.shape[0]
        flat_targets = data.y_test.repeat(members)
        test_loss = F.cross_entropy(out.flatten(0, 1), flat_targets, reduction="none")
        test_loss = test_loss.view(members, -1).mean(1)
        test_acc = (out.argmax(-1) == data.y_test).float().mean(1)
        train_loss = torch.stack(last_epoch).mean(0)
    diverged = state.diverged.cpu()
    nan = torch.tensor(math.nan)
    return SweepResult(
        structure=structure,
        lrs=lrs.tolist(),
        train_loss=torch.where(diverged, nan, train_loss.cpu()).tolist(),
        test_loss=torch.where(diverged, nan, test_loss.cpu()).tolist(),
        test_acc=torch.where(diverged, nan, test_acc.cpu()).tolist(),
        diverged=diverged.tolist(),
        wall_time=wall,
    )


# ------------------------------------------------------------------ character transformer
@dataclass
class GPTRun:
    """One optimizer on the character transformer: validation loss every few steps."""

    name: str
    steps: list[int]
    val_loss: list[float]
    wall_time: float
    state_bytes: int


def gpt_optimizers(model: nn.Module, structure: str) -> list[torch.optim.Optimizer]:
    """SINGD (drop-in) for every SINGD layer, AdamW for the remaining parameters (norms;
    embeddings too where no embedding kind is registered)."""
    singd = sf.SINGD(model, structures=(structure, structure), loss_average="batch+sequence",
                     warn_unsupported=False, **GPT_SINGD_HP)
    mine = {id(p) for g in singd.param_groups for p in g["params"]}
    rest = [p for p in model.parameters() if id(p) not in mine]
    return [singd, torch.optim.AdamW(rest, **GPT_ADAMW_HP)]


def train_transformer(
    *, steps: int, structure: str, seed: int, quick: bool, device: torch.device
) -> tuple[list[GPTRun], dict]:
    """SINGD dense, SINGD ``structure`` and AdamW on the character GPT (same weights, batches)."""
    from tqdm.auto import tqdm

    from .examples import chargpt

    data = chargpt.load_corpus(100_000 if quick else chargpt.DEFAULT_BUDGET)
    batches = [(x.to(device), y.to(device))
               for x, y in chargpt.batch_stream(data, steps, 32, 64, seed)]
    val_x, val_y = chargpt.val_windows(data, 64, 64 if quick else 256)
    windows = (val_x.to(device), val_y.to(device))
    factories: dict[str, Callable[[nn.Module], list[torch.optim.Optimizer]]] = {
        "SINGD (dense)": lambda m: gpt_optimizers(m, "dense"),
        f"SINGD ({structure})": lambda m: gpt_optimizers(m, structure),
        "AdamW": lambda m: [torch.optim.AdamW(m.parameters(), **GPT_ADAMW_HP)],
    }
    runs = []
    every = max(1, min(25, steps // 4))
    for name, factory in factories.items():
        model = chargpt.make_model("nanogpt", len(data.vocab), seed=seed).to(device)
        opts = factory(model)
        with tqdm(total=1, desc=f"{name:<16}", unit="run", dynamic_ncols=True,
                  file=sys.stderr) as bar:
            curve = chargpt.train_torch(model, opts, batches, windows, eval_every=every)
            bar.update(1)
        runs.append(GPTRun(name, curve.steps, curve.val, curve.seconds,
                           sum(state_bytes(o) for o in opts)))
    info = dict(
        train_bytes=len(data.train), val_bytes=len(data.val), files=data.files,
        vocab=len(data.vocab),
        parameters=sum(p.numel() for p in chargpt.make_model("nanogpt", len(data.vocab))
                       .parameters()),
    )
    return runs, info


def gpt_table(runs: list[GPTRun]) -> str:
    lines = ["| optimizer | val loss | wall time | state bytes |", "|---|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r.name} | {r.val_loss[-1]:.4f} | {r.wall_time:.1f} s | "
                     f"{r.state_bytes:,} ({human_bytes(r.state_bytes)}) |")
    return "\n".join(lines)


def plot_transformer(runs: list[GPTRun], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in runs:
        ax.plot(r.steps, r.val_loss, marker="o", label=r.name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats per byte)")
    ax.set_title("character GPT on the standard library: same weights, same batches")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- reports
def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError  # unreachable


def table(runs: list[Run], n_params: int) -> str:
    """The final table, one row per optimizer."""
    head = ("optimizer", "test acc", "test loss", "wall time", "state bytes", "x params")
    rows = [
        (
            r.name,
            f"{100 * r.test_acc[-1]:.2f} %",
            f"{r.test_loss[-1]:.4f}",
            f"{r.wall_time:.1f} s",
            f"{r.state_bytes:,} ({human_bytes(r.state_bytes)})",
            f"{r.state_bytes / (4 * n_params):.2f}",
        )
        for r in runs
    ]
    widths = [max(len(x[i]) for x in (head, *rows)) for i in range(len(head))]

    def line(cells):
        padded = [cells[0].ljust(widths[0])]
        padded += [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(padded) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(r) for r in rows)])


def sweep_table(result: SweepResult) -> str:
    lines = ["| lr | final train loss | test loss | test acc |", "|---:|---:|---:|---:|"]
    for lr, tr, te, acc, div in zip(
        result.lrs, result.train_loss, result.test_loss, result.test_acc, result.diverged
    ):
        if div:
            lines.append(f"| {lr:.2e} | diverged | diverged | diverged |")
        else:
            lines.append(f"| {lr:.2e} | {tr:.4f} | {te:.4f} | {100 * acc:.2f} % |")
    return "\n".join(lines)


def plot_curves(runs: list[Run], path: Path) -> None:
    """Training loss, test loss and test accuracy per epoch, one line per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for r in runs:
        epochs = range(1, len(r.train_loss) + 1)
        axes[0].plot(epochs, r.train_loss, marker="o", label=r.name)
        axes[1].plot(epochs, r.test_loss, marker="o", label=r.name)
        axes[2].plot(epochs, [100 * a for a in r.test_acc], marker="o", label=r.name)
    titles = ("training loss (mean per epoch)", "test loss", "test accuracy [%]")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[2].legend()
    fig.suptitle("CNN on scikit-learn digits (8x8, 10 classes): same weights, same batches")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(result: SweepResult, path: Path) -> None:
    """Final training and test loss against the learning rate; diverged runs marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(result.lrs, result.train_loss, marker="o", label="final training loss (last epoch)")
    ax.plot(result.lrs, result.test_loss, marker="s", label="final test loss")
    bad = [lr for lr, d in zip(result.lrs, result.diverged) if d]
    if bad:
        for lr in bad:
            ax.axvline(lr, color="red", alpha=0.3)
        ax.plot([], [], color="red", alpha=0.3, label="diverged (stopped)")
    ax.axvline(SINGD_HP["lr"], color="gray", linestyle=":", label="lr of the SINGD runs")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("SINGD learning rate")
    ax.set_ylabel("cross-entropy")
    label = "/".join(dict.fromkeys(result.structure))
    ax.set_title(f"{len(result.lrs)} learning rates in one vmapped run (SINGD, {label})")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import matplotlib  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit(f"error: {_MISSING_EXTRA} ({err})") from err
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    data = load_digits(args.seed, args.device, args.quick)
    n_params = sum(p.numel() for p in make_model(args.seed).parameters())
    print(
        f"digits: {len(data.y_train)} train / {len(data.y_test)} test images; CNN with "
        f"{n_params:,} parameters; {args.epochs} epochs of batch {args.batch_size}; "
        f"device {args.device}, {torch.get_num_threads()} threads, seed {args.seed}",
        flush=True,
    )
    start = time.perf_counter()
    runs = [
        train(name, factory, data, epochs=args.epochs, batch_size=args.batch_size,
              seed=args.seed, device=args.device)
        for name, factory in optimizers(args.structures).items()
    ]
    sweep = None
    if args.sweep_size:
        sweep = sweep_lrs(data, size=args.sweep_size, structure=args.structures[0],
                          epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                          device=args.device)
    gpt_runs: list[GPTRun] = []
    gpt_info: dict[str, Any] = {}
    if args.transformer_steps:
        gpt_runs, gpt_info = train_transformer(
            steps=min(args.transformer_steps, 10) if args.quick else args.transformer_steps,
            structure=args.transformer_structure, seed=args.seed, quick=args.quick,
            device=args.device,
        )
    total = time.perf_counter() - start

    plot_curves(runs, out / "curves.png")
    if gpt_runs:
        plot_transformer(gpt_runs, out / "transformer.png")
    if sweep is not None:
        plot_sweep(sweep, out / "sweep.png")
    (out / "results.json").write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()},
        "hyperparameters": {"SINGD": SINGD_HP, "AdamW": ADAMW_HP, "SGD": SGD_HP},
        "runs": [asdict(r) for r in runs],
        "sweep": None if sweep is None else asdict(sweep),
        "transformer": None if not gpt_runs else {
            **gpt_info, "hyperparameters": {"SINGD": GPT_SINGD_HP, "AdamW": GPT_ADAMW_HP},
            "runs": [asdict(r) for r in gpt_runs],
        },
        "total_seconds": total,
    }, indent=1))

    print()
    print(f"Final results after {args.epochs} epoch(s) (same initial weights and batches):")
    print(table(runs, n_params))
    if sweep is not None:
        print()
        print(f"SINGD learning-rate sweep: {len(sweep.lrs)} runs in one vmapped run, "
              f"{sweep.wall_time:.1f} s")
        print(sweep_table(sweep))
    if gpt_runs:
        print()
        print(f"Character transformer ({gpt_info['parameters']:,} parameters, "
              f"{gpt_runs[0].steps[-1]} steps of 32 x 64 bytes; validation: the last 10 % of "
              f"{gpt_info['train_bytes'] + gpt_info['val_bytes']:,} bytes of the standard "
              "library's sources):")
        print(gpt_table(gpt_runs))
    print()
    print(f"total time {total:.1f} s; results in {out}")
    print(f"  {out / 'curves.png'}")
    if sweep is not None:
        print(f"  {out / 'sweep.png'}")
    if gpt_runs:
        print(f"  {out / 'transformer.png'}")
    print(f"  {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

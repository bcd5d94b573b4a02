"""Width sweep: step time of two ``Linear(d, d)`` layers against SGD and the official
package, d in 128, 512, 1024, 2048 (issue 14's scaling table).

    python -m benchmarks.widths                                  # every structure
    python -m benchmarks.widths --structures block30diagonal --widths 1024 2048
    python -m benchmarks.widths --baseline-rev main              # and ours at a revision

The model is ``Sequential(Linear(d, d), ReLU, Linear(d, d))`` with an MSE loss on
random targets, batch 128, T = 10, one intra-op thread, flush-denormal on. Per width one
interleaved group (``benchmarks/timing.py``): SGD with momentum, and per structure the
official ``singd`` 0.0.5 and our drop-in ``sf.SINGD`` (and, with ``--baseline-rev``,
the drop-in of that git revision, extracted read-only like ``structures_bench`` does),
every contender a whole T-cycle per round in shuffled order. Reported: medians of the
per-round paired ratios of the amortized step time, with their interquartile range.

:func:`width_ratios` returns the figures as a dict, for ``benchmarks/run.py`` or a test
to call; ``main`` prints a markdown table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .contenders import HP, Config
from .timing import Record, paired_ratio, run_group, summarize

WIDTHS = (128, 512, 1024, 2048)
STRUCTURES = ("dense", "diagonal", "block30diagonal", "hierarchical15_15", "triltoeplitz")
BATCH = 128
# the official package's steps that take seconds at these widths (its Toeplitz is ~430x
# SGD everywhere; its dense step forms d x d products of K twice per side): not timed
OFFICIAL_SKIP = {("triltoeplitz", d) for d in WIDTHS} | {("triutoeplitz", d) for d in WIDTHS} | {
    ("dense", 2048)
}


def model(d: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))


class _Contender:
    """One optimizer on its own copy of the model (the interface ``run_group`` uses)."""

    def __init__(self, cfg: Config, d: int, make: Callable[[nn.Module], Any], seed: int = 0):
        self.cfg, self.steps, self.failed = cfg, 0, None
        self.model = model(d, seed)
        self.opt = None
        try:
            self.opt = make(self.model)
        except Exception as err:  # e.g. a structure the official package lacks
            self.failed = f"init: {type(err).__name__}: {str(err).splitlines()[0][:200]}"

    def next_is_update(self) -> bool:
        return self.cfg.structure is not None and self.steps % self.cfg.T == 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        F.mse_loss(self.model(x), y).backward()
        self.opt.step()
        self.steps += 1


def _singd_kwargs(structure: str) -> dict:
    return dict(HP, structures=(structure, structure), loss_average="batch")


def _factories(baseline) -> dict[str, Callable[[str, int], Callable[[nn.Module], Any]]]:
    import singd_functional as sf

    def official(s, T):
        from singd.optim.optimizer import SINGD

        def make(m):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return SINGD(m, T=T, **_singd_kwargs(s))

        return make

    out = {
        "official": official,
        "ours": lambda s, T: lambda m: sf.SINGD(m, T=T, **_singd_kwargs(s)),
    }
    if baseline is not None:
        out["baseline"] = lambda s, T: lambda m: baseline.SINGD(m, T=T, **_singd_kwargs(s))
    return out


def _ratio(a, b, cpu: bool = False) -> dict | None:
    if cpu:  # the same over thread CPU time (blind to waiting for a core)
        a, b = Record(cycles=a.cpu_cycles), Record(cycles=b.cpu_cycles)
    r = paired_ratio(a, b)
    return None if r is None else {k: round(v, 4) if isinstance(v, float) else v
                                   for k, v in r.items()}


def width_ratios(
    widths: Sequence[int] = WIDTHS,
    structures: Sequence[str] = STRUCTURES,
    *,
    T: int = 10,
    budget_s: float = 20.0,
    min_rounds: int = 5,
    max_rounds: int = 40,
    baseline_rev: str | None = None,
    official_skip: set[tuple[str, int]] | frozenset = frozenset(OFFICIAL_SKIP),
    seed: int = 0,
    tick: Callable[[float, str], None] = lambda dt, msg: None,
) -> dict:
    """Step-time ratios per width and structure (medians of paired per-round ratios).

    Returns ``{"meta": {...}, "widths": {d: {"rounds", "seconds", "load_before",
    "load_after", "ms": {label: amortized ms}, "failed": {label: why}, "structures":
    {s: {"ours_x_sgd", "official_x_sgd", "ours_x_official", ["baseline_x_sgd",
    "ours_x_baseline"]}}}}}``, each also with a ``_cpu`` twin (thread CPU time); each
    ratio is ``{"median", "q25", "q75", "rounds"}`` or None (a contender not timed or
    failed).
    """
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    baseline = None
    tmp = None
    if baseline_rev is not None:
        import importlib

        from .structures_bench import load_baseline

        tmp = tempfile.TemporaryDirectory()
        baseline = importlib.import_module(load_baseline(baseline_rev, Path(tmp.name)))
    makers = _factories(baseline)
    out: dict[str, Any] = {
        "meta": {
            "model": "Sequential(Linear(d, d), ReLU, Linear(d, d)), MSE, batch "
            f"{BATCH}, T={T}, 1 thread",
            "torch": torch.__version__,
            "machine": f"{platform.platform()} ({platform.machine()})",
            "baseline_rev": baseline_rev,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        "widths": {},
    }
    try:
        for d in widths:
            g = torch.Generator().manual_seed(seed + 1)
            batches = [(torch.randn(BATCH, d, generator=g), torch.randn(BATCH, d, generator=g))
                       for _ in range(4)]
            sgd_cfg = Config("sgd", f"linear{d}", T)
            contenders = [_Contender(
                sgd_cfg, d, lambda m: torch.optim.SGD(m.parameters(), lr=HP["lr"],
                                                      momentum=HP["momentum"]), seed)]
            index: dict[tuple[str, str], int] = {}
            for s in structures:
                for kind, make in makers.items():
                    if kind == "official" and (s, d) in official_skip:
                        continue
                    index[kind, s] = len(contenders)
                    contenders.append(_Contender(Config(kind, f"linear{d}", T, s, "singd"), d,
                                                 make(s, T), seed))
            records, info = run_group(
                contenders, batches, budget_s=budget_s, min_rounds=min_rounds,
                max_rounds=max_rounds, slow_steps={}, tick=tick, seed=seed,
            )  # fmt: skip
            row: dict[str, Any] = {
                **info,
                "ms": {c.cfg.label: round(summarize(records[i], T, False)["amortized_ms"], 3)
                       for i, c in enumerate(contenders) if c.failed is None},
                "failed": {c.cfg.label: c.failed for c in contenders if c.failed},
                "structures": {},
            }
            sgd = records[0]
            def rec(kind: str, s: str, index=index, contenders=contenders, records=records):
                i = index.get((kind, s))
                return None if i is None or contenders[i].failed else records[i]

            for s in structures:
                ours, official, base = rec("ours", s), rec("official", s), rec("baseline", s)
                cell = {
                    "ours_x_sgd": ours and _ratio(ours, sgd),
                    "official_x_sgd": official and _ratio(official, sgd),
                    "ours_x_official": ours and official and _ratio(ours, official),
                }
                if baseline is not None:
                    cell["baseline_x_sgd"] = base and _ratio(base, sgd)
                    cell["ours_x_baseline"] = ours and base and _ratio(ours, base)
                pairs = [("ours", "sgd"), ("official", "sgd"), ("ours", "official"),
                         ("baseline", "sgd"), ("ours", "baseline")]
                recs = {"ours": ours, "official": official, "baseline": base, "sgd": sgd}
                for a, b in pairs[: 5 if baseline is not None else 3]:
                    ra, rb = recs[a], recs[b]
                    cell[f"{a}_x_{b}_cpu"] = (ra and rb and _ratio(ra, rb, cpu=True)) or None
                row["structures"][s] = cell
            out["widths"][d] = row
    finally:
        if tmp is not None:
            tmp.cleanup()
    return out


def table(result: dict, clock: str = "wall") -> str:
    """A markdown table: per width and structure, ours / official as multiples of SGD
    (``clock="cpu"``: the thread-CPU-time ratios)."""
    has_base = result["meta"]["baseline_rev"] is not None
    head = ["d", "structure", "ours x SGD", "official x SGD", "ours x official"]
    head += ["baseline x SGD", "ours x baseline"] if has_base else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(r):
        return "-" if not r else f"{r['median']:.3f} [{r['q25']:.2f}-{r['q75']:.2f}]"

    for d, row in result["widths"].items():
        for s, cell in row["structures"].items():
            keys = ["ours_x_sgd", "official_x_sgd", "ours_x_official"]
            keys += ["baseline_x_sgd", "ours_x_baseline"] if has_base else []
            keys = [k + "_cpu" for k in keys] if clock == "cpu" else keys
            lines.append(f"| {d} | {s} | " + " | ".join(fmt(cell.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.widths",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    p.add_argument("--structures", nargs="+", default=list(STRUCTURES))
    p.add_argument("-T", type=int, default=10)
    p.add_argument("--budget", type=float, default=20.0, help="seconds per width (after "
                   "--min-rounds)")
    p.add_argument("--min-rounds", type=int, default=5)
    p.add_argument("--max-rounds", type=int, default=40)
    p.add_argument("--baseline-rev", help="also time our drop-in at this git revision")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = p.parse_args(argv)
    result = width_ratios(args.widths, args.structures, T=args.T, budget_s=args.budget,
                          min_rounds=args.min_rounds, max_rounds=args.max_rounds,
                          baseline_rev=args.baseline_rev)
    for d, row in result["widths"].items():
        print(f"d={d}: {row['rounds']} rounds in {row['seconds']} s, load "
              f"{row['load_before']} -> {row['load_after']}; failed: {row['failed'] or 'none'}")
    print("wall time:\n" + table(result) + "\n\nthread CPU time:\n" + table(result, "cpu"))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

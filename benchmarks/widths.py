"""Step time across widths: the drop-in ``SINGD`` against the official package.

Issue 14's scaling table: two ``Linear(d, d)`` (ReLU between), batch 128, T = 10, one
thread. Per width, one interleaved group (``benchmarks/timing.py``): SGD with momentum,
and per structure the official package and our drop-in ``sf.SINGD``. Reported per
structure and width: both step times as a multiple of SGD's, and ours / official (ratio
of the amortized medians, with the interquartile range of the per-round paired ratios).

The official Toeplitz structures cost seconds per step from d = 512 (3.8 s at 512, 157 s
at 2048, single steps measured 2026-12-08 on this machine's 2 shared cores): they are
timed over single steps (``est.``) up to :data:`OFFICIAL_TOEPLITZ_MAX_D`, and above it
neither side is timed (the ratio would not be measured, only bounded).

``python -m benchmarks.widths [--widths 128 512] [--structures dense diagonal]
[--budget 60] [--baseline-rev main]`` prints the table; ``--baseline-rev`` also times our
drop-in at that git revision (extracted read-only, as ``structures_bench`` does) in the
same groups, for a before/after ratio of a change. ``benchmarks/run.py`` calls
:func:`measure`.
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
import time
import warnings
from pathlib import Path

import torch

from . import contenders as ct
from . import models, timing
from .contenders import Config

STRUCTURES = ("dense", "diagonal", "block30diagonal", "hierarchical15_15", "triltoeplitz",
              "triutoeplitz")
TOEPLITZ = ("triltoeplitz", "triutoeplitz")
OFFICIAL_TOEPLITZ_MAX_D = 512
T = 10


class _Baseline(ct.Contender):
    """Our drop-in ``SINGD`` from another revision's package (kind ``baseline``)."""

    def __init__(self, cfg: Config, package, seed: int = 0):
        super().__init__(cfg, seed)
        self.opt = package.SINGD(self.model, T=cfg.T, **ct._singd_kwargs(cfg))

    def _step(self, x, y):
        self._module_step(self.opt, x, y)


def _shares(widths) -> dict[int, float]:
    """Each width's part of the budget, proportional to d (the wide steps cost most)."""
    total = sum(widths)
    return {d: d / total for d in widths}


def measure(widths, structures, budget_s: float, *, min_rounds: int = 2, seed: int = 0,
            tick=lambda dt, msg: None, baseline_rev: str | None = None) -> dict:
    """Time every structure at every width; ``budget_s`` is split over the widths.

    Returns ``{"widths", "structures", "rows", "groups", "skipped", "baseline_rev"}``;
    one row per (width, structure) with ``x_official`` (ours / official),
    ``paired_official`` (q25, median, q75 of the per-round ratios or None),
    ``ours_x_sgd``, ``official_x_sgd``, both amortized ms and whether the official figure
    is estimated; with ``baseline_rev`` also ``x_baseline`` and ``paired_baseline`` (ours
    / our drop-in at that revision).
    """
    if baseline_rev is None:
        return _measure(widths, structures, budget_s, min_rounds, seed, tick, None)
    with tempfile.TemporaryDirectory() as tmp:
        from .structures_bench import load_baseline

        package = importlib.import_module(load_baseline(baseline_rev, Path(tmp)))
        result = _measure(widths, structures, budget_s, min_rounds, seed, tick, package)
    result["baseline_rev"] = baseline_rev
    return result


def _measure(widths, structures, budget_s, min_rounds, seed, tick, baseline) -> dict:
    shares = _shares(widths)
    rows, groups, skipped = [], [], []
    for d in widths:
        model = f"wide{d}"
        cfgs = [Config("sgd", model, T)]
        for s in structures:
            if s in TOEPLITZ and d > OFFICIAL_TOEPLITZ_MAX_D:
                skipped.append({"label": f"official+adapter:singd:{s}", "model": model, "T": T,
                                "reason": f"official Toeplitz takes minutes per step at d = "
                                          f"{d}: not timed above d = {OFFICIAL_TOEPLITZ_MAX_D}"})
                continue
            cfgs += [Config("official", model, T, s, "singd"), Config("adapter", model, T, s,
                                                                      "singd")]
            if baseline is not None:
                cfgs.append(Config("baseline", model, T, s, "singd"))
        built = []
        for cfg in cfgs:
            reason = ct.official_available() if cfg.kind == "official" else (
                ct.adapter_available() if cfg.kind == "adapter" else None)
            if reason:
                skipped.append({"label": cfg.label, "model": model, "T": T, "reason": reason})
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built.append(_Baseline(cfg, baseline) if cfg.kind == "baseline"
                             else ct.make(cfg, seed=0))
        slow = {i: 2 for i, c in enumerate(built)
                if c.cfg.kind == "official" and c.cfg.structure in TOEPLITZ}
        batches = models.batches(model, 4)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            records, info = timing.run_group(
                built, batches, budget_s=budget_s * shares[d], min_rounds=min_rounds,
                max_rounds=200, slow_steps=slow, seed=seed,
                tick=lambda dt, msg, d=d: tick(dt, f"d={d} {msg}"))
        summary = {i: timing.summarize(records[i], T, i in slow) for i in range(len(built))}
        by_label = {c.cfg.label: i for i, c in enumerate(built)}
        sgd = by_label.get("sgd")
        sgd_ms = None if sgd is None else summary[sgd]["amortized_ms"]
        groups.append({"d": d, "sgd_ms": sgd_ms, **info,
                       "wall_s": round(time.perf_counter() - t0, 1)})
        for s in structures:
            i, j = by_label.get(f"adapter:singd:{s}"), by_label.get(f"official:singd:{s}")
            if i is None:
                continue
            ours = summary[i]["amortized_ms"]
            off = None if j is None else summary[j]["amortized_ms"]
            failed = built[i].failed or (None if j is None else built[j].failed)
            paired = None
            if j is not None and j not in slow:
                paired = timing.paired_ratio(records[i], records[j])
            row = {
                "d": d, "structure": s, "ours_ms": ours, "official_ms": off,
                "x_official": None if not off or failed else ours / off,
                "paired_official": paired,
                "official_estimated": j in slow,
                "ours_x_sgd": None if not sgd_ms else ours / sgd_ms,
                "official_x_sgd": None if not sgd_ms or off is None else off / sgd_ms,
                "failed": failed, "rounds": info["rounds"],
            }
            k = by_label.get(f"baseline:singd:{s}")
            if k is not None:
                base = summary[k]["amortized_ms"]
                bad = built[i].failed or built[k].failed
                row["baseline_ms"] = base
                row["x_baseline"] = None if not base or bad else ours / base
                row["paired_baseline"] = None if bad else timing.paired_ratio(records[i],
                                                                             records[k])
            rows.append(row)
    return {"widths": list(widths), "structures": list(structures), "T": T, "rows": rows,
            "groups": groups, "skipped": skipped, "baseline_rev": None}


def table(result: dict) -> list[str]:
    """Markdown lines: per width a row, per structure 'ours / official' (x SGD), and
    ours / official with the paired spread."""
    structures = result["structures"]
    cells = {(r["d"], r["structure"]): r for r in result["rows"]}
    L = ["| d | SGD ms | " + " | ".join(structures) + " |",
         "| --- | --- |" + " --- |" * len(structures)]
    for g in result["groups"]:
        line = [str(g["d"]), "–" if g["sgd_ms"] is None else f"{g['sgd_ms']:.1f}"]
        for s in structures:
            r = cells.get((g["d"], s))
            if r is None:
                line.append("–")
                continue
            off = "–" if r["official_x_sgd"] is None else f"{r['official_x_sgd']:.2f}"
            cell = f"{r['ours_x_sgd']:.2f} / {off}" if r["ours_x_sgd"] is not None else "–"
            if r["x_official"] is not None:
                cell += f" (**{r['x_official']:.2f}x**"
                p = r["paired_official"]
                cell += f" [{p['q25']:.2f}–{p['q75']:.2f}])" if p else (
                    " est.)" if r["official_estimated"] else ")")
            line.append(cell)
        L.append("| " + " | ".join(line) + " |")
    return L


def baseline_table(result: dict) -> list[str]:
    """Markdown lines of a ``baseline_rev`` run: per width and structure, ours / ours at
    that revision, with the paired spread."""
    structures = result["structures"]
    cells = {(r["d"], r["structure"]): r for r in result["rows"]}
    L = ["| d | " + " | ".join(structures) + " |", "| --- |" + " --- |" * len(structures)]
    for g in result["groups"]:
        line = [str(g["d"])]
        for s in structures:
            r = cells.get((g["d"], s), {})
            x, p = r.get("x_baseline"), r.get("paired_baseline")
            line.append("–" if x is None else f"{x:.3f}" + (
                f" [{p['q25']:.2f}–{p['q75']:.2f}]" if p else ""))
        L.append("| " + " | ".join(line) + " |")
    return L


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.widths", description=__doc__)
    p.add_argument("--widths", nargs="+", type=int, default=list(models.WIDTHS),
                   choices=list(models.WIDTHS))
    p.add_argument("--structures", nargs="+", default=list(STRUCTURES))
    p.add_argument("--budget", type=float, default=120.0, help="seconds, split over widths")
    p.add_argument("--baseline-rev", default=None,
                   help="also time our drop-in at this git revision (e.g. main, HEAD~1)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    result = measure(args.widths, args.structures, args.budget, baseline_rev=args.baseline_rev)
    print("step time as a multiple of SGD's, ours / official (ours / official, paired IQR)")
    print("\n".join(table(result)))
    if args.baseline_rev is not None:
        print(f"\nours / ours at {args.baseline_rev} (paired IQR)")
        print("\n".join(baseline_table(result)))
    for s in result["skipped"]:
        print(f"skipped {s['label']} ({s['model']}): {s['reason']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

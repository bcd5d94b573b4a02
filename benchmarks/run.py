"""Run the whole benchmark: ``python -m benchmarks.run [--quick] [options]``.

One process; per group (model, T) every contender gets its own model copy and the
same batches, and the contenders are timed round-robin in shuffled order (see
``benchmarks/timing.py``). Then every other target of issue 14, each interleaved
against its own reference: the width sweep (``widths.py``), the vmapped sweep and the
hand-written arithmetic (``sweep_bench.py``), the guard (``guard_bench.py``), the CNN's
convolution-statistics share (``conv_stats.py``), the peak memory of a step (child
process, ``memory.py``); optimizer-state bytes against the storage formulas, profiles
of our core, and the report (markdown, JSON, PNG) in ``benchmarks/results``, with one
row per target (``report.targets``).

The full run is sized for ~15 minutes on 2 quiet cores (``--budget-scale`` scales every
timing budget and round count); ``--quick`` for 1-2 minutes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from . import contenders as ct
from . import conv_stats, guard_bench, memory, models, readme_speed, report, sweep_bench, timing
from . import widths as width_sweep
from .contenders import BASELINES, Config

RESULTS = Path(__file__).resolve().parent / "results"
STRUCTURES = ["dense", "diagonal", "block30diagonal", "hierarchical15_15", "triltoeplitz"]
FULL_STRUCTURES = [*STRUCTURES, "triutoeplitz"]
SLOW_OFFICIAL = ("triltoeplitz", "triutoeplitz")  # ~430x SGD: single steps only
STAGES = ("groups", "widths", "sweep", "guard", "conv", "memory", "profile")
# Seconds of the stages outside the groups at --budget-scale 1 (full, quick): the width
# sweep's budget, and rough costs of the others for the progress bar's plan.
WIDTHS_BUDGET = (180.0, 10.0)
# memory: ~200 s at T=10 (the official dense step at d = 2048: 5.3 s statistics, 2.5 s
# plain; its Toeplitz at d = 512: 3.8 s a step; single steps, 2026-12-08, this machine)
PLANNED_EXTRA_S = {"sweep": (25, 8), "guard": (20, 5), "conv": (15, 4), "memory": (200, 60),
                   "profile": (20, 0)}
# The memory child: issue 14's table, two Linear(2048, 2048), batch 128, T=10 (dense also
# T=1); the official Toeplitz takes minutes per step there, so Toeplitz is compared at
# d = 512.
MEMORY_MODEL = ("wide2048", "wide512")  # (full, --quick --memory)
MEMORY_TOEPLITZ_MODEL = "wide512"
MEMORY_T = 10


def _rounds(base: int, scale: float, least: int = 3) -> int:
    return max(least, round(base * scale))


def plan(args) -> list[dict]:
    """The groups to time: model, T, methods, structures, implementations, budget (s)."""
    ours = ["adapter", "core", "core+cache"]
    ours += [] if args.quick or args.no_compile else ["compiled", "adapter+compile"]
    if args.quick:
        groups = [
            dict(model="mlp", T=10, methods=["singd"], structures=STRUCTURES, budget=30),
            dict(model="mlp", T=1, methods=["singd"], structures=["dense"], budget=8),
        ]
    else:
        # budgets cut from 140/60/45/20 s when the other targets joined the run (~15 min)
        groups = [
            dict(model="mlp", T=10, methods=["singd", "ikfac"], structures=FULL_STRUCTURES,
                 budget=100),
            dict(model="mlp", T=1, methods=["singd", "ikfac"], structures=FULL_STRUCTURES,
                 budget=40),
            dict(model="cnn", T=10, methods=["singd"], structures=STRUCTURES, budget=30),
            dict(model="cnn", T=1, methods=["singd"], structures=STRUCTURES, budget=12),
            dict(model="transformer", T=10, methods=["singd"], structures=STRUCTURES, budget=30),
            dict(model="transformer", T=1, methods=["singd"], structures=STRUCTURES, budget=12),
            dict(model="chargpt", T=10, methods=["singd"], structures=STRUCTURES, budget=30),
            dict(model="chargpt", T=1, methods=["singd"], structures=STRUCTURES, budget=12),
        ]
    out = []
    for g in groups:
        if args.models and g["model"] not in args.models:
            continue
        structures = [s for s in g["structures"] if not args.structures or s in args.structures]
        impls = ["official", *ours]
        if g["model"] != "mlp" or g["T"] != 10:  # compile budget: MLP, T=10 only
            impls = [i for i in impls if i not in ("compiled", "adapter+compile")]
        if g["T"] == 1:
            impls = [i for i in impls if i != "core+cache"]  # the cache only helps T > 1
        g.update(structures=structures, impls=impls, budget=g["budget"] * args.budget_scale)
        out.append(g)
    return out


def group_configs(g: dict, skipped: list[dict], quick: bool):
    """Baselines, then per method and structure the implementations. Time budget: IKFAC
    runs the official package and our core only (the adapter and the compiled core
    run the same core code as for SINGD), and the official Toeplitz (~430x SGD) runs
    for SINGD only, and not at all in --quick. ``core+cache`` only where the cache
    exists (dense, diagonal, block-diagonal)."""
    cfgs = [Config(k, g["model"], g["T"]) for k in BASELINES]
    for method in g["methods"]:
        for s in g["structures"]:
            for impl in g["impls"]:
                if method != "singd" and impl in ("adapter", "adapter+compile", "compiled"):
                    continue
                if impl == "core+cache" and not ct.caches(s):
                    continue
                if impl == "official" and s in SLOW_OFFICIAL and (quick or method != "singd"):
                    skipped.append({"label": f"official:{method}:{s}", "model": g["model"],
                                    "T": g["T"], "reason": "~430x SGD per step (single steps "
                                    "take seconds): " + ("skipped in --quick" if quick else
                                                         "timed for SINGD only")})
                    continue
                cfgs.append(Config(impl, g["model"], g["T"], s, method))
    return cfgs


def unavailable(kind: str) -> str | None:
    if kind == "official":
        return ct.official_available()
    if kind == "adapter":
        return ct.adapter_available()
    if kind == "adapter+compile":
        return ct.adapter_compile_available()
    if kind == "core+cache":
        return ct.cache_available()
    return None


def run_groups(args, groups, bar) -> tuple[list[dict], list[dict]]:
    results, skipped = [], []
    tx_cache: dict = {}
    compile_spent = 0.0
    for g in groups:
        batches = models.batches(g["model"], 8)
        built = []
        for cfg in group_configs(g, skipped, args.quick):
            reason = unavailable(cfg.kind)
            if reason:
                skipped.append({"label": cfg.label, "model": cfg.model, "T": cfg.T,
                                "reason": reason})
                continue
            compiles = cfg.kind in ("compiled", "adapter+compile")
            if compiles and compile_spent > args.compile_budget:
                skipped.append({"label": cfg.label, "model": cfg.model, "T": cfg.T,
                                "reason": f"compile budget ({args.compile_budget:.0f} s) spent"})
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    c = ct.make(cfg, seed=0, tx_cache=tx_cache)
                    t0 = time.perf_counter()
                    c.prepare(*batches[0])
                    if compiles:
                        spent = time.perf_counter() - t0
                        compile_spent += spent
                        _advance(bar, spent)
            except Exception as err:
                skipped.append({"label": cfg.label, "model": cfg.model, "T": cfg.T,
                                "reason": f"build failed: {type(err).__name__}: "
                                          f"{str(err).splitlines()[0][:200]}"})
                continue
            if c.failed:
                skipped.append({"label": cfg.label, "model": cfg.model, "T": cfg.T,
                                "reason": f"compile failed after {c.compile_s:.0f} s: {c.failed}"})
                continue
            built.append(c)
        slow = {i: 2 for i, c in enumerate(built)
                if c.cfg.kind == "official" and c.cfg.structure in SLOW_OFFICIAL}

        def tick(dt, label, _g=g):
            bar.set_postfix_str(f"{_g['model']} T={_g['T']} {label}"[:60], refresh=False)
            _advance(bar, dt)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            records, info = timing.run_group(
                built, batches, budget_s=g["budget"], min_rounds=args.min_rounds,
                max_rounds=args.max_rounds, slow_steps=slow, tick=tick, seed=args.seed,
            )
        results.append(summarize_group(g, built, records, info, slow))
    return results, skipped


def _rel_diff(a: dict, b: dict) -> float:
    """Largest relative L2 difference over the tensors of ``b`` (the core's trained ones)."""
    worst = 0.0
    for k, v in b.items():
        if k in a:
            worst = max(worst, float((a[k] - v).norm() / v.norm().clamp(min=1e-30)))
    return worst


def summarize_group(g, built, records, info, slow) -> dict:
    rows = []
    for i, c in enumerate(built):
        row = {"label": c.cfg.label, "kind": c.cfg.kind, "structure": c.cfg.structure,
               "method": c.cfg.method, "failed": c.failed, "compile_s": c.compile_s}
        row.update(timing.summarize(records[i], c.cfg.T, i in slow))
        try:
            row["state_bytes"] = c.state_bytes()
            row["cache_bytes"] = c.cache_bytes()
        except Exception as err:
            row["state_bytes"] = None
            row["state_error"] = f"{type(err).__name__}: {err}"
        if c.cfg.kind in ("core", "core+cache"):
            f = ct.expected_state(c.cfg, c.model)
            row["formula_bytes"] = f.total
            row["formula_terms"] = {"factors": f.factors, "momenta": f.momenta,
                                    "velocity": f.velocity, "counter": f.counter}
        rows.append(row)
    by_label = {c.cfg.label: i for i, c in enumerate(built)}

    def amort(label):
        i = by_label.get(label)
        return None if i is None else rows[i]["amortized_ms"]

    for i, c in enumerate(built):
        r = rows[i]
        refs = {"fwd+bwd": "fwd+bwd", "sgd": "sgd", "adamw": "adamw"}
        if c.cfg.structure is not None:
            refs["official"] = f"official:{c.cfg.method}:{c.cfg.structure}"
        for name, ref in refs.items():
            base = amort(ref)
            r[f"x_{name}"] = None if not base or r["amortized_ms"] is None else (
                r["amortized_ms"] / base)
            j = by_label.get(ref)
            r[f"x_{name}_estimated"] = i in slow or j in slow
            cpu = None if j is None else rows[j].get("cpu_amortized_ms")
            r[f"x_{name}_cpu"] = None if not cpu or r.get("cpu_amortized_ms") is None else (
                r["cpu_amortized_ms"] / cpu)
            r[f"paired_{name}"] = None if j is None or i in slow or j in slow else (
                timing.paired_ratio(records[i], records[j]))
        off = by_label.get(refs.get("official"))
        if (off is not None and c.cfg.kind != "official" and r["state_bytes"] is not None
                and rows[off]["state_bytes"]):
            r.update(ct.state_split(c, built[off]))
        if c.cfg.structure is not None and c.cfg.kind != "core":
            core = by_label.get(f"core:{c.cfg.method}:{c.cfg.structure}")
            if core is not None and built[core].steps == c.steps and not c.failed:
                r["param_rel_diff_vs_core"] = _rel_diff(c.parameters(), built[core].parameters())
    return {"model": g["model"], "T": g["T"], "description": models.SPECS[g["model"]].description,
            "budget_s": g["budget"], **info, "rows": rows}


def memory_configs(structures, quick: bool) -> list[list]:
    """[kind, model, structure, method, T] of the memory child (issue 14's memory table):
    SGD and AdamW for scale, then the official package and the drop-in per structure at
    T=10 (dense also T=1), on two Linear(2048, 2048) (--quick: 512). The child samples
    one T-cycle after two warm-up steps (``memory.default_steps``): at T=10 one
    statistics step and nine plain ones, at T=1 two statistics steps."""
    model = MEMORY_MODEL[quick]
    cfgs = [[k, model, None, None, MEMORY_T] for k in ("sgd", "adamw")]
    for s in structures:
        if s in SLOW_OFFICIAL and quick:
            continue
        where = MEMORY_TOEPLITZ_MODEL if s in SLOW_OFFICIAL else model
        for T in (1, MEMORY_T) if s == "dense" else (MEMORY_T,):
            for impl in ("official", "adapter"):
                if unavailable(impl) is None:
                    cfgs.append([impl, where, s, "singd", T])
    return cfgs


def run_extras(args, bar, structures) -> tuple[dict, dict]:
    """Every measurement outside the step-time groups; (results, not_measured reasons)."""
    out: dict = {}
    why: dict[str, str] = {}
    skip = set(args.skip)
    scale = args.budget_scale

    def stage(name, label):
        bar.set_postfix_str(label)
        return time.perf_counter()

    if "widths" in skip:
        why["widths"] = why["widths_dense"] = "skipped (--skip widths)"
    else:
        stage("widths", "width sweep")
        ws = (128, 512) if args.quick else models.WIDTHS
        ss = [s for s in width_sweep.STRUCTURES
              if not (args.quick and s in SLOW_OFFICIAL)
              and (not args.structures or s in args.structures)]
        def tick(dt, label):
            bar.set_postfix_str(f"widths {label}"[:60], refresh=False)
            _advance(bar, dt)

        out["widths"] = width_sweep.measure(
            ws, ss, WIDTHS_BUDGET[args.quick] * scale, min_rounds=args.min_rounds,
            seed=args.seed, tick=tick)

    if "sweep" in skip:
        why["sweep"] = why["hand"] = "skipped (--skip sweep)"
    else:
        t0 = stage("sweep", "vmapped sweep, hand-written arithmetic")
        rounds = _rounds(4 if args.quick else 10, scale)
        out["sweep"] = {
            "headline": sweep_bench.measure(128, 8, rounds, 1 if args.quick else 2),
            "bound": sweep_bench.measure_bound(128, 8, _rounds(2 * rounds, scale),
                                               1 if args.quick else 3),
        }
        _advance(bar, time.perf_counter() - t0)

    if "guard" in skip:
        why["guard"] = "skipped (--skip guard)"
    else:
        t0 = stage("guard", "guarded vs plain steps")
        # the drop-in face only (the default face): its pure face doubles the cost
        out["guard"] = guard_bench.run(["dense"] if args.quick else structures,
                                       _rounds(3 if args.quick else 6, scale), 10, ["dropin"])
        torch.set_num_threads(1)
        _advance(bar, time.perf_counter() - t0)

    if "conv" in skip or (args.models and "cnn" not in args.models):
        why["conv"] = "skipped (--skip conv or --models without cnn)"
    else:
        t0 = stage("conv", "CNN convolution statistics")
        # every structure in --quick too (main, 174722a)
        out["conv_statistics"] = conv_stats.share(structures,
                                                  reps=_rounds(3 if args.quick else 7, scale))
        _advance(bar, time.perf_counter() - t0)

    no_memory = "memory" in skip or args.no_memory or (args.quick and not args.memory)
    out["memory_peak"], out["memory_peak_error"] = [], None
    if no_memory:
        out["memory_peak_error"] = why["memory"] = (
            "skipped (--quick without --memory)" if args.quick and not args.memory
            else "skipped (--no-memory)")
    else:
        t0 = stage("memory", "peak RSS (child process)")
        errors = []
        # one child per structure: a crash or a timeout loses that structure only
        cfgs = memory_configs(structures, args.quick)
        for key in dict.fromkeys(c[2] for c in cfgs):
            rows, error = memory.run_child([c for c in cfgs if c[2] == key], timeout_s=400)
            out["memory_peak"] += rows
            if error:
                errors.append(f"{key or 'baselines'}: {error}")
        if errors:
            out["memory_peak_error"] = why["memory"] = "; ".join(errors)
        _advance(bar, time.perf_counter() - t0)
    return out, why


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="the MLP groups and small versions of the other stages, 1-2 minutes")
    p.add_argument("--models", nargs="*", choices=list(models.SPECS), help="subset of models")
    p.add_argument("--structures", nargs="*", help="subset of structures")
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="multiply every group's timing budget (default 1)")
    p.add_argument("--min-rounds", type=int, default=None)
    p.add_argument("--max-rounds", type=int, default=200)
    p.add_argument("--compile-budget", type=float, default=100.0,
                   help="seconds of torch.compile after which compiled contenders are skipped")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child process")
    p.add_argument("--memory", action="store_true", help="measure peak RSS in --quick too")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--skip", nargs="*", default=[], choices=STAGES,
                   help="stages to leave out (their targets are reported n/a)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default=None, help="file name stem (default bench / bench_quick)")
    args = p.parse_args(argv)
    if args.min_rounds is None:
        args.min_rounds = 2

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    inductor_cache = ct.use_private_inductor_cache()
    try:
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
    except Exception:
        pass
    from tqdm import tqdm

    t_start = time.perf_counter()
    groups = [] if "groups" in args.skip else plan(args)
    all_structures = [s for s in FULL_STRUCTURES if not args.structures or s in args.structures]
    # the other stages run per structure of STRUCTURES (triutoeplitz: the same code as
    # triltoeplitz, transposed)
    structures = [s for s in all_structures if s != "triutoeplitz"]
    meta = {
        "mode": "quick" if args.quick else "full",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "singd_official": _version("singd"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_start": timing.load_average(),
        "adapter": ct.adapter_available() or "available",
        "official": ct.official_available() or "available",
        "argv": sys.argv[1:] if argv is None else argv,
        "hyperparameters": ct.HP,
        "inductor_cache": inductor_cache,
    }
    planned = (sum(g["budget"] for g in groups) * 1.25 + (0 if args.quick else 60)
               + (0 if "widths" in args.skip else
                  WIDTHS_BUDGET[args.quick] * args.budget_scale * 1.25)
               + sum(v[args.quick] for k, v in PLANNED_EXTRA_S.items() if k not in args.skip))
    bar = tqdm(total=round(planned), unit="s", desc="benchmark", file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s planned "
                "[{elapsed}]{postfix}")
    results, skipped = run_groups(args, groups, bar)
    extras, not_measured = run_extras(args, bar, structures)
    if args.quick:
        not_measured.setdefault("transformer", "the transformer models run in the full run only")
        not_measured.setdefault("compile", "compiled contenders run in the full run only")
    elif args.no_compile:
        not_measured.setdefault("compile", "skipped (--no-compile)")
    if "groups" in args.skip:
        not_measured.update({k: "skipped (--skip groups)" for k in (
            "dense", "diagonal", "block_hierarchical", "toeplitz", "state", "transformer",
            "compile")})

    profiles = {}
    if not args.no_profile and not args.quick and "profile" not in args.skip:
        from . import profile

        bar.set_postfix_str("profiles")
        t0 = time.perf_counter()
        for s in all_structures:
            profiles[s] = profile.profile_core("mlp", s, "singd", T=10, out_dir=args.out)
        _advance(bar, time.perf_counter() - t0)
    bar.close()

    meta["load_end"] = timing.load_average()
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    skipped += extras.get("widths", {}).get("skipped", [])
    data = {"meta": meta, "groups": results, "skipped": skipped, **extras,
            "profiles": profiles, "not_measured": not_measured}
    data["targets"] = report.targets(data)
    stem = args.tag or ("bench_quick" if args.quick else "bench")
    args.out.mkdir(parents=True, exist_ok=True)
    paths = report.write(data, args.out, stem)
    print(f"benchmark finished in {meta['wall_s']:.0f} s "
          f"(load average {meta['load_start']} -> {meta['load_end']})")
    for pth in paths:
        print(f"wrote {pth}")
    if args.out.resolve() == RESULTS.resolve() and args.tag is None:
        readme_speed.update(args.out / f"{stem}.json")  # README's speed section from it
        print(f"rewrote the speed section of {readme_speed.README}")
    return 0


def _advance(bar, seconds: float) -> None:
    """Move the time-based progress bar; the plan is an estimate, so grow it if needed."""
    if bar.n + seconds > bar.total:
        bar.total = round(bar.n + seconds + 1)
    bar.update(seconds)


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())

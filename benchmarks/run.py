"""Run the whole benchmark: ``python -m benchmarks.run [--quick] [options]``.

One process; per group (model, T) every contender gets its own model copy and the
same batches, and the contenders are timed round-robin in shuffled order (see
``benchmarks/timing.py``). Then: optimizer-state bytes against the storage formulas,
peak RSS growth per step (child process), the CNN's convolution-statistics share,
profiles of our core, and the report (markdown, JSON, PNG) in ``benchmarks/results``.
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
from . import conv_stats, models, readme_speed, report, timing
from .contenders import BASELINES, Config

RESULTS = Path(__file__).resolve().parent / "results"
STRUCTURES = ["dense", "diagonal", "block30diagonal", "hierarchical15_15", "triltoeplitz"]
FULL_STRUCTURES = [*STRUCTURES, "triutoeplitz"]
SLOW_OFFICIAL = ("triltoeplitz", "triutoeplitz")  # ~430x SGD: single steps only


def plan(args) -> list[dict]:
    """The groups to time: model, T, methods, structures, implementations, budget (s)."""
    ours = ["adapter", "core", "core+cache"]
    ours += [] if args.quick or args.no_compile else ["compiled"]
    if args.quick:
        groups = [
            dict(model="mlp", T=10, methods=["singd"], structures=STRUCTURES, budget=30),
            dict(model="mlp", T=1, methods=["singd"], structures=["dense"], budget=8),
        ]
    else:
        groups = [
            dict(model="mlp", T=10, methods=["singd", "ikfac"], structures=FULL_STRUCTURES,
                 budget=140),
            dict(model="mlp", T=1, methods=["singd", "ikfac"], structures=FULL_STRUCTURES,
                 budget=60),
            dict(model="cnn", T=10, methods=["singd"], structures=STRUCTURES, budget=45),
            dict(model="cnn", T=1, methods=["singd"], structures=STRUCTURES, budget=20),
            dict(model="transformer", T=10, methods=["singd"], structures=STRUCTURES, budget=45),
            dict(model="transformer", T=1, methods=["singd"], structures=STRUCTURES, budget=20),
            dict(model="chargpt", T=10, methods=["singd"], structures=STRUCTURES, budget=45),
            dict(model="chargpt", T=1, methods=["singd"], structures=STRUCTURES, budget=20),
        ]
    out = []
    for g in groups:
        if args.models and g["model"] not in args.models:
            continue
        structures = [s for s in g["structures"] if not args.structures or s in args.structures]
        impls = ["official", *ours]
        if g["model"] != "mlp" or g["T"] != 10:
            impls = [i for i in impls if i != "compiled"]  # compile budget: MLP, T=10 only
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
                if method != "singd" and impl in ("adapter", "compiled"):
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
            if cfg.kind == "compiled" and compile_spent > args.compile_budget:
                skipped.append({"label": cfg.label, "model": cfg.model, "T": cfg.T,
                                "reason": f"compile budget ({args.compile_budget:.0f} s) spent"})
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    c = ct.make(cfg, seed=0, tx_cache=tx_cache)
                    t0 = time.perf_counter()
                    c.prepare(*batches[0])
                    if cfg.kind == "compiled":
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
        if c.cfg.structure is not None and c.cfg.kind != "core":
            core = by_label.get(f"core:{c.cfg.method}:{c.cfg.structure}")
            if core is not None and built[core].steps == c.steps and not c.failed:
                r["param_rel_diff_vs_core"] = _rel_diff(c.parameters(), built[core].parameters())
    return {"model": g["model"], "T": g["T"], "description": models.SPECS[g["model"]].description,
            "budget_s": g["budget"], **info, "rows": rows}


def memory_configs(structures) -> list[list]:
    cfgs = [[k, "mlp", None, None] for k in BASELINES]
    for s in structures:
        for impl in ("official", "adapter", "core"):
            if unavailable(impl) is None:
                cfgs.append([impl, "mlp", s, "singd"])
    return cfgs


# issue 14's memory table: two Linear(2048, 2048), batch 128 (the official Toeplitz takes
# seconds per step at this width: not measured); T=10 has one statistics step in 10
WIDE_STRUCTURES = ["dense", "diagonal", "block30diagonal", "hierarchical15_15"]


def wide_memory_configs(structures) -> list[list]:
    """``[kind, "wide", structure, "singd", T, steps]`` for the official package and ours:
    T=10 over steps 2..11 (the statistics step 10 and nine plain ones), and T=1 for
    dense (two statistics steps without cached products)."""
    cfgs = []
    for s in (s for s in WIDE_STRUCTURES if s in structures):
        for T, steps in ((10, 10), (1, 2)) if s == "dense" else ((10, 10),):
            cfgs += [[impl, "wide", s, "singd", T, steps] for impl in ("official", "adapter")
                     if unavailable(impl) is None]
    return cfgs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="MLP only, ~2 minutes")
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
    groups = plan(args)
    all_structures = sorted({s for g in groups for s in g["structures"]},
                            key=lambda s: FULL_STRUCTURES.index(s) if s in FULL_STRUCTURES else 99)
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
    planned = sum(g["budget"] for g in groups) * 1.25 + (0 if args.quick else 60)
    bar = tqdm(total=round(planned), unit="s", desc="benchmark", file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s planned "
                "[{elapsed}]{postfix}")
    results, skipped = run_groups(args, groups, bar)

    bar.set_postfix_str("CNN convolution statistics")
    conv = []
    if not args.models or "cnn" in args.models:
        t0 = time.perf_counter()
        conv = conv_stats.share(STRUCTURES, reps=3 if args.quick else 5)
        _advance(bar, time.perf_counter() - t0)

    no_memory = args.no_memory or (args.quick and not args.memory)
    mem_rows, mem_error = [], None
    wide_rows, wide_error = [], None
    if no_memory:
        mem_error = "skipped (--quick without --memory)" if args.quick else "skipped (--no-memory)"
        wide_error = mem_error
    else:
        bar.set_postfix_str("peak RSS (child process)")
        t0 = time.perf_counter()
        mem_structures = [s for s in all_structures if s != "triutoeplitz"]
        memory = __import__("benchmarks.memory", fromlist=["run_child"])
        mem_rows, mem_error = memory.run_child(memory_configs(mem_structures), timeout_s=240)
        bar.set_postfix_str("peak RSS, two Linear(2048, 2048) (child process)")
        wide_rows, wide_error = memory.run_child(wide_memory_configs(all_structures),
                                                 timeout_s=1200)
        _advance(bar, time.perf_counter() - t0)

    profiles = {}
    if not args.no_profile and not args.quick:
        from . import profile

        bar.set_postfix_str("profiles")
        t0 = time.perf_counter()
        for s in all_structures:
            profiles[s] = profile.profile_core("mlp", s, "singd", T=10, out_dir=args.out)
        _advance(bar, time.perf_counter() - t0)
    bar.close()

    meta["load_end"] = timing.load_average()
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    data = {"meta": meta, "groups": results, "skipped": skipped, "memory_peak": mem_rows,
            "memory_peak_error": mem_error, "memory_wide": wide_rows,
            "memory_wide_error": wide_error, "conv_statistics": conv, "profiles": profiles}
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

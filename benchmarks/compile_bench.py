"""torch.compile of the whole SINGD training step, per structure, and of the vmapped sweep.

The step is the pure core end to end, ``sf.make_step(tx, capture)``: ``capture``
(fx-traced, no hooks) + ``tx.update`` + ``apply_updates``, as two functions: with
statistics (factor update) and plain (``record_layers=False``, no factor update). Both are compiled with
``torch.compile(fullgraph=True)`` (inductor, CPU), hyperparameters passed as 0-d
tensors. Per structure family (K and C alike) on an MLP 64-128-128-10, batch 64,
float32, one thread:

* compile time of each function (first call: dynamo, AOT autograd, inductor and the
  C++ builds; a fresh inductor cache unless ``--warm-cache``),
* the number of compiled graphs after training with changing hyperparameter values
  (2 means: no graph break, no recompile),
* eager vs compiled step time (medians of interleaved rounds, thread CPU time and
  wall clock) for both steps and their T = 10 mix,
* the largest relative parameter difference compiled vs eager after the timed steps.

Then the same for the vmapped sweep (``sf.make_sweep``, N = 8, dense): eager vs
``sweep.compile(fullgraph=True)``.

``--dropin``: instead, the drop-in ``sf.SINGD(model, ..., compile=True)`` (its own
per-layer functions compiled, the model eager) against ``sf.SINGD`` eager, on the MLP
784-512-512-10 of ``benchmarks/models.py``, batch 128, T = 10, an ``lr_cov`` schedule
(a new value at every factor update) and a learning rate changed every step; per
structure (:data:`DROPIN_STRUCTURES`): the cold compile time (first T-cycle, a fresh
inductor cache per structure), the graphs compiled (unique graphs: no recompiles), the
steady-state step-time ratio compiled / eager (medians of interleaved T-cycles, thread
CPU time) and the largest relative parameter difference. :func:`dropin_rows` is the
entry point for other harnesses (``benchmarks.run``).

Usage::

    python -m benchmarks.compile_bench                  # every structure; long (C++ builds)
    python -m benchmarks.compile_bench --quick          # dense, hierarchical3_2 + the sweep
    python -m benchmarks.compile_bench --structures dense diagonal --no-sweep
    python -m benchmarks.compile_bench --dropin         # the drop-in's compile=True rows

Writes ``compile_bench.md``, ``.json`` and ``.png`` (``--dropin``:
``compile_dropin.md`` and ``.json``) into ``benchmarks/results/`` (or ``--out``) and
prints their paths.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

FAMILIES = [
    "dense", "diagonal", "block3diagonal", "hierarchical3_2", "triltoeplitz",
    "triutoeplitz", "triltopleftdiag", "trilbottomrightdiag", "triutopleftdiag",
    "triubottomrightdiag",
]


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two structures, fewer rounds")
    parser.add_argument("--structures", nargs="+", default=None)
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--warm-cache", action="store_true", help="reuse the inductor cache")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--dropin", action="store_true",
                        help="the drop-in SINGD(compile=True) vs eager on the MLP 784-512-512-10")
    parser.add_argument("--dropin-model", choices=("mlp", "small"), default="mlp",
                        help="with --dropin: 'small' is the MLP 64-128-128-10, batch 64")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return parser.parse_args(argv)


ARGS = parse(sys.argv[1:] if __name__ == "__main__" else [])
if not ARGS.warm_cache and __name__ == "__main__":
    # before torch reads it: cold compiles, as a user's first run
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="singd_compile_bench_")

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

import singd_functional as sf  # noqa: E402
from benchmarks.sweep_bench import BATCH, CLASSES, D_IN, make_mlp  # noqa: E402


def hyperparams(t: int) -> sf.HyperParams:
    return sf.HyperParams(lr=torch.tensor(1e-3 * (1 + 0.1 * t)), damping=torch.tensor(1e-3 * (1 + t)))


def step_call(fn, run, t, x, y):
    return fn(run[0], run[1], x, y, hyperparams=hyperparams(t))


def clocked(fn, *args):
    w, c = time.perf_counter(), time.thread_time()
    out = fn(*args)
    return out, time.thread_time() - c, time.perf_counter() - w


def median_ms(v):
    return 1e3 * statistics.median(v)


def bench_structure(family: str, rounds: int) -> dict:
    torch._dynamo.reset()
    model = make_mlp(128, 0)
    layers = sf.find_layers(model)
    capture = sf.make_capture(model, F.cross_entropy, layers)
    tx = sf.singd(layers, structures=(family, family))
    eager = sf.make_step(tx, capture)
    counter = CompileCounterWithBackend("inductor")
    compiled = [torch.compile(f, fullgraph=True, backend=counter) for f in eager]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, D_IN, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    runs = {"eager": [params, tx.init(params)], "compiled": [params, tx.init(params)]}
    fns = {"eager": eager, "compiled": compiled}
    out = {"structure": family}
    t = 0
    # first calls: compile time (the eager side runs the same steps to stay in sync)
    for i, name in enumerate(("stats", "plain")):
        for side in ("eager", "compiled"):
            run = runs[side]
            (run[0], run[1], _), c, w = clocked(step_call, fns[side][i], run, t, x, y)
            if side == "compiled":
                out[f"compile_s_{name}"] = w
                out[f"compile_cpu_s_{name}"] = c
        t += 1
    names = ("stats", "plain")
    times = {(side, name): ([], []) for side in fns for name in names}
    for _ in range(rounds):
        for i, name in enumerate(names):
            for side in ("eager", "compiled"):
                run = runs[side]
                (run[0], run[1], _), c, w = clocked(step_call, fns[side][i], run, t, x, y)
                times[side, name][0].append(c)
                times[side, name][1].append(w)
            t += 1
    summarize(out, times, names, counter, runs["eager"][0], runs["compiled"][0])
    return out


def summarize(out: dict, times: dict, names: tuple[str, str], counter, eager_params, compiled_params):
    """Into ``out``: medians per (side, step), speed-ups, the T = 10 mix (one step
    ``names[0]`` with statistics, nine plain steps ``names[1]``), the number of compiled
    graphs and the largest relative parameter difference compiled vs eager."""
    sides = ("eager", "compiled")
    for name in names:
        for side in sides:
            out[f"{side}_cpu_ms_{name}"] = median_ms(times[side, name][0])
            out[f"{side}_wall_ms_{name}"] = median_ms(times[side, name][1])
        out[f"speedup_{name}"] = out[f"eager_cpu_ms_{name}"] / out[f"compiled_cpu_ms_{name}"]
    stats, plain = names
    for side in sides:
        out[f"{side}_cpu_ms_T10"] = (out[f"{side}_cpu_ms_{stats}"] + 9 * out[f"{side}_cpu_ms_{plain}"]) / 10
    out["speedup_T10"] = out["eager_cpu_ms_T10"] / out["compiled_cpu_ms_T10"]
    out["graphs"] = counter.frame_count
    pe, pc = eager_params, compiled_params
    out["max_rel_diff"] = max(((pc[k] - pe[k]).norm() / pe[k].norm()).item() for k in pe)


def bench_sweep(rounds: int, n: int = 8) -> dict:
    torch._dynamo.reset()
    models = [make_mlp(128, seed) for seed in range(n)]
    layers = sf.find_layers(models[0])
    capture = sf.make_capture(models[0], F.cross_entropy, layers)
    tx = sf.singd(layers, structures=("dense", "dense"))
    hp = sf.HyperParams(lr=torch.linspace(1e-3, 1e-2, n, dtype=torch.float64))
    eager = sf.make_sweep(tx, capture, hp)
    counter = CompileCounterWithBackend("inductor")
    compiled = eager.compile(fullgraph=True, backend=counter)
    stacked, _ = torch.func.stack_module_state(models)
    states = {"eager": eager.init(stacked, stacked=True), "compiled": compiled.init(stacked, stacked=True)}
    sweeps = {"eager": eager, "compiled": compiled}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, D_IN, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)
    out = {"N": n, "structure": "dense"}
    for name in ("step", "plain_step"):
        for side in ("eager", "compiled"):
            fn = getattr(sweeps[side], name)
            (states[side], _), c, w = clocked(fn, states[side], x, y)
            if side == "compiled":
                out[f"compile_s_{name}"] = w
                out[f"compile_cpu_s_{name}"] = c
    times = {(side, name): ([], []) for side in sweeps for name in ("step", "plain_step")}
    for _ in range(rounds):
        for name in ("step", "plain_step"):
            for side in ("eager", "compiled"):
                fn = getattr(sweeps[side], name)
                (states[side], _), c, w = clocked(fn, states[side], x, y)
                times[side, name][0].append(c)
                times[side, name][1].append(w)
    summarize(out, times, ("step", "plain_step"), counter, states["eager"].params, states["compiled"].params)
    return out


DROPIN_STRUCTURES = ("dense", "diagonal", "block30diagonal", "hierarchical15_15", "triltoeplitz")


def _dropin_cycle(opt, model, x, y, T: int, t0: int) -> list[tuple[float, float]]:
    """T steps (one with statistics first): (thread CPU s, wall s) of each ``step()``."""
    from benchmarks import models

    times = []
    for t in range(t0, t0 + T):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * (1 + 0.01 * t)  # a new Python float every step
        opt.zero_grad(set_to_none=True)
        models.loss_fn(model(x), y).backward()
        _, c, w = clocked(opt.step)
        times.append((c, w))
    return times


def _dropin_model(model: str):
    """(module, inputs, targets): ``"mlp"`` (784-512-512-10, batch 128) or ``"small"``
    (the MLP 64-128-128-10, batch 64, of the pure-core rows above)."""
    from benchmarks import models

    g = torch.Generator().manual_seed(0)
    if model == "small":
        return (make_mlp(128, 0), torch.randn(BATCH, D_IN, generator=g),
                torch.randint(0, CLASSES, (BATCH,), generator=g))
    return (models.build(model, 0), torch.randn(128, 784, generator=g),
            torch.randint(0, 10, (128,), generator=g))


def bench_dropin(structure: str, rounds: int, T: int = 10, fresh_cache: bool = True,
                 model: str = "mlp") -> dict:
    """One structure: ``sf.SINGD(..., compile=True)`` vs eager (see the module doc)."""
    import random

    import torch._dynamo.utils

    torch._dynamo.reset()
    if fresh_cache:  # inductor reads it at every compile: this structure compiles cold
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="singd_compile_dropin_")
    hp = dict(lr=1e-3, momentum=0.9, damping=1e-3, alpha1=0.5, weight_decay=0.0,
              lr_cov=lambda t: 1e-2 / (1 + t / 100))
    nets, (x, y) = {}, (None, None)
    for side in ("eager", "compiled"):
        nets[side], x, y = _dropin_model(model)
    opts = {side: sf.SINGD(nets[side], T=T, structures=structure, compile=side == "compiled", **hp)
            for side in nets}
    graphs0 = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    first = {side: _dropin_cycle(opts[side], nets[side], x, y, T, 0) for side in nets}
    out = {
        "structure": structure, "model": model, "T": T, "rounds": rounds,
        # the compiled side's first cycle beyond the eager one: compiling
        "compile_s": sum(w for _, w in first["compiled"]) - sum(w for _, w in first["eager"]),
        "compile_s_stats": first["compiled"][0][1], "compile_s_plain": first["compiled"][1][1],
        "kernels": len(opts["compiled"]._kernels),
    }
    graphs1 = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    cycles: dict[str, list[list[tuple[float, float]]]] = {side: [] for side in nets}
    order = list(nets)
    rng = random.Random(0)
    for r in range(rounds):
        rng.shuffle(order)
        for side in order:
            cycles[side].append(_dropin_cycle(opts[side], nets[side], x, y, T, T * (r + 1)))
    out["graphs"] = graphs1 - graphs0
    out["recompiles"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs1
    out["failure"] = opts["compiled"]._kernels.failure
    for side in nets:
        out[f"{side}_cpu_ms_cycle"] = median_ms([sum(c for c, _ in cyc) / T for cyc in cycles[side]])
        out[f"{side}_cpu_ms_stats"] = median_ms([cyc[0][0] for cyc in cycles[side]])
        out[f"{side}_cpu_ms_plain"] = median_ms([c for cyc in cycles[side] for c, _ in cyc[1:]])
    pairs = [sum(c for c, _ in a) / sum(c for c, _ in b)
             for a, b in zip(cycles["compiled"], cycles["eager"])]
    q = statistics.quantiles(pairs, n=4, method="inclusive") if len(pairs) > 1 else pairs * 3
    out["ratio_T10"], out["ratio_q25"], out["ratio_q75"] = statistics.median(pairs), q[0], q[2]
    for name in ("stats", "plain"):
        out[f"ratio_{name}"] = out[f"compiled_cpu_ms_{name}"] / out[f"eager_cpu_ms_{name}"]
    pe, pc = (dict(nets[side].named_parameters()) for side in ("eager", "compiled"))
    out["max_rel_diff"] = max(((pc[k] - pe[k]).norm() / pe[k].norm()).item() for k in pe)
    return out


def dropin_rows(structures=DROPIN_STRUCTURES, rounds: int = 20, T: int = 10,
                model: str = "mlp") -> list[dict]:
    """:func:`bench_dropin` for each structure (one thread, denormals flushed)."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    rows = []
    for structure in structures:
        r = bench_dropin(structure, rounds, T, model=model)
        rows.append(r)
        print(f"drop-in {model} {structure}: compile {r['compile_s']:.0f} s, {r['graphs']} graphs "
              f"(+{r['recompiles']} later), compiled/eager {r['ratio_T10']:.2f} "
              f"[{r['ratio_q25']:.2f}, {r['ratio_q75']:.2f}] (stats {r['ratio_stats']:.2f}, "
              f"plain {r['ratio_plain']:.2f}), diff {r['max_rel_diff']:.1e}", flush=True)
    return rows


def dropin_markdown(rows: list[dict], env: dict) -> str:
    """The drop-in rows as the Markdown page ``compile_dropin.md``."""
    header = ["structure", "compile s (cold)", "graphs", "later recompiles", "eager ms/step",
              "compiled ms/step", "compiled / eager (T=10)", "[q25, q75]", "statistics step",
              "plain step", "max rel diff"]
    cells = [[r["structure"], f"{r['compile_s']:.0f}", r["graphs"], r["recompiles"],
              f"{r['eager_cpu_ms_cycle']:.2f}", f"{r['compiled_cpu_ms_cycle']:.2f}",
              f"{r['ratio_T10']:.2f}", f"[{r['ratio_q25']:.2f}, {r['ratio_q75']:.2f}]",
              f"{r['ratio_stats']:.2f}", f"{r['ratio_plain']:.2f}", f"{r['max_rel_diff']:.1e}"]
             for r in rows]
    failures = [f"- {r['structure']}: {r['failure']}" for r in rows if r.get("failure")]
    rounds = rows[0]["rounds"] if rows else 0
    model = ("MLP 64-128-128-10, batch 64" if rows and rows[0]["model"] == "small"
             else "MLP 784-512-512-10, batch 128")
    return f"""# The drop-in `sf.SINGD(..., compile=True)` (CPU, inductor)

{model}, T = 10, float32, one thread; the optimizer's per-layer
functions compiled (factor update, preconditioned direction), the model eager. The
learning rate changes every step and `lr_cov` at every factor update (a schedule): no
recompiles. "compile s" is the first T-cycle's wall time beyond eager's, with a fresh
inductor cache per structure (C++ builds included); step times are medians over
{rounds} interleaved T-cycles (thread CPU time, ms per step, `step()` only: the
forward and backward pass are not in them); "compiled / eager" is the median of the
per-round paired ratios of whole cycles, with its quartiles.
torch {env['torch']}, {env['cores']} cores; load average {env['load_average'][0]:.1f} at
start, {env['load_average_end'][0]:.1f} at the end (other processes share the cores,
which lengthens the compile times most).

{table(cells, header)}
{chr(10).join(failures)}
"""


def table(rows, header):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["structure"] for r in results]
    xs = range(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.8))
    wdt = 0.2
    for k, (key, label) in enumerate([("eager_cpu_ms_stats", "eager, statistics step"),
                                      ("compiled_cpu_ms_stats", "compiled, statistics step"),
                                      ("eager_cpu_ms_plain", "eager, plain step"),
                                      ("compiled_cpu_ms_plain", "compiled, plain step")]):
        axes[0].bar([x + (k - 1.5) * wdt for x in xs], [r[key] for r in results], wdt, label=label)
    axes[0].set_ylabel("ms per step (CPU time, 1 thread)")
    axes[0].set_title("step time, MLP 64-128-128-10, batch 64")
    axes[1].bar([x - 0.2 for x in xs], [r["compile_s_stats"] for r in results], 0.4, label="statistics step")
    axes[1].bar([x + 0.2 for x in xs], [r["compile_s_plain"] for r in results], 0.4, label="plain step")
    axes[1].set_ylabel("seconds (wall) for the first call")
    axes[1].set_title("compile time (cold inductor cache)")
    for ax in axes:
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=35, ha="right")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("torch.compile(fullgraph=True) of the whole SINGD step, CPU inductor")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main_dropin(args=ARGS):
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "cores": os.cpu_count(), "load_average": os.getloadavg()}
    t0 = time.time()
    rows = dropin_rows(args.structures or DROPIN_STRUCTURES, args.rounds or 20,
                       model=args.dropin_model)
    env["load_average_end"] = os.getloadavg()
    env["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "compile_dropin" if args.dropin_model == "mlp" else f"compile_dropin_{args.dropin_model}"
    paths = {ext: out / f"{stem}.{ext}" for ext in ("md", "json")}
    paths["json"].write_text(json.dumps({"environment": env, "structures": rows}, indent=2))
    paths["md"].write_text(dropin_markdown(rows, env))
    for p in paths.values():
        print(p)


def main(args=ARGS):
    if args.dropin:
        return main_dropin(args)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    structures = args.structures or (["dense", "hierarchical3_2"] if args.quick else FAMILIES)
    rounds = args.rounds or (5 if args.quick else 9)
    env = {
        "torch": torch.__version__, "python": platform.python_version(), "cores": os.cpu_count(),
        "load_average": os.getloadavg(), "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default"),
    }
    t0 = time.time()
    results = []
    for family in structures:
        r = bench_structure(family, rounds)
        results.append(r)
        print(f"{family}: compile {r['compile_s_stats']:.0f}s + {r['compile_s_plain']:.0f}s, graphs {r['graphs']}, "
              f"T10 {r['eager_cpu_ms_T10']:.2f} -> {r['compiled_cpu_ms_T10']:.2f} ms ({r['speedup_T10']:.2f}x), "
              f"diff {r['max_rel_diff']:.1e}", flush=True)
    sweep = None
    if not args.no_sweep:
        sweep = bench_sweep(rounds)
        print(f"sweep N=8: compile {sweep['compile_s_step']:.0f}s + {sweep['compile_s_plain_step']:.0f}s, "
              f"graphs {sweep['graphs']}, T10 {sweep['eager_cpu_ms_T10']:.2f} -> {sweep['compiled_cpu_ms_T10']:.2f} ms "
              f"({sweep['speedup_T10']:.2f}x), diff {sweep['max_rel_diff']:.1e}", flush=True)
    env["load_average_end"] = os.getloadavg()
    env["seconds"] = round(time.time() - t0, 1)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"compile_bench.{ext}" for ext in ("md", "json", "png")}
    paths["json"].write_text(json.dumps({"environment": env, "structures": results, "sweep": sweep,
                                         "quick": args.quick}, indent=2))
    plot(results, paths["png"])
    rows = [[r["structure"], f"{r['compile_s_stats']:.0f}", f"{r['compile_s_plain']:.0f}", r["graphs"],
             f"{r['eager_cpu_ms_stats']:.2f}", f"{r['compiled_cpu_ms_stats']:.2f}", f"{r['speedup_stats']:.2f}x",
             f"{r['eager_cpu_ms_plain']:.2f}", f"{r['compiled_cpu_ms_plain']:.2f}", f"{r['speedup_plain']:.2f}x",
             f"{r['speedup_T10']:.2f}x", f"{r['max_rel_diff']:.1e}"] for r in results]
    header = ["structure", "compile s (stats)", "compile s (plain)", "graphs", "eager ms (stats)",
              "compiled ms (stats)", "speedup", "eager ms (plain)", "compiled ms (plain)", "speedup",
              "T=10 speedup", "max rel diff"]
    sweep_md = ""
    if sweep:
        s = sweep
        sweep_md = f"""## Vmapped sweep (N = 8, dense)

| | compile s | graphs | eager ms | compiled ms | speedup |
|---|---|---|---|---|---|
| step with statistics | {s['compile_s_step']:.0f} | {s['graphs']} (both) | {s['eager_cpu_ms_step']:.2f} | {s['compiled_cpu_ms_step']:.2f} | {s['speedup_step']:.2f}x |
| plain step | {s['compile_s_plain_step']:.0f} | | {s['eager_cpu_ms_plain_step']:.2f} | {s['compiled_cpu_ms_plain_step']:.2f} | {s['speedup_plain_step']:.2f}x |
| T = 10 mix | | | {s['eager_cpu_ms_T10']:.2f} | {s['compiled_cpu_ms_T10']:.2f} | {s['speedup_T10']:.2f}x |

Largest relative parameter difference compiled vs eager: {s['max_rel_diff']:.1e}.
"""
    md = f"""# torch.compile of the whole SINGD step (CPU, inductor)

MLP 64-128-128-10, batch 64, float32, one thread; capture + update + apply as two
functions (with statistics / plain), `torch.compile(fullgraph=True)`, hyperparameters as
0-d tensors that change every step. Step times are medians of {rounds} interleaved rounds
(thread CPU time, ms); compile time is the wall time of the first call with
{'a warm' if args.warm_cache else 'a fresh'} inductor cache (C++ builds included).
"graphs" counts compiled graphs after all steps: 2 = one per function, no recompile.
torch {env['torch']}, {env['cores']} cores; load average {env['load_average'][0]:.1f} at start,
{env['load_average_end'][0]:.1f} at the end (other processes share the cores, which
lengthens the compile times most).

{table(rows, header)}

{sweep_md}
![plot](compile_bench.png)
"""
    paths["md"].write_text(md)
    for p in paths.values():
        print(p)


if __name__ == "__main__":
    main()

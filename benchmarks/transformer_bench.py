"""SINGD on a character GPT (the standard library's sources) against AdamW, Muon and SOAP.

    python -m benchmarks.transformer_bench [--models nanogpt,stock] [--steps 600] [--quick]

Per model family (:mod:`singd_functional.examples.chargpt`) and optimizer:

1. the learning rate is tuned on seed 0 the same way for every optimizer: a log grid
   of factor-3 steps (``GRIDS``), widened by one point while the best value sits at an
   edge (at most ``MAX_WIDEN`` times). SINGD's grid runs as ONE vmapped sweep per
   structure (``sf.make_sweep``); the others one run per value;
2. seed 1 (other initial weights, other batches) is trained at the best lr;
3. step time: every optimizer at its best lr on its own model copy, timed round-robin
   in one process (CPU time per step, 1 thread, ``--timing-rounds`` rounds of
   ``--timing-steps`` steps, median), reported as a ratio to AdamW;
4. optimizer-state bytes after training.

Parameters outside SINGD's layers (embeddings, LayerNorms, and with the stock model
the attention's raw in-projection) get AdamW at ``--fallback-lr`` (3e-3, fixed so that
the optimizers can be tuned in parallel processes), as do Muon's non-hidden parameters
(embeddings, head, norms, biases). Every run of a model starts
from the same weights of its seed and sees the same batches.

Each finished run is appended to ``<out>.jsonl``; a cut-off run continues from it.
The report: ``<out>.json``, ``<out>.md`` (tables) and ``<out>.png`` (validation curves).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import singd_functional as sf
from singd_functional.examples import chargpt

RESULTS = Path(__file__).resolve().parent / "results"
STRUCTURES = {
    "dense": "dense",
    "hierarchical": "hierarchical15_15",
    "block-diagonal": "block16diagonal",
    "diagonal": "diagonal",
}
GRIDS = {  # the starting grid of each optimizer family (factor-3 steps)
    "AdamW": (1e-3, 3e-3, 1e-2),
    "Muon": (1e-3, 3e-3, 1e-2),
    "SOAP": (1e-3, 3e-3, 1e-2),
    "SINGD": (3e-3, 1e-2, 3e-2),
}
MAX_WIDEN = 1
FACTOR = 3.0


def soap_available() -> bool:
    try:
        import heavyball  # noqa: F401
    except ImportError:
        return False
    return True


def optimizer_names(args) -> list[str]:
    names = ["AdamW", "Muon"]
    if soap_available() and not args.no_soap:
        names.append("SOAP")
    names += [f"SINGD {s}" for s in args.structures]
    return names


def selected(args, names: list[str]) -> list[str]:
    return [n for n in names if args.optimizers is None or n in args.optimizers]


def family(name: str) -> str:
    return name.split()[0]


# ----------------------------------------------------------------------- optimizers
def hidden_matrices(model: nn.Module) -> list[str]:
    """Muon's parameters: the 2-D weights inside the blocks (not embeddings or head)."""
    return [k for k, p in model.named_parameters() if p.dim() == 2 and k.startswith("blocks.")]


def torch_optimizers(name: str, model: nn.Module, lr: float, adamw_lr: float):
    """The torch.optim optimizers of ``name`` for ``model`` (stepped together)."""
    if name == "AdamW":
        return [torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)]
    if name == "Muon":
        hidden = set(hidden_matrices(model))
        named = dict(model.named_parameters())
        muon = torch.optim.Muon(
            [named[k] for k in hidden], lr=lr, weight_decay=0.0,
            adjust_lr_fn="match_rms_adamw",
        )
        rest = [p for k, p in named.items() if k not in hidden]
        return [muon, torch.optim.AdamW(rest, lr=adamw_lr, weight_decay=0.0)]
    if name == "SOAP":
        import heavyball
        import heavyball.utils

        heavyball.utils.compile_mode = None  # eager (compiling on this CPU costs minutes)
        return [heavyball.SOAP(model.parameters(), lr=lr, weight_decay=0.0)]
    raise ValueError(name)


def singd_core(name: str, model: nn.Module, lr: float, adamw_lr: float, settings: dict):
    structure = STRUCTURES[name.split(" ", 1)[1]]
    return chargpt.core_optimizer(
        model, structures=structure, fallback_lr=adamw_lr, lr=lr, **settings
    )


# --------------------------------------------------------------------------- records
class Store:
    """The jsonl of finished runs, keyed by (model, optimizer, seed, lr, settings)."""

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        self.records: dict[str, dict] = {}
        if path.exists() and not fresh:
            for line in path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    self.records[r["key"]] = r
        elif fresh and path.exists():
            path.unlink()

    @staticmethod
    def key(**fields: Any) -> str:
        return json.dumps(fields, sort_keys=True)

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def add(self, record: dict) -> None:
        self.records[record["key"]] = record
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def curve_record(key: str, fields: dict, curve: chargpt.Curve) -> dict:
    final = curve.val[-1] if curve.val and not curve.diverged else math.nan
    return dict(key=key, **fields, steps=curve.steps, val=curve.val, train=curve.train,
                final_val=final, diverged=curve.diverged, seconds=curve.seconds)


# ----------------------------------------------------------------------------- runs
class Bench:
    def __init__(self, args, store: Store):
        self.args = args
        self.store = store
        self.data = chargpt.load_corpus(args.budget)
        self.windows = chargpt.val_windows(self.data, args.context)

    def model(self, family_name: str, seed: int) -> nn.Module:
        a = self.args
        return chargpt.make_model(family_name, len(self.data.vocab), layers=a.layers,
                                  width=a.width, context=a.context, seed=seed)

    def batches(self, seed: int):
        a = self.args
        return chargpt.batch_stream(self.data, a.steps, a.batch_size, a.context, seed)

    def fields(self, model: str, name: str, seed: int, lr: float, settings: dict) -> dict:
        a = self.args
        return dict(model=model, optimizer=name, seed=seed, lr=lr, settings=settings,
                    steps_total=a.steps, batch=a.batch_size, context=a.context,
                    width=a.width, layers=a.layers, budget=a.budget)

    def run_one(self, model: str, name: str, seed: int, lr: float, adamw_lr: float,
                settings: dict | None = None) -> dict:
        settings = settings or {}
        fields = self.fields(model, name, seed, lr, settings)
        key = Store.key(**fields, adamw_lr=None if name in ("AdamW", "SOAP") else adamw_lr)
        if (done := self.store.get(key)) is not None:
            return done
        start = time.perf_counter()
        m = self.model(model, seed)
        batches = self.batches(seed)
        if family(name) == "SINGD":
            tx, capture, T = singd_core(name, m, lr, adamw_lr, settings)
            curve, state = chargpt.train_core(m, tx, capture, T, batches, self.windows,
                                              eval_every=self.args.eval_every)
            state_bytes = chargpt.tree_bytes(state)
        else:
            opts = torch_optimizers(name, m, lr, adamw_lr)
            curve = chargpt.train_torch(m, opts, batches, self.windows,
                                        eval_every=self.args.eval_every)
            state_bytes = sum(chargpt.tree_bytes(list(o.state.values())) for o in opts)
        record = curve_record(key, fields, curve)
        record.update(adamw_lr=adamw_lr, state_bytes=state_bytes, how="single run")
        self.store.add(record)
        print(f"  {model:8s} {name:22s} seed {seed} lr {lr:.3g}: val {record['final_val']:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        return record

    def sweep_lrs(self, model: str, name: str, lrs: list[float], adamw_lr: float,
                  settings: dict | None = None) -> list[dict]:
        """SINGD's lrs on seed 0 in one vmapped run (members not yet stored)."""
        settings = settings or {}
        keys = {lr: Store.key(**self.fields(model, name, 0, lr, settings), adamw_lr=adamw_lr)
                for lr in lrs}
        todo = [lr for lr in lrs if self.store.get(keys[lr]) is None]
        if todo:
            start = time.perf_counter()
            m = self.model(model, 0)
            tx, capture, T = singd_core(name, m, todo[0], adamw_lr, settings)
            curves, state = chargpt.sweep_core(
                m, tx, capture, T, {"singd": sf.grid(lr=todo)}, self.batches(0), self.windows,
                eval_every=self.args.eval_every,
            )
            member_bytes = chargpt.tree_bytes(state.opt_state) // len(todo)
            for lr, curve in zip(todo, curves):
                fields = self.fields(model, name, 0, lr, settings)
                record = curve_record(keys[lr], fields, curve)
                record.update(adamw_lr=adamw_lr, state_bytes=member_bytes,
                              how=f"vmapped sweep of {len(todo)}")
                self.store.add(record)
            print(f"  {model:8s} {name:22s} sweep lr {[f'{x:.3g}' for x in todo]}: "
                  f"{[round(c.val[-1], 4) for c in curves]} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        return [self.store.get(keys[lr]) for lr in lrs]

    def tune(self, model: str, name: str, adamw_lr: float) -> dict:
        """The grid on seed 0, widened at an edge; returns the best record."""
        lrs = list(GRIDS[family(name)])
        if self.args.quick:
            lrs = lrs[1:2]

        def evaluate(values):
            if family(name) == "SINGD":
                return self.sweep_lrs(model, name, values, adamw_lr)
            return [self.run_one(model, name, 0, lr, adamw_lr) for lr in values]

        records = evaluate(lrs)
        for _ in range(0 if self.args.quick else MAX_WIDEN):
            best = min(records, key=score)
            if best["lr"] == min(lrs):
                extra = [min(lrs) / FACTOR]
            elif best["lr"] == max(lrs):
                extra = [max(lrs) * FACTOR]
            else:
                break
            lrs += extra
            records += evaluate(extra)
        return min(records, key=score)


def best_so_far(bench: Bench, model: str, name: str) -> dict:
    """The best seed-0 record of ``name`` so far, or its grid's middle lr (timing only)."""
    recs = [r for r in bench.store.records.values()
            if r.get("model") == model and r.get("optimizer") == name and r["seed"] == 0
            and not r["settings"] and r["steps_total"] == bench.args.steps]
    if recs:
        return min(recs, key=score)
    return {"lr": GRIDS[family(name)][1], "settings": {}}


def score(record: dict) -> float:
    v = record["final_val"]
    return v if v == v else math.inf  # NaN (diverged) last


# --------------------------------------------------------------------------- timing
def time_steps(bench: Bench, model: str, best: dict[str, dict], adamw_lr: float) -> dict:
    """CPU seconds per step (median over rounds), all optimizers interleaved."""
    a = bench.args
    batches = chargpt.batch_stream(bench.data, a.timing_steps, a.batch_size, a.context, 7)
    runners: dict[str, Callable[[], None]] = {}
    sizes: dict[str, Callable[[], int]] = {}
    for name, rec in best.items():
        m = bench.model(model, 0)
        if family(name) == "SINGD":
            tx, capture, T = singd_core(name, m, rec["lr"], adamw_lr, rec["settings"])
            step, plain = sf.make_step(tx, capture)
            params = {k: v.detach().clone() for k, v in m.named_parameters()}
            box = {"params": params, "state": tx.init(params), "t": 0}

            def run(box=box, step=step, plain=plain, T=T):
                for x, y in batches:
                    fn = step if box["t"] % T == 0 else plain
                    box["params"], box["state"], _ = fn(box["params"], box["state"], x, y)
                    box["t"] += 1

            sizes[name] = lambda box=box: chargpt.tree_bytes(box["state"])
        else:
            opts = torch_optimizers(name, m, rec["lr"], adamw_lr)

            def run(m=m, opts=opts):
                for x, y in batches:
                    for o in opts:
                        o.zero_grad()
                    chargpt.loss_fn(m(x), y).backward()
                    for o in opts:
                        o.step()

            sizes[name] = lambda opts=opts: sum(chargpt.tree_bytes(list(o.state.values()))
                                                for o in opts)
        runners[name] = run
    for run in runners.values():  # warm-up round
        run()
    per_step: dict[str, list[float]] = {n: [] for n in runners}
    order = list(runners)
    for r in range(a.timing_rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            start = time.process_time()
            runners[name]()
            per_step[name].append((time.process_time() - start) / len(batches))
    med = {n: statistics.median(v) for n, v in per_step.items()}
    return {n: dict(seconds=med[n], ratio_to_adamw=med[n] / med["AdamW"],
                    spread=[min(v) / med["AdamW"], max(v) / med["AdamW"]], lr=best[n]["lr"],
                    state_bytes=sizes[n]())
            for n, v in per_step.items()}


# --------------------------------------------------------------------------- report
def summarize(bench: Bench, models: list[str], names: list[str]) -> dict:
    out: dict[str, Any] = {"models": {}}
    for model in models:
        entry = out["models"][model] = {"optimizers": {}}
        m = bench.model(model, 0)
        entry["parameters"] = sum(p.numel() for p in m.parameters())
        entry["singd_layers"] = [info.name for info in sf.find_layers(m)]
        for name in names:
            recs = [r for r in bench.store.records.values()
                    if r.get("model") == model and r["optimizer"] == name and not r["settings"]
                    and r["steps_total"] == bench.args.steps]
            grid = sorted((r for r in recs if r["seed"] == 0), key=lambda r: r["lr"])
            if not grid:
                continue
            best = min(grid, key=score)
            seeds = {0: best}
            for r in recs:
                if r["seed"] != 0 and r["lr"] == best["lr"]:
                    seeds[r["seed"]] = r
            entry["optimizers"][name] = dict(
                best_lr=best["lr"],
                grid={f"{r['lr']:.4g}": r["final_val"] for r in grid},
                val={str(s): r["final_val"] for s, r in sorted(seeds.items())},
                curves={str(s): dict(steps=r["steps"], val=r["val"])
                        for s, r in sorted(seeds.items())},
                state_bytes=best["state_bytes"],
            )
    return out


def results_table(result: dict) -> str:
    """One markdown table: per model and optimizer the tuned lr, the validation loss of
    each seed and their mean, the step time as a multiple of AdamW's and the state bytes
    (the README's table is this one, see ``benchmarks/transformer_table.py``)."""
    lines = ["| model | optimizer | best lr | val seed 0 | val seed 1 | mean | step time vs "
             "AdamW | state bytes |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for model, entry in result["models"].items():
        timing = entry.get("timing", {})
        names = [*entry["optimizers"], *(n for n in timing if n not in entry["optimizers"])]
        for name in names:
            # an optimizer timed but not trained yet: its row has the timing only
            o = entry["optimizers"].get(name, {"val": {}, "best_lr": math.nan,
                                               "state_bytes": timing[name]["state_bytes"]})
            v0 = o["val"].get("0", math.nan)
            v1 = o["val"].get("1", math.nan)
            mean = (v0 + v1) / 2
            t = timing.get(name, {}).get("ratio_to_adamw")
            lines.append(
                f"| {model} | {name} | {o['best_lr']:.3g} | {v0:.3f} | {v1:.3f} | {mean:.3f} "
                f"| {'-' if t is None else f'{t:.2f}x'} | {o['state_bytes']:,} |"
            )
    return "\n".join(lines)


def markdown(result: dict) -> str:
    lines = [
        "# Character GPT on the standard library's sources",
        "",
        f"{result['config']}",
        "",
        "Validation loss (mean next-byte cross-entropy, nats) after the last step, at each "
        "optimizer's tuned lr (seed 0 grid; seed 1 at the same lr; nan: not run yet or "
        "diverged). Step time: CPU time per step as a multiple of AdamW's, one interleaved "
        "run, 1 thread, median over rounds (the machine was shared with other jobs: ratios "
        "only). State: bytes of optimizer state.",
        "",
        results_table(result),
        "",
    ]
    for model, entry in result["models"].items():
        lines += [f"## {model}: {entry['parameters']:,} parameters; SINGD layers: "
                  + ", ".join(entry["singd_layers"]), "",
                  "Learning-rate grids (seed 0, final validation loss):", ""]
        for name, o in entry["optimizers"].items():
            grid = ", ".join(f"{lr}: {v:.3f}" for lr, v in o["grid"].items())
            lines.append(f"- {name}: {grid}")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for name, o in result["models"][model]["optimizers"].items():
            for seed, c in o["curves"].items():
                ax.plot(c["steps"], c["val"], linestyle="-" if seed == "0" else ":",
                        label=name if seed == "0" else None,
                        color=f"C{list(result['models'][model]['optimizers']).index(name)}")
        ax.set_title(f"{model}: validation loss (solid seed 0, dotted seed 1)")
        ax.set_xlabel("step")
        ax.set_ylim(top=3.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.transformer_bench",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="nanogpt,stock")
    p.add_argument("--structures", default=",".join(STRUCTURES),
                   help=f"SINGD structures, from {list(STRUCTURES)}")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--budget", type=int, default=chargpt.DEFAULT_BUDGET)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--timing-steps", type=int, default=10)
    p.add_argument("--timing-rounds", type=int, default=5)
    p.add_argument("--no-soap", action="store_true")
    p.add_argument("--optimizers", default=None,
                   help="comma-separated subset to run now (e.g. 'AdamW,Muon'); default all")
    p.add_argument("--timing-only", action="store_true",
                   help="only time every optimizer at its best lr so far (no training)")
    p.add_argument("--timing", action="store_true",
                   help="time the --optimizers subset (and AdamW) too, not only a full run")
    p.add_argument("--fallback-lr", type=float, default=3e-3,
                   help="AdamW lr of the parameters SINGD and Muon do not handle")
    p.add_argument("--quick", action="store_true", help="one lr per optimizer, 20 steps")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the jsonl without running anything")
    p.add_argument("--fresh", action="store_true", help="ignore the jsonl of earlier runs")
    p.add_argument("--out", default=str(RESULTS / "transformer_bench"))
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.structures = [s for s in args.structures.split(",") if s]
    for s in args.structures:
        if s not in STRUCTURES:
            p.error(f"--structures: unknown {s!r}; valid: {list(STRUCTURES)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.optimizers is not None:
        args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if args.quick:
        args.steps, args.eval_every, args.timing_steps, args.timing_rounds = 20, 10, 5, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    store = Store(out.with_suffix(".jsonl"), args.fresh)
    bench = Bench(args, store)
    names = optimizer_names(args)
    if args.report_only:
        report(bench, args, names)
        return 0
    if args.timing_only:
        for model in args.models:
            best = {name: best_so_far(bench, model, name) for name in names}
            key = Store.key(timing=model, steps_total=args.steps,
                            best={n: r["lr"] for n, r in best.items()})
            store.add(dict(key=key, timing=model, steps_total=args.steps,
                           result=time_steps(bench, model, best, args.fallback_lr)))
        report(bench, args, names)
        return 0
    for model in args.models:
        print(f"{model}: tuning lr on seed 0", flush=True)
        adamw_lr = args.fallback_lr
        best = {name: bench.tune(model, name, adamw_lr) for name in selected(args, names)}
        for seed in args.seeds:
            if seed == 0:
                continue
            for name, rec in best.items():
                bench.run_one(model, name, seed, rec["lr"], adamw_lr)
        if set(best) != set(names) and not args.timing:
            continue  # timing only in a run with every optimizer (the others are cached)
        if "AdamW" not in best:  # the reference of the ratios
            best = {"AdamW": bench.tune(model, "AdamW", adamw_lr), **best}
        key = Store.key(timing=model, steps_total=args.steps, best={n: r["lr"] for n, r in
                                                                   best.items()})
        if store.get(key) is None:
            print(f"{model}: timing", flush=True)
            store.add(dict(key=key, timing=model, steps_total=args.steps,
                           result=time_steps(bench, model, best, adamw_lr)))
    report(bench, args, names)
    return 0


def report(bench: Bench, args, names: list[str]) -> None:
    """The .json, .md and .png from the jsonl (what every finished run recorded)."""
    out = Path(args.out)
    models = [m for m in args.models
              if any(r.get("model") == m for r in bench.store.records.values())]
    result = summarize(bench, models, names)
    for model in models:
        timing = [r for r in bench.store.records.values()
                  if r.get("timing") == model and r["steps_total"] == args.steps]
        result["models"][model]["timing"] = timing[-1]["result"] if timing else {}
    d = bench.data
    result["config"] = (
        f"{len(d.train):,} training / {len(d.val):,} validation bytes of "
        f"{d.files} standard-library files (Python {platform.python_version()}), vocabulary "
        f"{len(d.vocab)}; {args.layers} blocks, width {args.width}, 4 heads, context "
        f"{args.context}, batch {args.batch_size}, {args.steps} steps, constant lr; "
        f"torch {torch.__version__}, 1 thread"
    )
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    sys.exit(main())

"""Profiles of our pure core's steps: ``python -m benchmarks.profile [--model mlp] [S ...]``.

For each structure S, after a warm-up cycle, one T-cycle of the core (capture +
update on the first step, plain gradient + update on the others) runs under
``torch.profiler`` (operators by self CPU time) and then under ``cProfile`` (Python
functions by own time, which shows dispatch overhead). Both tables go to
``benchmarks/results/profile_<model>_<method>_<S>_T<T>.txt``; the return value holds the
top lines for the JSON report.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

import torch

from . import models
from .contenders import Config, Core

RESULTS = Path(__file__).resolve().parent / "results"


def profile_core(model: str, structure: str, method: str = "singd", T: int = 10,
                 out_dir: Path = RESULTS, top: int = 15) -> dict:
    batches = models.batches(model, 8)
    c = Core(Config("core", model, T, structure, method))

    def cycle():
        for _ in range(T):
            c.step(*batches[c.steps % len(batches)])

    for _ in range(min(2, T)):  # warm-up: an update step and a plain step
        c.step(*batches[c.steps % len(batches)])
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        cycle()
    wall_ms = (time.perf_counter() - t0) * 1e3
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    pr = cProfile.Profile()
    pr.enable()
    cycle()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    py = buf.getvalue()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"profile_{model}_{method}_{structure}_T{T}.txt"
    path.write_text(
        f"core {method} {structure} on {models.SPECS[model].description}, T={T}, "
        f"1 thread; one T-cycle under torch.profiler took {wall_ms:.1f} ms\n\n"
        f"== operators by self CPU time ==\n{ops}\n\n== Python functions by own time ==\n{py}"
    )
    op_lines = ops.splitlines()
    return {"path": str(path), "cycle_ms_under_profiler": wall_ms,
            "top_ops": op_lines[:min(len(op_lines), top + 4)]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    p.add_argument("structures", nargs="*", default=[
        "dense", "diagonal", "block30diagonal", "hierarchical15_15", "triltoeplitz"])
    p.add_argument("--model", default="mlp", choices=list(models.SPECS))
    p.add_argument("--method", default="singd", choices=["singd", "ikfac"])
    p.add_argument("-T", type=int, default=10)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    for s in args.structures:
        r = profile_core(args.model, s, args.method, args.T, top=args.top)
        print("\n".join(r["top_ops"]))
        print(f"-> {r['path']}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

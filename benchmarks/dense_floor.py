"""The arithmetic floor of the dense targets: the GEMMs of a T-cycle alone.

Issue 14 asks dense SINGD on the MLP 784-512-512-10 (batch 128) for <= 0.6x the official
package at T = 10 and <= 1.0x at T = 1. Both optimizers precondition the gradient in
``.grad`` (no per-sample factors on plain steps), so each T-cycle has a fixed list of
matrix products; this script times those products alone (random operands of the same
shapes, the same thread), and the forward + backward pass, interleaved round-robin with
both optimizers' real steps, and reports

* the GEMM floor: (T fwd+bwd + our products) / (T fwd+bwd + the official products),
  what any implementation of either list reaches with nothing else in its step;
* our floor against the official as it is: (T fwd+bwd + our products) / the official
  package's measured T-cycle;
* the measured ratio, our drop-in / the official.

Per layer (d_K, d_C) and statistics step, each factor K [d, d] with U [d, B]: V = K^T U,
H = V V^T, K^T K, K m_K (the products of both); ours also builds the cache K K^T when
T > 1 (``structures._base._symmetric_product`` for the symmetric ones, as the dense
structure does). The preconditioned gradient C C^T G K K^T is 2 products with the cache
(ours, T > 1) and 4 without (the official, every step; ours at T = 1).

The same for two ``Linear(d, d)`` at T = 10 (issue 14's widths target, dense <= 0.7x from
d = 512). ``python -m benchmarks.dense_floor [--budget 60] [--widths 512 1024]`` writes
``results/dense_floor.md``.
"""

from __future__ import annotations

import argparse
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from singd_functional.structures._base import _symmetric_product

from . import contenders as ct
from . import models, timing
from .contenders import Config

# (d_K, d_C) of each Linear ([W | b]); batch 128 in both
LAYERS = {"mlp": ((785, 512), (513, 512), (513, 10)),
          **{f"wide{d}": ((d + 1, d), (d + 1, d)) for d in models.WIDTHS}}
BATCH = 128
RESULTS = Path(__file__).parent / "results"


def _factor(d: int, gen) -> dict:
    return {"K": torch.randn(d, d, generator=gen) / d**0.5,
            "m": torch.randn(d, d, generator=gen) / d,
            "U": torch.randn(d, BATCH, generator=gen)}


def gemm_cycle(model: str, T: int, ours: bool) -> Callable[[], None]:
    """One T-cycle's products of ours (``ours``) or of the official package."""
    gen = torch.Generator().manual_seed(0)
    sides = [(_factor(dK, gen), _factor(dC, gen), torch.randn(dC, dK, generator=gen))
             for dK, dC in LAYERS[model]]
    cache = ours and T > 1
    sym = _symmetric_product if ours else torch.matmul

    def statistics(f):
        K = f["K"]
        V = K.mT @ f["U"]
        sym(V, V.mT)
        sym(K.mT, K)
        K @ f["m"]
        if cache:
            f["P"] = sym(K, K.mT)

    def precondition(F_K, F_C, G):
        if cache:  # (G P_K) first, then P_C (.), as Dense.matmat_right and natural_gradient
            GP = G @ F_K["P"] if G.shape[0] < 64 else (F_K["P"].mT @ G.mT).mT
            return F_C["P"] @ GP
        K, C = F_K["K"], F_C["K"]
        return C @ (C.mT @ ((G @ K) @ K.mT))

    def cycle():
        for t in range(T):
            for F_K, F_C, G in sides:
                if t == 0:
                    statistics(F_K)
                    statistics(F_C)
                precondition(F_K, F_C, G)

    return cycle


def measure(model: str, T: int, budget_s: float, seed: int = 0) -> dict:
    """Median CPU and wall ms per T-cycle of each program, interleaved round-robin."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fb = ct.make(Config("fwd+bwd", model, T))
        official = ct.make(Config("official", model, T, "dense", "singd"))
        adapter = ct.make(Config("adapter", model, T, "dense", "singd"))
    data = models.batches(model, 4)

    def steps(c):
        def run():
            for _ in range(T):
                c.step(*data[c.steps % len(data)])
        return run

    programs = {"fwd+bwd": steps(fb), "ours GEMMs": gemm_cycle(model, T, True),
                "official GEMMs": gemm_cycle(model, T, False), "official": steps(official),
                "adapter": steps(adapter)}
    cpu: dict[str, list[float]] = {k: [] for k in programs}
    wall: dict[str, list[float]] = {k: [] for k in programs}
    rng = random.Random(seed)
    load_before = timing.load_average()
    for run in programs.values():  # warm-up
        run()
    start, rounds = time.perf_counter(), 0
    while rounds < 3 or time.perf_counter() - start < budget_s:
        order = list(programs)
        rng.shuffle(order)
        for k in order:
            c0, t0 = time.thread_time(), time.perf_counter()
            programs[k]()
            cpu[k].append((time.thread_time() - c0) * 1e3)
            wall[k].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    med = {k: timing.quantiles(v)[1] for k, v in cpu.items()}
    return {"model": model, "T": T, "rounds": rounds, "load": [load_before, timing.load_average()],
            "cpu_ms": med, "wall_ms": {k: timing.quantiles(v)[1] for k, v in wall.items()},
            "floor": (med["fwd+bwd"] + med["ours GEMMs"])
            / (med["fwd+bwd"] + med["official GEMMs"]),
            "floor_vs_official": (med["fwd+bwd"] + med["ours GEMMs"]) / med["official"],
            "measured": med["adapter"] / med["official"]}


def report(results: list[dict]) -> list[str]:
    L = ["# Dense floor: the GEMMs of a T-cycle alone", "",
         "Made by `python -m benchmarks.dense_floor` (see its docstring); 1 thread, thread "
         "CPU time, medians of an interleaved run; ms per T-cycle.", "",
         "| model | T | fwd+bwd | ours GEMMs | official GEMMs | official step | drop-in step | "
         "GEMM floor | our floor / official | measured drop-in / official | rounds | load |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["cpu_ms"]
        L.append(f"| {models.SPECS[r['model']].description} | {r['T']} | {m['fwd+bwd']:.1f} | {m['ours GEMMs']:.1f} | "
                 f"{m['official GEMMs']:.1f} | {m['official']:.1f} | {m['adapter']:.1f} | "
                 f"{r['floor']:.3f} | {r['floor_vs_official']:.3f} | {r['measured']:.3f} | "
                 f"{r['rounds']} | {r['load'][0]} -> {r['load'][1]} |")
    return L


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dense_floor", description=__doc__)
    p.add_argument("--budget", type=float, default=60.0, help="seconds per T")
    p.add_argument("-T", nargs="+", type=int, default=[10, 1], help="with the MLP")
    p.add_argument("--widths", nargs="*", type=int, default=[512], choices=models.WIDTHS,
                   help="two Linear(d, d) at T = 10 (the widths target), after the MLP")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    results = [measure("mlp", T, args.budget * (1.0 if T > 1 else 0.5)) for T in args.T]
    results += [measure(f"wide{d}", 10, args.budget) for d in args.widths]
    lines = report(results)
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dense_floor.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'dense_floor.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

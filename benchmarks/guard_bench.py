"""What skipping non-finite steps costs: guarded vs plain steps, interleaved, 1 thread.

Contenders per structure, on the MLP 784-512-512-10 (batch 128, float32, T=10):

* pure face: ``singd(...)`` vs ``skip_nonfinite(singd(...))``, the update alone
  (``tx.update`` + ``apply_updates`` on precomputed gradients and captures) and the
  whole step (capture + update + apply);
* drop-in face: ``SINGD`` with the guard on (the default) vs off (``opt._guard =
  False``, the unguarded step), the whole step (zero_grad, forward, backward, step).

Every round runs one T-cycle (one statistics step, T - 1 plain steps) of every
contender in a fresh random order; the figures are medians of the per-step thread CPU
times (blind to waiting for a core on a loaded machine; wall-clock medians beside
them), the ratio guarded / plain of the medians, and the median of per-round paired
ratios of the mean step (so the statistics step is in it once per round).

    python -m benchmarks.guard_bench --rounds 20 --structures dense diagonal

``--baseline-rev REV`` adds the drop-in face of the package at git revision ``REV``
(guard on and off) to the same rounds: the before / after of a change to the guard,
measured in one interleaved run.
"""

from __future__ import annotations

import argparse
import importlib
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import singd_functional as sf


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


def _batches(n: int, batch: int = 128):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


def _pure(structure: str, guarded: bool, whole: bool, T: int, data):
    model = _model()
    layers = sf.find_layers(model)
    tx = sf.singd(layers, lr=1e-3, lr_cov=1e-2, structures=(structure, structure))
    if guarded:
        tx = sf.skip_nonfinite(tx)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    capture = sf.make_capture(model, F.cross_entropy, layers)
    box = {"params": params, "state": tx.init(params), "t": 0}
    x0, y0 = data[0]
    _, grads0, caps0 = capture(params, x0, y0)

    def step():
        t = box["t"]
        due = t % T == 0
        if whole:
            x, y = data[t % len(data)]
            _, grads, caps = capture(box["params"], x, y, record_layers=due)
        else:
            grads, caps = grads0, caps0
        updates, box["state"] = tx.update(grads, box["state"], box["params"],
                                          captures=caps if due else None)
        box["params"] = sf.apply_updates(box["params"], updates)
        box["t"] = t + 1

    return step


def _dropin(structure: str, guarded: bool, T: int, data, package=sf):
    model = _model()
    opt = package.SINGD(model, lr=1e-3, lr_cov=1e-2, T=T, structures=(structure, structure))
    if not guarded:
        if not hasattr(opt, "_guard"):
            raise RuntimeError("this SINGD has no unguarded step (opt._guard) to compare to")
        opt._guard = False
    box = {"t": 0}

    def step():
        x, y = data[box["t"] % len(data)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        box["t"] += 1

    return step


def run(structures, rounds: int, T: int, faces, baseline=None) -> list[dict]:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    data = _batches(T)
    rows = []
    for structure in structures:
        contenders = {}
        if "pure" in faces:
            for whole in (False, True):
                what = "pure step" if whole else "pure update"
                contenders[(what, False)] = _pure(structure, False, whole, T, data)
                contenders[(what, True)] = _pure(structure, True, whole, T, data)
        if "dropin" in faces:
            contenders[("drop-in step", False)] = _dropin(structure, False, T, data)
            contenders[("drop-in step", True)] = _dropin(structure, True, T, data)
        if "dropin" in faces and baseline is not None:
            for g in (False, True):
                contenders[("drop-in step (baseline)", g)] = _dropin(structure, g, T, data,
                                                                     baseline)
        times: dict = {k: [] for k in contenders}
        cpu: dict = {k: [] for k in contenders}
        per_round: dict = {k: [] for k in contenders}
        for step in contenders.values():  # warm-up: one statistics and one plain step
            for _ in range(T):
                step()
        order = list(contenders)
        for _ in range(rounds):
            random.shuffle(order)
            for key in order:
                cycle, cycle_cpu = [], []
                for _ in range(T):
                    start, start_cpu = time.perf_counter(), time.thread_time()
                    contenders[key]()
                    cycle_cpu.append(time.thread_time() - start_cpu)
                    cycle.append(time.perf_counter() - start)
                times[key] += cycle
                cpu[key] += cycle_cpu
                per_round[key].append(sum(cycle_cpu) / T)
        for what in dict.fromkeys(k[0] for k in contenders):
            plain, guarded = (statistics.median(times[(what, g)]) * 1e3 for g in (False, True))
            plain_cpu, guarded_cpu = (statistics.median(cpu[(what, g)]) * 1e3
                                      for g in (False, True))
            paired = [g / p for p, g in zip(per_round[(what, False)], per_round[(what, True)])]
            q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
            rows.append(dict(structure=structure, what=what, plain_ms=plain, guarded_ms=guarded,
                             plain_cpu_ms=plain_cpu, guarded_cpu_ms=guarded_cpu,
                             ratio=guarded / plain, ratio_cpu=guarded_cpu / plain_cpu,
                             paired_median=statistics.median(paired),
                             paired_q25=q[0], paired_q75=q[2]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--structures", nargs="+", default=["dense", "diagonal", "block30diagonal"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--T", type=int, default=10)
    parser.add_argument("--faces", nargs="+", default=["pure", "dropin"])
    parser.add_argument("--baseline-rev", default=None,
                        help="also time the drop-in face at this git revision")
    args = parser.parse_args()
    if args.baseline_rev is None:
        rows = run(args.structures, args.rounds, args.T, args.faces)
    else:
        from .structures_bench import load_baseline

        with tempfile.TemporaryDirectory() as tmp:
            baseline = importlib.import_module(load_baseline(args.baseline_rev, Path(tmp)))
            rows = run(args.structures, args.rounds, args.T, args.faces, baseline)
    print("| structure | what | plain CPU ms | guarded CPU ms | CPU ratio | paired CPU ratio "
          "(q25-q75) | wall plain / guarded ms | wall ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['structure']} | {r['what']} | {r['plain_cpu_ms']:.2f} | "
              f"{r['guarded_cpu_ms']:.2f} | {r['ratio_cpu']:.3f} | {r['paired_median']:.3f} "
              f"({r['paired_q25']:.3f}-{r['paired_q75']:.3f}) | {r['plain_ms']:.2f} / "
              f"{r['guarded_ms']:.2f} | {r['ratio']:.3f} |")


if __name__ == "__main__":
    main()

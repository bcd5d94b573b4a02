"""How much of the core's CNN step the convolution statistics take.

For each structure, on the small CNN with SINGD and T = 10, the medians over
interleaved repetitions of: the update step (capture + update + apply), the plain
step (gradient + update + apply), the conv layers' ``layer_statistics`` (unfolded
patches -> a-rows, g-rows -> H_K, H_C), the conv layers' ``layer_rows`` alone (the
unfold and reshapes), and every layer's statistics. Nothing is written back: the pure
functions are called on the same state each time.

``python -m benchmarks.conv_stats [--reps N] [structure ...]`` also times the same
steps with the statistics as they were before issue 14 (:func:`legacy`:
``F.unfold`` patches, [R, d] rows, every structure's ``project_inner``), interleaved
with today's in one process, and prints both and their ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import time

import torch
import torch.nn.functional as F

from singd_functional import layers as _layers
from singd_functional import statistics as _statistics
from singd_functional.statistics import layer_rows, layer_statistics

from . import models
from .contenders import Config, Core
from .timing import quantiles

KEYS = ("update", "plain", "conv_stats", "conv_rows", "all_stats")
STRUCTURES = ["dense", "diagonal", "block30diagonal", "hierarchical15_15", "triltoeplitz"]


def _work(structure: str) -> dict:
    """The timed functions of one structure (see the module docstring)."""
    x, y = models.batches("cnn", 1)[0]
    c = Core(Config("core", "cnn", 10, structure, "singd"))
    for _ in range(2):  # warm-up: an update step and a plain step
        c.step(x, y)
    _, _, caps = c.capture(c.params, x, y)
    convs = [info for info in c.layers if info.kind == "conv2d"]
    loss_average = models.SPECS["cnn"].loss_average

    def update_step():
        _, grads, captures = c.capture(c.params, x, y)
        c._update_apply(grads, c.state, c.params, captures)

    def plain_step():
        c._plain_apply(c.grad(c.params, x, y), c.state, c.params)

    def stats(layers):
        for info in layers:
            K, C = c.state.factors[info.name]
            layer_statistics(info, K, C, caps[info.name], loss_average=loss_average)

    return {
        "update": update_step,
        "plain": plain_step,
        "conv_stats": lambda: stats(convs),
        "conv_rows": lambda: [layer_rows(i, caps[i.name], "expand") for i in convs],
        "all_stats": lambda: stats(c.layers),
        "conv_layers": [(i.name, i.d_K, i.d_C) for i in convs],
    }


def _row(structure: str, times: dict[str, list[float]], conv_layers) -> dict:
    med = {k: quantiles(v)[1] for k, v in times.items()}
    # the spread: quartiles of the per-repetition shares (both timed in the same repetition)
    share_q = quantiles([a / b for a, b in zip(times["conv_stats"], times["update"])])
    amortized = (med["update"] + 9 * med["plain"]) / 10
    return {
        "structure": structure,
        **{f"{k}_ms": v for k, v in med.items()},
        "amortized_ms": amortized,
        "conv_stats_of_update": med["conv_stats"] / med["update"],
        "conv_stats_of_update_spread": [share_q[0], share_q[2]],
        "conv_rows_of_update": med["conv_rows"] / med["update"],
        "conv_stats_of_amortized": med["conv_stats"] / (10 * amortized),
        "conv_layers": conv_layers,
    }


def _time(fn) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) * 1e-6


def _times(fn) -> tuple[float, float]:
    """(wall ms, thread CPU ms) of one call; the CPU time is blind to waiting for a core."""
    t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
    fn()
    return (time.perf_counter_ns() - t0) * 1e-6, (time.thread_time_ns() - c0) * 1e-6


def _measure_one(structure: str, reps: int) -> dict:
    work = _work(structure)
    times: dict[str, list[float]] = {k: [] for k in KEYS}
    for _ in range(reps):
        for key in KEYS:
            times[key].append(_time(work[key]))
    return _row(structure, times, work["conv_layers"])


def share(structures: list[str], reps: int = 5) -> list[dict]:
    """One row per structure (see the module docstring)."""
    return [_measure_one(s, reps) for s in structures]


# ------------------------------------------------- the statistics before issue 14
def legacy_patches(info, x):
    """The patches as main built them before issue 14 (``F.unfold``); also the
    reference of tests/test_conv_statistics.py."""
    if info.kind == "conv1d":
        x = x.unsqueeze(-2)
    if info.groups > 1:
        n, ch = x.shape[0], x.shape[1]
        x = x.reshape(n, info.groups, ch // info.groups, *x.shape[2:]).mean(1)
    top, bottom, left, right = info.padding
    padding = (top, left)
    if info.padding_mode != "zeros" or top != bottom or left != right:
        mode = "constant" if info.padding_mode == "zeros" else info.padding_mode
        x = F.pad(x, (left, right, top, bottom), mode=mode)
        padding = (0, 0)
    return F.unfold(x, info.kernel_size, dilation=info.dilation, padding=padding,
                    stride=info.stride)


def _legacy_sum_of_squares(M, rows, bias=False):
    N, S, d = rows.shape
    flat = rows.reshape(N * S, d)
    if bias:
        flat = torch.cat([flat, flat.new_ones(N * S, 1)], 1)
    if flat.shape[0] == 0:
        return M.map(torch.zeros_like)
    return M.project_inner(flat.to(M.dtype).mT)


@contextlib.contextmanager
def legacy():
    """The statistics of main before issue 14 (98181fd): ``F.unfold`` patches, rows
    copied to [R, d] (with the bias column), ``project_inner`` for every structure."""
    saved = (_layers._patches, _statistics._sum_of_squares)
    _layers._patches = legacy_patches
    _statistics._sum_of_squares = _legacy_sum_of_squares
    try:
        yield
    finally:
        _layers._patches, _statistics._sum_of_squares = saved


def compare(structures: list[str], reps: int = 10, seed: int = 0) -> list[dict]:
    """Per structure, today's and the legacy statistics interleaved: in every round
    each of (update step, conv stats) x (legacy, today) runs once, in shuffled order.
    Medians of wall and thread CPU time, and the paired today / legacy ratios."""
    rng = random.Random(seed)
    out = []
    for structure in structures:
        work = _work(structure)
        keys = ("update", "conv_stats")
        wall = {v: {k: [] for k in keys} for v in ("legacy", "today")}
        cpu = {v: {k: [] for k in keys} for v in ("legacy", "today")}
        for _ in range(reps):
            jobs = [(v, k) for v in wall for k in keys]
            rng.shuffle(jobs)
            for version, key in jobs:
                with legacy() if version == "legacy" else contextlib.nullcontext():
                    w, c = _times(work[key])
                wall[version][key].append(w)
                cpu[version][key].append(c)
        row: dict = {"structure": structure, "reps": reps}
        for clock, t in (("wall", wall), ("cpu", cpu)):
            med = {v: {k: quantiles(x)[1] for k, x in ks.items()} for v, ks in t.items()}
            row.update({f"{clock}_{v}_{k}_ms": med[v][k] for v in med for k in keys})
            row.update({f"{clock}_{v}_share": med[v]["conv_stats"] / med[v]["update"]
                        for v in med})
            for k in keys:
                row[f"{clock}_{k}_today_over_legacy"] = quantiles(
                    [n / o for n, o in zip(t["today"][k], t["legacy"][k])])
        out.append(row)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("structures", nargs="*", default=STRUCTURES)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    print("Wall clock (thread CPU time in brackets), medians of interleaved rounds; "
          "today / legacy: median (IQR) of the paired ratios.\n")
    print("| structure | conv stats ms legacy / today | update step ms legacy / today | "
          "conv stats / update step legacy / today | conv stats today / legacy | "
          "update step today / legacy |")
    print("|---|---|---|---|---|---|")

    def pair(r, clock, key):
        q = r[f"{clock}_{key}_today_over_legacy"]
        return f"{q[1]:.3f} ({q[0]:.3f}-{q[2]:.3f})"

    for r in compare(args.structures, args.reps):
        cells = []
        for what in ("conv_stats_ms", "update_ms", "share"):
            fmt = "{:.3f}" if what == "share" else "{:.1f}"
            cells.append(" / ".join(fmt.format(r[f"wall_{v}_{what}"]) for v in ("legacy", "today"))
                         + " [" + " / ".join(fmt.format(r[f"cpu_{v}_{what}"])
                                             for v in ("legacy", "today")) + "]")
        for key in ("conv_stats", "update"):
            cells.append(f"{pair(r, 'wall', key)} [{pair(r, 'cpu', key)}]")
        print(f"| {r['structure']} (n={r['reps']}) | " + " | ".join(cells) + " |", flush=True)

if __name__ == "__main__":
    main()

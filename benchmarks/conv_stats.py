"""How much of the core's CNN step the convolution statistics take.

For each structure, on the small CNN with SINGD and T = 10, the medians over
interleaved repetitions of: the update step (capture + update + apply), the plain
step (gradient + update + apply), the conv layers' ``layer_statistics`` (unfolded
patches -> a-rows, g-rows -> H_K, H_C), the conv layers' ``layer_rows`` alone (the
unfold and reshapes), and every layer's statistics. Nothing is written back: the pure
functions are called on the same state each time.
"""

from __future__ import annotations

import time

from singd_functional.statistics import layer_rows, layer_statistics

from . import models
from .contenders import Config, Core
from .timing import quantiles

KEYS = ("update", "plain", "conv_stats", "conv_rows", "all_stats")


def _measure_one(structure: str, reps: int) -> dict:
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

    work = {
        "update": update_step,
        "plain": plain_step,
        "conv_stats": lambda: stats(convs),
        "conv_rows": lambda: [layer_rows(i, caps[i.name], "expand") for i in convs],
        "all_stats": lambda: stats(c.layers),
    }
    times: dict[str, list[float]] = {k: [] for k in KEYS}
    for _ in range(reps):
        for key in KEYS:
            t0 = time.perf_counter_ns()
            work[key]()
            times[key].append((time.perf_counter_ns() - t0) * 1e-6)
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
        "conv_layers": [(i.name, i.d_K, i.d_C) for i in convs],
    }


def share(structures: list[str], reps: int = 5) -> list[dict]:
    """One row per structure (see the module docstring)."""
    return [_measure_one(s, reps) for s in structures]

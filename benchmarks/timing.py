"""Interleaved round-robin timing of several contenders in one process.

One *group* is a set of contenders on the same model with the same T. After a
warm-up (one statistics-update step and one plain step each), every round visits every
contender once, in a freshly shuffled order, and runs T consecutive steps on it (a
whole T-cycle: exactly one statistics-update step and T - 1 plain steps, in some
rotation), timing each step.
Slow contenders (the official package's Toeplitz, ~430x an SGD step) instead run a
single step in each of their first few rounds; their amortized time is then estimated
from the update-step and plain-step medians.

Because all contenders share every round, slow drifts of the machine (other processes
on the 2 shared cores) hit them alike; the per-round *paired* ratios show the spread.
"""

from __future__ import annotations

import gc
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .contenders import Contender


@dataclass
class Record:
    """Raw timings of one contender (milliseconds)."""

    cycles: dict[int, float] = field(default_factory=dict)  # round -> amortized ms/step
    update_steps: list[float] = field(default_factory=list)
    plain_steps: list[float] = field(default_factory=list)
    # the same in thread CPU time: blind to time spent waiting for a core
    cpu_cycles: dict[int, float] = field(default_factory=dict)
    cpu_update_steps: list[float] = field(default_factory=list)
    cpu_plain_steps: list[float] = field(default_factory=list)
    steps: int = 0


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    """(q25, median, q75) of ``xs`` (nan when empty)."""
    if not xs:
        return (float("nan"),) * 3
    if len(xs) == 1:
        return (xs[0],) * 3
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on POSIX
        return None


def run_group(
    contenders: list[Contender],
    batches: list,
    *,
    budget_s: float,
    min_rounds: int,
    max_rounds: int,
    slow_steps: dict[int, int],
    tick: Callable[[float, str], None] = lambda dt, msg: None,
    seed: int = 0,
) -> tuple[dict[int, Record], dict]:
    """Time ``contenders`` (indexed by position) round-robin.

    Args:
        batches: the step with index i (per contender) uses ``batches[i % len]``.
        budget_s: stop starting new rounds after this many seconds (once
            ``min_rounds`` are done); never more than ``max_rounds``.
        slow_steps: contender index -> number of single steps it runs in total
            (one per round, no warm-up); the others run whole T-cycles.
        tick: progress callback(seconds spent, message).

    Returns:
        ``(records, info)``: per contender index its :class:`Record`; ``info`` has
        the number of rounds, the seconds spent and the load average before/after.
    """
    rng = random.Random(seed)
    records = {i: Record() for i in range(len(contenders))}
    live = [i for i, c in enumerate(contenders) if c.failed is None]
    info = {"load_before": load_average()}

    def one_step(c: Contender, rec: Record | None) -> tuple[float, float]:
        x, y = batches[c.steps % len(batches)]
        update = c.next_is_update()
        c0 = time.thread_time_ns()
        t0 = time.perf_counter_ns()
        c.step(x, y)
        ms = (time.perf_counter_ns() - t0) * 1e-6
        cpu = (time.thread_time_ns() - c0) * 1e-6
        if rec is not None:
            (rec.update_steps if update else rec.plain_steps).append(ms)
            (rec.cpu_update_steps if update else rec.cpu_plain_steps).append(cpu)
            rec.steps += 1
        return ms, cpu

    def cycle(i: int, rnd: int | None) -> None:
        c = contenders[i]
        rec = None if rnd is None else records[i]
        t0 = time.perf_counter()
        try:
            if i in slow_steps:
                if rec is not None and rec.steps < slow_steps[i]:
                    one_step(c, rec)
            else:
                wall = cpu = 0.0
                for _ in range(c.cfg.T):
                    w, u = one_step(c, rec)
                    wall, cpu = wall + w, cpu + u
                if rec is not None:
                    rec.cycles[rnd] = wall / c.cfg.T
                    rec.cpu_cycles[rnd] = cpu / c.cfg.T
        except Exception as err:  # a contender that crashes mid-run is reported, not fatal
            c.failed = f"step {c.steps}: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
            live.remove(i)
        tick(time.perf_counter() - t0, c.cfg.label)

    def warm_up(i: int) -> None:
        c = contenders[i]
        t0 = time.perf_counter()
        try:
            for _ in range(min(2, max(1, c.cfg.T))):
                one_step(c, None)
        except Exception as err:
            c.failed = f"warm-up: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
            live.remove(i)
        tick(time.perf_counter() - t0, c.cfg.label)

    gc.collect()
    gc.disable()
    try:
        order = list(live)
        rng.shuffle(order)
        for i in order:  # warm-up: an update step and a plain step (slow ones: none)
            if i not in slow_steps and i in live:
                warm_up(i)
        start = time.perf_counter()
        rnd = 0
        while rnd < max_rounds and (rnd < min_rounds or time.perf_counter() - start < budget_s):
            order = list(live)
            rng.shuffle(order)
            for i in order:
                if i in live:
                    cycle(i, rnd)
            gc.collect()
            rnd += 1
    finally:
        gc.enable()
    info.update(rounds=rnd, seconds=round(time.perf_counter() - start, 1),
                load_after=load_average())
    return records, info


def _estimate(update: list[float], plain: list[float], T: int) -> float:
    """(update + (T - 1) plain) / T from the medians (one kind may be missing)."""
    u, p = quantiles(update)[1], quantiles(plain)[1]
    if not plain:
        p = u
    if not update:
        u = p
    return (u + (T - 1) * p) / T


def summarize(rec: Record, T: int, slow: bool) -> dict:
    """Medians and spread of one record (ms per step; ``cpu_``: thread CPU time)."""
    out = {
        "steps": rec.steps,
        "update_ms": quantiles(rec.update_steps)[1],
        "plain_ms": quantiles(rec.plain_steps)[1],
        "estimated": slow,
    }
    if slow:
        out.update(amortized_ms=_estimate(rec.update_steps, rec.plain_steps, T),
                   cpu_amortized_ms=_estimate(rec.cpu_update_steps, rec.cpu_plain_steps, T),
                   q25_ms=None, q75_ms=None, cycles=0)
    else:
        q = quantiles(list(rec.cycles.values()))
        out.update(amortized_ms=q[1], q25_ms=q[0], q75_ms=q[2], cycles=len(rec.cycles),
                   cpu_amortized_ms=quantiles(list(rec.cpu_cycles.values()))[1])
    return out


def paired_ratio(a: Record, b: Record) -> dict | None:
    """Median and IQR of the per-round ratios a/b (rounds both timed as whole cycles)."""
    common = sorted(set(a.cycles) & set(b.cycles))
    if not common:
        return None
    q = quantiles([a.cycles[r] / b.cycles[r] for r in common])
    return {"q25": q[0], "median": q[1], "q75": q[2], "rounds": len(common)}

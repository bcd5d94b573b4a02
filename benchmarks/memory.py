"""Peak resident-memory growth per step, measured in a child process.

``python -m benchmarks.memory '<json list of [kind, model, structure, method(, T(, steps))]>'``
prints one JSON list. The parent (``benchmarks.run``) starts it with glibc's mmap
threshold fixed low (``MALLOC_MMAP_THRESHOLD_``) and one malloc arena
(``MALLOC_ARENA_MAX=1``: the sampler thread's allocations land where the step's do), so
that every tensor larger than 64 KiB is its own mapping and is returned to the OS when
freed: the resident set size then follows the live tensors, and its peak during a step
is the step's working memory above the optimizer state (repeatable to ~0.1 MiB). The
child runs each contender with its T (default 10, issue 14's table) for two untimed
warm-up steps, then ``steps`` steps (default :func:`default_steps`: one T-cycle, at
least two steps; for T = 10 steps 2..11, i.e. the statistics step 10 and nine plain
ones) in which a thread samples the RSS every ~0.2 ms; per kind of step (``statistics``
update, ``plain``) the largest peak is reported, and every sample beside it.

Doing this in the timing process would slow every allocation there (one mmap each),
hence the separate process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

MMAP_THRESHOLD = 65536
WARMUP = 2  # untimed steps before the sampled ones (they build lazily created state)
STEP_KINDS = ("statistics", "plain")  # the keys of a row: f"{kind}_peak_bytes", ..._samples


def default_steps(T: int) -> int:
    """Sampled steps of a contender at T: one T-cycle (one statistics step and T - 1 plain
    ones after the warm-up), at least two."""
    return max(T, 2)


def _rss_reader():
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    try:
        fd = os.open("/proc/self/statm", os.O_RDONLY)

        def read() -> int:
            return int(os.pread(fd, 64, 0).split()[1]) * page

        read()
        return read
    except OSError:  # not Linux: psutil, slower but portable
        import psutil

        proc = psutil.Process()
        return lambda: proc.memory_info().rss


class PeakSampler:
    """Samples the RSS in a thread while active; ``peak`` is the largest sample."""

    def __init__(self):
        self.read = _rss_reader()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.before = self.read()
        self.peak = self.before
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(0.0002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def measure(configs: list[list]) -> list[dict]:
    """One row per config: its identity, ``steps``, and per kind of step in
    :data:`STEP_KINDS` that occurred ``<kind>_peak_bytes`` (the largest) and
    ``<kind>_peak_samples`` (every step's peak above the RSS before it); or ``error``."""
    import gc

    import torch

    from . import models
    from .contenders import Config, make

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    sys.setswitchinterval(1e-4)  # let the sampler thread in during Python-heavy code
    out = []
    for cfg in configs:
        kind, model, structure, method = cfg[:4]
        T = cfg[4] if len(cfg) > 4 else 10
        steps = cfg[5] if len(cfg) > 5 else default_steps(T)
        row = {"kind": kind, "model": model, "structure": structure, "method": method, "T": T,
               "steps": steps}
        c = None
        try:
            batch = models.batches(model, 1)[0]
            c = make(Config(kind, model, T, structure, method))
            c.prepare(*batch)
            for _ in range(WARMUP):
                c.step(*batch)
            peaks: dict[str, list[int]] = {k: [] for k in STEP_KINDS}
            for _ in range(steps):
                label = "statistics" if c.next_is_update() else "plain"
                c.model.zero_grad(set_to_none=True)  # the baseline holds no gradients
                gc.collect()
                with PeakSampler() as s:
                    c.step(*batch)
                peaks[label].append(s.peak - s.before)
            for label, v in peaks.items():
                if v:
                    row[f"{label}_peak_bytes"] = max(v)
                    row[f"{label}_peak_samples"] = v
            row["rss_after_bytes"] = s.read()
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        out.append(row)
        c = None
        gc.collect()
    return out


def run_child(configs: list[list], timeout_s: float) -> tuple[list[dict], str | None]:
    """Run :func:`measure` in a child process; returns (rows, error or None)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD),
               MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="1", OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.memory", json.dumps(configs)],
            capture_output=True, text=True, timeout=timeout_s, env=env,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
    except subprocess.TimeoutExpired:
        return [], f"memory child timed out after {timeout_s:.0f} s"
    if proc.returncode != 0:
        return [], f"memory child failed: {proc.stderr.strip().splitlines()[-1:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))

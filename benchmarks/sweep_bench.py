"""Throughput of a vmapped sweep (``sf.make_sweep``) against sequential runs of the core.

N members of SINGD (dense K and C) on an MLP 64-w-w-10, batch 64, float32, ONE thread
(``torch.set_num_threads(1)``, ``torch.set_flush_denormal(True)``). The sequential
baseline runs the same pure core (``capture`` + ``tx.update`` + ``apply_updates``) once
per member; the sweep runs one vmapped step for all members. Rounds are interleaved
(sequential, vmapped, sequential, ...) and medians reported, for the step with
statistics, the plain step and their T = 10 mix (one of the former, nine of the latter).

Times are the thread's CPU time (``time.thread_time``), and wall-clock beside it: on a
shared machine CPU time is what the work costs, wall time adds waiting for a core.

Memory: bytes per member of the sweep state (exact, from its tensors) and of the step's
working set (the allocator's peak during a vmapped step, glibc ``mallinfo2`` sampled
after every op, minus what was allocated before it, over N), from which the number of
members that fit the caches and the RAM follows.

Usage::

    python -m benchmarks.sweep_bench            # ~5-10 min
    python -m benchmarks.sweep_bench --quick    # ~1-2 min

Writes ``sweep_bench.md``, ``sweep_bench.json`` and ``sweep_bench.png`` into
``benchmarks/results/`` (``--out`` to change) and prints their paths.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import singd_functional as sf

BATCH, D_IN, CLASSES = 64, 64, 10


def setup_threads():
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


def make_mlp(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(D_IN, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, CLASSES)
    )


class Setup:
    """N members on an MLP of one width: the sweep and the N sequential runs."""

    def __init__(self, width: int, n: int, sequential: bool = True, cache: bool = False):
        models = [make_mlp(width, seed) for seed in range(n)]
        self.layers = sf.find_layers(models[0])
        self.capture = sf.make_capture(models[0], F.cross_entropy, self.layers)
        self.tx = sf.singd(self.layers, structures=("dense", "dense"), cache_preconditioner=cache)
        self.hp = sf.HyperParams(
            lr=torch.linspace(1e-3, 1e-2, n, dtype=torch.float64),
            damping=torch.logspace(-4, -2, n, dtype=torch.float64),
        )
        self.sweep = sf.make_sweep(self.tx, self.capture, self.hp)
        stacked, _ = torch.func.stack_module_state(models)
        self.state = self.sweep.init(stacked, stacked=True)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(BATCH, D_IN, generator=g)
        self.y = torch.randint(0, CLASSES, (BATCH,), generator=g)
        self.runs = []
        for i, m in enumerate(models if sequential else []):
            params = {k: v.detach().clone() for k, v in m.named_parameters()}
            hp_i = sf.HyperParams(lr=self.hp.lr[i], damping=self.hp.damping[i])
            self.runs.append([params, self.tx.init(params), hp_i])

    def one_step(self, params, state, hp, stats: bool):
        loss, grads, captures = self.capture(params, self.x, self.y, record_layers=stats)
        updates, state = self.tx.update(
            grads, state, params, captures=captures if stats else None, hyperparams=hp
        )
        return sf.apply_updates(params, updates), state

    def sequential(self, stats: bool):
        for run in self.runs:
            run[0], run[1] = self.one_step(*run, stats)

    def vmapped(self, stats: bool):
        step = self.sweep.step if stats else self.sweep.plain_step
        self.state, _ = step(self.state, self.x, self.y)

    def state_bytes_per_member(self) -> int:
        leaves = torch.utils._pytree.tree_leaves((self.state.params, self.state.opt_state))
        n = self.state.diverged.shape[0]
        return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor)) // n


def timed(fn):
    w, c = time.perf_counter(), time.thread_time()
    fn()
    return time.thread_time() - c, time.perf_counter() - w


def measure(width: int, n: int, rounds: int, warmup: int, cache: bool = False) -> dict:
    """Interleaved rounds; medians in ms per step (all members)."""
    s = Setup(width, n, cache=cache)
    out = {"width": width, "N": n, "rounds": rounds, "cache_preconditioner": cache}
    for kind, stats in (("stats", True), ("plain", False)):
        for _ in range(warmup):
            s.sequential(stats)
            s.vmapped(stats)
        seq_c, seq_w, vm_c, vm_w = [], [], [], []
        for _ in range(rounds):
            c, w = timed(lambda stats=stats: s.sequential(stats))
            seq_c.append(c)
            seq_w.append(w)
            c, w = timed(lambda stats=stats: s.vmapped(stats))
            vm_c.append(c)
            vm_w.append(w)
        med = lambda v: 1e3 * statistics.median(v)  # noqa: E731
        out[kind] = {
            "seq_cpu_ms": med(seq_c), "vmap_cpu_ms": med(vm_c),
            "seq_wall_ms": med(seq_w), "vmap_wall_ms": med(vm_w),
        }
        out[kind]["speedup_cpu"] = out[kind]["seq_cpu_ms"] / out[kind]["vmap_cpu_ms"]
        out[kind]["speedup_wall"] = out[kind]["seq_wall_ms"] / out[kind]["vmap_wall_ms"]
    mix = {}
    for clock in ("cpu", "wall"):
        for side in ("seq", "vmap"):
            mix[f"{side}_{clock}_ms"] = (
                out["stats"][f"{side}_{clock}_ms"] + 9 * out["plain"][f"{side}_{clock}_ms"]
            ) / 10
        mix[f"speedup_{clock}"] = mix[f"seq_{clock}_ms"] / mix[f"vmap_{clock}_ms"]
    out["T10"] = mix
    out["state_bytes_per_member"] = s.state_bytes_per_member()
    assert not s.state.diverged.any(), "a member diverged during the benchmark"
    return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _allocated_bytes() -> int | None:
    """Bytes malloc has handed out and not taken back (glibc ``mallinfo2``)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


class _PeakAllocated(TorchDispatchMode):
    """Samples :func:`_allocated_bytes` after every aten op; keeps the largest."""

    def __init__(self):
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _allocated_bytes())
        return out


def memory_probe(width: int, n: int) -> dict | None:
    """Per member: the sweep state (exact) and the step's working set (allocator peak
    during one step of each kind minus the allocation before it, over N)."""
    if _allocated_bytes() is None:
        return None
    sweep_only = Setup(width, n, sequential=False)
    sweep_only.vmapped(True)  # first call: shape caches
    before = _allocated_bytes()
    peaks = []
    for stats in (True, False):
        with _PeakAllocated() as mode:
            sweep_only.vmapped(stats)
        peaks.append(mode.peak - before)
    return {
        "width": width,
        "state_bytes_per_member": sweep_only.state_bytes_per_member(),
        "step_bytes_per_member": max(peaks) / n,
    }


def cache_bytes(level: int) -> int | None:
    for index in range(5):
        base = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}")
        try:
            if int((base / "level").read_text()) == level and "Data" not in (base / "type").read_text():
                size = (base / "size").read_text().strip()
                return int(size[:-1]) * {"K": 1024, "M": 1024**2}[size[-1]]
        except (OSError, ValueError, KeyError):
            continue
    return None


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "l2_bytes": cache_bytes(2),
        "l3_bytes": cache_bytes(3),
    }


def fmt_row(cells, widths):
    return "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"


def table(rows, header):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [fmt_row(header, widths), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join([*lines, *(fmt_row(r, widths) for r in rows)])


def speed_rows(results, key):
    rows = []
    for r in results:
        row = [r[key]]
        for kind in ("stats", "plain", "T10"):
            d = r[kind]
            row += [f"{d['seq_cpu_ms']:.1f}", f"{d['vmap_cpu_ms']:.1f}", f"{d['speedup_cpu']:.2f}x",
                    f"{d['speedup_wall']:.2f}x"]
        rows.append(row)
    header = [key]
    for kind in ("stats", "plain", "T=10"):
        header += [f"{kind} seq ms", f"{kind} vmap ms", f"{kind} speedup", "(wall)"]
    return table(rows, header)


def plot(by_n, by_width, memory, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for kind, label in (("stats", "step with statistics"), ("plain", "plain step"), ("T10", "T = 10 mix")):
        axes[0].plot([r["N"] for r in by_n], [r[kind]["speedup_cpu"] for r in by_n], marker="o", label=label)
        axes[1].plot([r["width"] for r in by_width], [r[kind]["speedup_cpu"] for r in by_width], marker="o",
                     label=label)
    for ax in axes[:2]:
        ax.axhline(3.0, color="gray", ls="--", lw=1, label="3x")
        ax.set_xscale("log", base=2)
        ax.set_ylabel("speedup over sequential runs (CPU time)")
        ax.legend()
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("members N (MLP 64-128-128-10)")
    axes[0].set_title("speedup vs N")
    axes[1].set_xlabel("width w (MLP 64-w-w-10, N = 8)")
    axes[1].set_title("speedup vs width")
    ws = [m["width"] for m in memory]
    axes[2].plot(ws, [m["state_bytes_per_member"] / 2**20 for m in memory], marker="o", label="state (exact)")
    axes[2].plot(ws, [m["step_bytes_per_member"] / 2**20 for m in memory], marker="s",
                 label="step working set (allocator peak)")
    axes[2].set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("width w")
    axes[2].set_ylabel("MiB per member")
    axes[2].set_title("memory per member")
    axes[2].legend()
    axes[2].grid(alpha=0.3)
    fig.suptitle("vmapped SINGD sweep vs sequential runs (1 thread, float32, batch 64, dense K and C)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and points")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    setup_threads()
    rounds, warmup = (5, 1) if args.quick else (11, 2)
    ns = (1, 8, 32) if args.quick else (1, 2, 4, 8, 16, 32)
    widths = (64, 128, 256) if args.quick else (64, 128, 256, 512)
    env = environment()
    t0 = time.time()

    headline = measure(128, 8, rounds + 4, warmup)
    cached = measure(128, 8, rounds + 4, warmup, cache=True)
    for name, h in (("", headline), (", cache_preconditioner", cached)):
        print(f"N=8, w=128{name}: speedup {h['T10']['speedup_cpu']:.2f}x (T=10 mix), "
              f"{h['stats']['speedup_cpu']:.2f}x (statistics step), "
              f"{h['plain']['speedup_cpu']:.2f}x (plain step)", flush=True)
    by_n = []
    for n in ns:
        by_n.append(headline if n == 8 else measure(128, n, rounds, warmup))
        print(f"  N={n}: T10 {by_n[-1]['T10']['speedup_cpu']:.2f}x", flush=True)
    by_width = []
    for w in widths:
        by_width.append(headline if w == 128 else measure(w, 8, rounds, warmup))
        print(f"  w={w}: T10 {by_width[-1]['T10']['speedup_cpu']:.2f}x", flush=True)

    memory = []
    for w in widths:
        m = memory_probe(w, 8)
        if m is None:
            break
        per = m["state_bytes_per_member"] + m["step_bytes_per_member"]
        m["members_fit_l2"] = int(env["l2_bytes"] // per) if env["l2_bytes"] else None
        m["members_fit_l3"] = int(env["l3_bytes"] // per) if env["l3_bytes"] else None
        m["members_fit_ram_half"] = int(env["ram_bytes"] / 2 // per)
        memory.append(m)
        print(f"  w={w}: state {m['state_bytes_per_member'] / 2**20:.2f} MiB, "
              f"step working set {m['step_bytes_per_member'] / 2**20:.2f} MiB per member", flush=True)
    env["load_average_end"] = os.getloadavg()
    env["seconds"] = round(time.time() - t0, 1)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"sweep_bench.{ext}" for ext in ("md", "json", "png")}
    data = {"environment": env, "headline": headline, "headline_cache_preconditioner": cached, "by_N": by_n, "by_width": by_width, "memory": memory,
            "quick": args.quick}
    paths["json"].write_text(json.dumps(data, indent=2))
    plot(by_n, by_width, memory, paths["png"])
    mem_rows = [[m["width"], f"{m['state_bytes_per_member'] / 2**20:.2f}", f"{m['step_bytes_per_member'] / 2**20:.2f}",
                 m["members_fit_l2"], m["members_fit_l3"], m["members_fit_ram_half"]] for m in memory]
    headline_rows = "\n".join(
        f"| {name} | {label} | {h[k]['seq_cpu_ms']:.1f} | {h[k]['vmap_cpu_ms']:.1f} | "
        f"{h[k]['speedup_cpu']:.2f}x | {h[k]['speedup_wall']:.2f}x |"
        for name, h in (("default", headline), ("cache_preconditioner", cached))
        for k, label in (("stats", "with statistics"), ("plain", "plain"), ("T10", "T = 10 mix"))
    )
    md = f"""# Vmapped sweep vs sequential runs

MLP 64-w-w-10, batch 64, float32, SINGD with dense K and C, one thread, flush denormals.
Sequential: the pure core once per member. Vmapped: `sf.make_sweep(...).step` for all
members at once (with the divergence mask). Medians of interleaved rounds, ms per step for
all N members; speedup = sequential / vmapped in thread CPU time ("(wall)": wall clock).
T = 10: one step with statistics and nine plain steps.

Machine: {env['cpu']}, {env['cores']} cores, torch {env['torch']}; load average
{env['load_average'][0]:.1f} at start, {env['load_average_end'][0]:.1f} at the end
(other processes share the cores: CPU time is the fairer clock). {'Quick run.' if args.quick else ''}

## Headline: N = 8, w = 128

| transform | step | sequential ms | vmapped ms | speedup (CPU) | speedup (wall) |
|---|---|---|---|---|---|
{headline_rows}

`cache_preconditioner=True` keeps K K^T and C C^T between factor updates (what
`sf.SINGD` does for T > 1): cheaper plain steps, dearer statistics steps. The scaling
below uses the default transform.

## Scaling with N (w = 128)

{speed_rows(by_n, 'N')}

## Scaling with width (N = 8)

{speed_rows(by_width, 'width')}

## Memory per member

State = parameters, velocity and K, C, m_K, m_C of every layer (exact). Step working
set = the allocator's peak during one vmapped step (N = 8) minus what was allocated
before it, per member: activations, captures, gradients, the new state and temporaries.
"fit": how many members' state + working set fit the L2 ({env['l2_bytes']} bytes), the L3
({env['l3_bytes']} bytes) and half of the {env['ram_bytes'] / 2**30:.1f} GiB of RAM. Past the
L3 the step streams every member's factors from memory each step (the speed-up falls with
width above). The RAM bounds N: `chunk_size` trims the step's working set, not the state.

{table(mem_rows, ['width', 'state MiB', 'step MiB', 'members fitting L2', 'members fitting L3', 'members fitting half the RAM'])}

![plot](sweep_bench.png)
"""
    paths["md"].write_text(md)
    for p in paths.values():
        print(p)
    return data


if __name__ == "__main__":
    main()

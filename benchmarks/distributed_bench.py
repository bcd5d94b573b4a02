"""Per-process cost of SINGD's data-parallel modes: compute, bytes sent, state held.

Modes (gloo on loopback, one thread per process, float32):

* ``ddp``        DistributedDataParallel, every process does every layer's work
* ``ddp-split``  the same with ``SINGD(..., split_work=True)``
* ``fsdp2``      ``fully_shard`` per block and on the root

for dense and diagonal factors (K and C alike), W = 2 and 4 processes, on a small
pre-norm residual MLP model (Linear 32 -> d, two blocks LayerNorm + Linear d -> 2d ->
d, Linear head; d = 64 unless ``--width``), local batch 16 x 8 tokens, T = 1 (every
step updates the factors: the split's best case) unless ``--T``.

Per process and step it records:

* ``step_ms``: thread CPU time of ``opt.step()`` (the optimizer's own compute, the
  part the split divides; waiting in collectives is not counted), median of the timed
  steps; the table shows the slowest process,
* bytes the optimizer's collectives carry in ``step`` (payload per process), and the
  bytes a ring implementation sends per process for them (all_reduce of n: 2 n (W-1)/W,
  all_gather of n per process: n (W-1)),
* bytes the framework moves outside ``step`` (FSDP2's parameter all_gathers and
  gradient reduce-scatters, seen through ``torch.distributed``; DDP's C++ reducer is not
  visible there and is listed as its known payload, all gradients once per step;
  ring estimates as above),
* the optimizer state this process holds (velocity, factors, momenta).

The machine these results come from was shared with other jobs: compare times only
within one results file.

Usage::

    python -m benchmarks.distributed_bench                 # writes results/distributed_bench.*
    python -m benchmarks.distributed_bench --worlds 2 --width 32 --steps 4
    python -m benchmarks.distributed_bench --width 128 --name distributed_bench_w128
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import singd_functional as sf
from singd_functional import _fsdp
from tests._multiprocess import run

# what SINGD calls, and what FSDP2 calls (torch 2.13: the *_single forms; older: *_tensor)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "all_gather_single", "reduce_scatter_single", "broadcast")
HERE = os.path.dirname(os.path.abspath(__file__))


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Model(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.embed = nn.Linear(32, d)
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


class _Meter:
    """Bytes handed to torch.distributed collectives, by phase ("step" or "framework")."""

    def __init__(self, world: int):
        self.world, self.phase = world, "framework"
        self.payload = {"step": 0, "framework": 0}
        self.ring = {"step": 0.0, "framework": 0.0}
        self.calls = {"step": 0, "framework": 0}
        self.real = {n: getattr(dist, n) for n in COLLECTIVES}

    def __enter__(self):
        for name in COLLECTIVES:
            setattr(dist, name, functools.partial(self._call, name))
        return self

    def __exit__(self, *exc):
        for name, fn in self.real.items():
            setattr(dist, name, fn)

    def _call(self, name, *args, **kwargs):
        W = self.world
        if name == "all_reduce":
            n, ring = _bytes(args[0]), 2 * _bytes(args[0]) * (W - 1) / W
        elif name in ("all_gather", "all_gather_into_tensor", "all_gather_single"):
            n = _bytes(args[1] if len(args) > 1 else kwargs["input_tensor"])
            ring = n * (W - 1)
        elif name in ("reduce_scatter_tensor", "reduce_scatter_single"):
            n = _bytes(args[1] if len(args) > 1 else kwargs["input"])
            ring = n * (W - 1) / W
        else:
            n = ring = _bytes(args[0])
        self.payload[self.phase] += n
        self.ring[self.phase] += ring
        self.calls[self.phase] += 1
        return self.real[name](*args, **kwargs)


def _bytes(t) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_bytes(x) for x in t)
    return t.numel() * t.element_size()


def _state_bytes(opt) -> dict:
    out = {"velocity": 0, "factors": 0}
    for st in opt.state.values():
        v = _fsdp.local(st["momentum_buffer"])
        out["velocity"] += v.numel() * v.element_size()
        for key in ("K", "C", "m_K", "m_C"):
            if key in st:
                out["factors"] += sum(t.numel() * t.element_size() for t in st[key].leaves)
    return out


def _rank(rank: int, world: int, mode: str, structure: str, width: int, steps: int, T: int):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = Model(width)
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        net = model
    else:
        net = DDP(model)
    opt = sf.SINGD(net, params=list(model.parameters()), warn_unsupported=False,
                   lr=0.01, T=T,
                   structures=(structure, structure), split_work=mode == "ddp-split")
    warmup = 2
    times = []
    meter = _Meter(world)
    g = torch.Generator().manual_seed(rank)
    with meter:
        for t in range(warmup + steps):
            if t == warmup:  # count the timed steps only
                meter.payload = {"step": 0, "framework": 0}
                meter.ring = {"step": 0.0, "framework": 0.0}
                meter.calls = {"step": 0, "framework": 0}
            x = torch.randn(16, 8, 32, generator=g)
            y = torch.randint(0, 10, (16, 8), generator=g)
            opt.zero_grad()
            F.cross_entropy(net(x).reshape(-1, 10), y.reshape(-1)).backward()
            meter.phase = "step"
            start = time.thread_time()
            opt.step()
            times.append(time.thread_time() - start)
            meter.phase = "framework"
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    framework_payload = meter.payload["framework"] / steps
    framework_ring = meter.ring["framework"] / steps
    if mode != "fsdp2":  # DDP's reducer all-reduces every gradient once, in C++
        framework_payload = param_bytes
        framework_ring = 2 * param_bytes * (world - 1) / world
    return dict(
        step_ms=1e3 * statistics.median(times[warmup:]),
        step_payload=meter.payload["step"] / steps,
        step_ring=meter.ring["step"] / steps,
        step_calls=meter.calls["step"] / steps,
        framework_payload=framework_payload,
        framework_ring=framework_ring,
        state=_state_bytes(opt),
        param_bytes=param_bytes,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--modes", nargs="+", default=["ddp", "ddp-split", "fsdp2"])
    parser.add_argument("--structures", nargs="+", default=["dense", "diagonal"])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--T", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--name", default="distributed_bench", help="results file stem")
    args = parser.parse_args(argv)

    rows = []
    for world in args.worlds:
        for structure in args.structures:
            for mode in args.modes:
                fn = functools.partial(_rank, mode=mode, structure=structure, width=args.width,
                                       steps=args.steps, T=args.T)
                ranks = run(fn, world)
                row = dict(world=world, structure=structure, mode=mode, ranks=ranks)
                rows.append(row)
                print(_line(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    meta = dict(width=args.width, steps=args.steps, T=args.T, torch=torch.__version__,
                machine=platform.machine(), note="shared, loaded machine; 1 thread/process")
    stem = os.path.join(args.out, args.name)
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(_markdown(meta, rows))
    print(stem + ".md")


def _line(row) -> str:
    r = row["ranks"]
    return (f"W={row['world']} {row['structure']:8s} {row['mode']:9s} "
            f"step {max(x['step_ms'] for x in r):7.2f} ms (min {min(x['step_ms'] for x in r):.2f})  "
            f"step bytes {r[0]['step_payload'] / 1024:8.1f} KiB  "
            f"state {max(x['state']['velocity'] + x['state']['factors'] for x in r) / 1024:.1f} KiB")


def _markdown(meta, rows) -> str:
    lines = [
        "# SINGD data-parallel modes: per-process cost",
        "",
        f"`python -m benchmarks.distributed_bench` (width {meta['width']}, T = {meta['T']}, "
        f"{meta['steps']} timed steps, float32, gloo on loopback, torch {meta['torch']}). "
        "The machine was shared with other jobs: compare times within this table only.",
        "",
        "step ms: thread CPU time of `opt.step()` on the slowest process (median over steps); "
        "KiB are per process and step: the payload the optimizer's collectives carry in "
        "`step` and what a ring sends for them; framework: DDP's gradient all-reduce "
        "(known payload) or FSDP2's parameter all-gathers and gradient reduce-scatters "
        "(measured); state: velocity + factors + momenta held by the process.",
        "",
        "| W | structure | mode | step ms (max/min over processes) | step payload KiB | "
        "step ring-sent KiB | step collectives | framework ring-sent KiB | state KiB (velocity + factors) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = row["ranks"]
        state = max(r, key=lambda x: x["state"]["velocity"] + x["state"]["factors"])["state"]
        lines.append(
            f"| {row['world']} | {row['structure']} | {row['mode']} | "
            f"{max(x['step_ms'] for x in r):.2f} / {min(x['step_ms'] for x in r):.2f} | "
            f"{r[0]['step_payload'] / 1024:.1f} | {max(x['step_ring'] for x in r) / 1024:.1f} | "
            f"{r[0]['step_calls']:.0f} | {max(x['framework_ring'] for x in r) / 1024:.1f} | "
            f"{(state['velocity'] + state['factors']) / 1024:.1f} "
            f"({state['velocity'] / 1024:.1f} + {state['factors'] / 1024:.1f}) |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""One launcher for the multi-process tests: W gloo processes on loopback, one result each.

``run(fn, world)`` spawns ``world`` processes (forked where the platform can), gives each
a gloo process group on a free port, calls ``fn(rank, world)`` with one thread per
process and returns the per-rank results in rank order. ``fn`` returns anything
``torch.save`` / ``torch.load(weights_only=True)`` handle (dicts, lists, tensors,
numbers, strings). An exception in any process fails the call with its traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable[[int, int], Any], world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world)
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run(fn: Callable[[int, int], Any], world: int) -> list[Any]:
    """``[fn(0, world), ..., fn(world - 1, world)]``, each in its own gloo process."""
    # torch.optim imports torch._dynamo lazily (seconds per process): import it here once,
    # before forking, so that the children inherit it
    importlib.import_module("torch._dynamo")
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(fn, world, free_port(), out_dir), nprocs=world,
                           join=True, start_method=start_method)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True)
                for r in range(world)]


@contextlib.contextmanager
def count_calls(module, names: tuple[str, ...]):
    """Count the calls of ``module.<name>`` for each name while inside (yields the counts)."""
    counts = dict.fromkeys(names, 0)
    real = {n: getattr(module, n) for n in names}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return real[name](*args, **kwargs)

        return call

    for n in names:
        setattr(module, n, counting(n))
    try:
        yield counts
    finally:
        for n in names:
            setattr(module, n, real[n])

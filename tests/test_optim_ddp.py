"""Two gloo processes on loopback equal one process on the concatenated batch (float64, 1e-10).

Each process trains on its part of every batch, with the model wrapped in
DistributedDataParallel or unwrapped (then ``step`` reduces the gradients itself, as the
official package does: averaged for a mean loss, summed for a sum loss). The reference
is the same optimizer in this process on the whole batch, differentiating the loss the
reduced gradient belongs to: the mean loss; for a sum loss (loss_average None) under DDP
the sum divided by the world size, unwrapped the sum itself. All processes are spawned
once per pytest worker (tests/_multiprocess.py); every test reads its configuration.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import singd_functional as sf
from singd_functional import _distributed
from tests._multiprocess import count_calls, run
from tests._no_sync import no_host_sync
from tests.models import make_batch, make_loss, make_model
from tests.test_optim import BASE, assert_moved, assert_same

WORLD, BATCH, STEPS = 2, 8, 4
CONFIGS = {
    "ddp-mlp-batch": dict(kind="mlp", wrap=True, loss_average="batch", hp=dict(BASE)),
    "ddp-seq-batch+sequence-T2": dict(
        kind="seq", wrap=True, loss_average="batch+sequence",
        hp=dict(BASE, T=2, structures=("triltoeplitz", "hierarchical3_2")), no_sync=True),
    "ddp-cnn-sum-ikfac-reduce": dict(
        kind="cnn", wrap=True, loss_average=None,
        hp=dict(BASE, lr=0.01, kfac_like=True, kfac_approx="reduce", structures=("dense", "diagonal"))),
    "ddp-seq-accumulation-no_sync": dict(
        kind="seq", wrap=True, loss_average="batch", micro=2,
        hp=dict(BASE, structures=("block3diagonal", "triutoeplitz"))),
    # unequal local batches: exact only with the row-weighted mean of H_K
    "ddp-seq-sum-unequal-batches": dict(kind="seq", wrap=True, loss_average=None, split=(3, 5),
                                        hp=dict(BASE, lr=0.01, structures=("dense", "triltoeplitz"))),
    "unwrapped-mlp-batch": dict(kind="mlp", wrap=False, loss_average="batch",
                                hp=dict(BASE, structures=("diagonal", "dense"))),
    "unwrapped-cnn-sum": dict(kind="cnn", wrap=False, loss_average=None,
                              hp=dict(BASE, lr=0.01, T=2)),
    # one process with an empty batch on statistics steps: neither crashes nor hangs
    "ddp-seq-sum-empty-rank": dict(kind="seq", wrap=True, loss_average=None, split=(8, 0),
                                   hp=dict(BASE, lr=0.01, structures=("dense", "triltoeplitz"))),
    # a NaN in one process's batch at step 1: both skip that step (reference: batch 1 unseen)
    "ddp-mlp-nan-on-rank1": dict(kind="mlp", wrap=True, loss_average="batch", nan_at=(1, 1),
                                 hp=dict(BASE), no_sync=True),
    "unwrapped-cnn-nan-on-rank0": dict(kind="cnn", wrap=False, loss_average="batch",
                                       nan_at=(0, 2), hp=dict(BASE, T=2)),
    # the loop averages the gradients itself and tells the optimizer so
    "manual-average-mlp": dict(kind="mlp", wrap=False, manual=True, loss_average="batch",
                               hp=dict(BASE, T=2)),
    # opt.process_group = None: each process trains alone on its half, nothing is reduced
    "independent-mlp": dict(kind="mlp", wrap=False, independent=True, loss_average="batch",
                            hp=dict(BASE)),
}


def _loss_fn(cfg: dict, world: int):
    """The loss one process on the whole batch differentiates (module docstring)."""
    base = make_loss(cfg["loss_average"])
    if cfg["loss_average"] is None and cfg["wrap"]:  # DDP averages the per-process sums
        return lambda out, y: base(out, y) / world
    return base


def _run_rank(rank: int, cfg: dict) -> dict:
    kind, loss_average, micro = cfg["kind"], cfg["loss_average"], cfg.get("micro", 1)
    model = make_model(kind)
    net = DDP(model) if cfg["wrap"] else model
    opt = sf.SINGD(net, loss_average=loss_average, **cfg["hp"])
    if cfg.get("independent"):
        opt.process_group = None
    if cfg.get("manual"):
        opt.reduce_gradients = False
    loss_fn = make_loss(loss_average)
    collectives = []
    for t in range(STEPS):
        x, y = make_batch(kind, t, BATCH)
        split = cfg.get("split", (BATCH // WORLD,) * WORLD)
        x, y = x.split(split)[rank], y.split(split)[rank]
        if cfg.get("nan_at") == (rank, t):
            x = x.clone()
            x[0] = float("nan")
        opt.zero_grad()
        for i, (xm, ym) in enumerate(zip(x.chunk(micro), y.chunk(micro))):
            last = i == micro - 1
            with contextlib.nullcontext() if last or not cfg["wrap"] else net.no_sync():
                loss = loss_fn(net(xm), ym)
                (loss if loss_average is None else loss / micro).backward()
        if cfg.get("manual"):
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= WORLD
        with count_calls(dist, ("all_reduce",)) as calls:
            # the reduction reads nothing back to the host (no .tolist(), no blocking copy)
            with no_host_sync() if cfg.get("no_sync") else contextlib.nullcontext():
                opt.step()
        collectives.append(calls["all_reduce"])
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return dict(params=params, collectives=collectives, skipped=int(opt.skipped_steps))


def _flag_rides_along(rank: int) -> float:
    """The non-finite count of one process reaches every process in the one collective."""
    stats = sf.LayerStatistics(sf.structures.Dense.eye(2, dtype=torch.float64),
                               sf.structures.Dense.eye(3, dtype=torch.float64))
    local = _distributed.LocalStatistics(stats, 4.0, 4.0)
    flag = torch.tensor(float(rank == 1))
    _distributed.all_reduce_statistics([(stats, local, "batch")], dist.group.WORLD, nonfinite=flag)
    return float(flag)


def _all_configs(rank: int, world: int) -> dict:
    results = {name: _run_rank(rank, cfg) for name, cfg in CONFIGS.items()}
    results["flag"] = _flag_rides_along(rank)
    return results


@functools.cache
def _results():
    return run(_all_configs, WORLD)


def _single_process(cfg: dict, rank: int | None = None) -> dict:
    """One process on the whole batch (or, given ``rank``, on that process's part only)."""
    kind, loss_average = cfg["kind"], cfg["loss_average"]
    model = make_model(kind)
    opt = sf.SINGD(model, loss_average=loss_average, **cfg["hp"])
    loss_fn = _loss_fn(cfg, WORLD) if rank is None else make_loss(loss_average)
    for t in range(STEPS):
        if cfg.get("nan_at", (None, None))[1] == t:  # the step every process skipped
            for group in opt.param_groups:
                group["step"] += 1
            continue
        x, y = make_batch(kind, t, BATCH)
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if not c.get("independent")])
def test_two_processes_equal_one_process(name):
    cfg = CONFIGS[name]
    ranks = [r[name] for r in _results()]
    ref = _single_process(cfg)
    assert_same(ranks[0]["params"], ref)
    assert_moved(cfg["kind"], ranks[0]["params"])
    for k, p in ranks[1]["params"].items():
        assert torch.equal(p, ranks[0]["params"][k]), f"{k}: the processes diverged"
    assert [r["skipped"] for r in ranks] == [1 if "nan_at" in cfg else 0] * WORLD


def test_the_nonfinite_flag_rides_in_the_statistics_collective():
    assert [r["flag"] for r in _results()] == [1.0] * WORLD


@pytest.mark.parametrize("name", ["ddp-mlp-batch", "ddp-seq-batch+sequence-T2",
                                  "unwrapped-cnn-sum", "manual-average-mlp"])
def test_one_collective_per_step(name):
    """Statistics on steps t % T == 0; an unwrapped model's gradients on every step, fused."""
    cfg = CONFIGS[name]
    T, reduces_grads = cfg["hp"]["T"], not cfg["wrap"] and not cfg.get("manual")
    for r in _results():
        assert r[name]["collectives"] == [int(reduces_grads or t % T == 0) for t in range(STEPS)]


def test_process_group_none_trains_each_process_alone():
    cfg = CONFIGS["independent-mlp"]
    for rank, r in enumerate(_results()):
        assert r["independent-mlp"]["collectives"] == [0] * STEPS
        assert_same(r["independent-mlp"]["params"], _single_process(cfg, rank))

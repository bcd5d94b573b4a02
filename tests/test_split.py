"""``split_work=True``: each layer's work on one process, still equal to one process.

Two gloo processes (four in the slow test), DDP-wrapped or unwrapped, each on its part of
every batch; the reference is one process on the concatenated batch (the loss of
tests/test_optim_ddp.py), float64 at 1e-10. Every process must end with the same
parameters AND the same factors (the owners send their new factors along with D), and
a step must cost one all_gather besides the usual all_reduce.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import singd_functional as sf
from singd_functional import _split
from singd_functional.structures import get
from tests._multiprocess import count_calls, run
from tests.models import make_batch, make_loss, make_model
from tests.test_optim import BASE, assert_moved, assert_same
from tests.test_optim_ddp import _single_process

BATCH, STEPS = 8, 4
CONFIGS = {
    "ddp-mlp-dense": dict(kind="mlp", wrap=True, loss_average="batch", hp=dict(BASE)),
    "ddp-seq-T2-structured": dict(
        kind="seq", wrap=True, loss_average="batch+sequence",
        hp=dict(BASE, T=2, structures=("triltoeplitz", "block3diagonal"))),
    "unwrapped-cnn-sum-T2": dict(kind="cnn", wrap=False, loss_average=None,
                                 hp=dict(BASE, lr=0.01, T=2, structures=("dense", "diagonal"))),
    "unwrapped-wide-ikfac": dict(kind="wide", wrap=False, loss_average="batch",
                                 hp=dict(BASE, kfac_like=True)),
}


def _run_rank(rank: int, world: int, cfg: dict) -> dict:
    model = make_model(cfg["kind"])
    net = DDP(model) if cfg["wrap"] else model
    opt = sf.SINGD(net, loss_average=cfg["loss_average"], split_work=True, **cfg["hp"])
    loss_fn = make_loss(cfg["loss_average"])
    calls = []
    for t in range(STEPS):
        x, y = make_batch(cfg["kind"], t, BATCH)
        opt.zero_grad()
        loss_fn(net(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
        with count_calls(dist, ("all_reduce", "all_gather")) as counts:
            opt.step()
        calls.append(dict(counts))
    factors = {f"{k}.{key}": leaf.clone() for k, p in model.named_parameters()
               for key in ("K", "C", "m_K", "m_C") if key in opt.state[p]
               for leaf in opt.state[p][key].leaves}
    return dict(params={k: v.detach().clone() for k, v in model.named_parameters()},
                factors=factors, calls=calls, owners=dict(opt._split_owners[1]))


def _all_configs(rank: int, world: int, names: tuple[str, ...]) -> dict:
    return {name: _run_rank(rank, world, CONFIGS[name]) for name in names}


@functools.cache
def _results(world: int, names: tuple[str, ...]):
    return run(functools.partial(_all_configs, names=names), world)


def _check(name: str, world: int, results):
    cfg = CONFIGS[name]
    ranks = [r[name] for r in results]
    assert_same(ranks[0]["params"], _single_process(cfg))  # (no DDP sum loss here: any W)
    assert_moved(cfg["kind"], ranks[0]["params"])
    for r in ranks[1:]:
        for k, p in r["params"].items():
            assert torch.equal(p, ranks[0]["params"][k]), f"{k}: the processes diverged"
        for k, M in r["factors"].items():
            assert torch.equal(M, ranks[0]["factors"][k]), f"{k}: the factors diverged"
    owners = ranks[0]["owners"]
    assert len(set(owners.values())) == min(world, len(owners)), "a process idles needlessly"
    T, reduces_grads = cfg["hp"]["T"], not cfg["wrap"]
    for r in ranks:
        assert r["calls"] == [dict(all_reduce=int(reduces_grads or t % T == 0), all_gather=1)
                              for t in range(STEPS)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_split_equals_one_process(name):
    _check(name, 2, _results(2, tuple(CONFIGS)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp-seq-T2-structured", "unwrapped-cnn-sum-T2"])
def test_split_four_processes(name):
    _check(name, 4, _results(4, ("ddp-seq-T2-structured", "unwrapped-cnn-sum-T2")))


def test_cost_model_balances_cost_not_count():
    """One wide dense layer against four small ones: it gets a process to itself."""
    dense, diagonal = get("dense"), get("diagonal")
    infos = [sf.LayerInfo(name=f"l{i}", kind="linear", weight=f"l{i}.w", bias=None,
                          d_in=d, d_out=d) for i, d in enumerate((64, 8, 8, 8, 8))]
    costs = {i.name: _split.layer_cost(i, dense.eye(i.d_K), dense.eye(i.d_C), T=1)
             for i in infos}
    owners = _split.assign(costs, 2)
    assert [owners[f"l{i}"] for i in range(5)] == [0, 1, 1, 1, 1]
    # a diagonal layer costs far less than a dense one of the same size
    big = infos[0]
    cheap = _split.layer_cost(big, diagonal.eye(big.d_K), diagonal.eye(big.d_C), T=1)
    assert cheap < costs["l0"] / 20
    # the factor update is amortised over T
    assert _split.layer_cost(big, dense.eye(65), dense.eye(64), T=10) < costs["l0"]

"""The pure core across processes: ``sf.singd(..., process_group=...)``.

A user's own data-parallel loop over the pure core (torch.func capture, gradients
averaged by the loop): ``update(..., captures=...)`` reduces the statistics inside, in
one all_reduce. Two gloo processes equal ``run_core`` on the concatenated batch
(float64, 1e-10); also with ``_distributed.reduced_statistics`` called by hand and the
result passed as ``statistics=``.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

import singd_functional as sf
from singd_functional import _distributed
from tests._multiprocess import count_calls, run
from tests.models import make_batch, make_loss, make_model, run_core
from tests.test_optim import assert_same

STEPS = 4
CONFIGS = {
    "mlp-dense": dict(kind="mlp", loss_average="batch", T=1, hp=dict(lr=0.05, lr_cov=0.05)),
    "mlp-by-hand": dict(kind="mlp", loss_average="batch", T=1, by_hand=True,
                        hp=dict(lr=0.05, lr_cov=0.05, structures=("diagonal", "dense"))),
    "seq-structured-T2": dict(kind="seq", loss_average="batch+sequence", T=2,
                              hp=dict(lr=0.05, lr_cov=0.05,
                                      structures=("triltoeplitz", "block3diagonal"))),
}


def _rank(rank: int, world: int) -> dict:
    out = {}
    for name, cfg in CONFIGS.items():
        kind, loss_average = cfg["kind"], cfg["loss_average"]
        model = make_model(kind)
        layers = sf.find_layers(model)
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        capture = sf.make_capture(model, make_loss(loss_average), layers)
        group = None if cfg.get("by_hand") else "world"
        tx = sf.singd(layers, loss_average=loss_average, process_group=group, **cfg["hp"])
        state = tx.init(params)
        calls = []
        for t in range(STEPS):
            x, y = make_batch(kind, t)
            _, grads, captures = capture(params, x.chunk(world)[rank], y.chunk(world)[rank])
            for g in grads.values():  # the loop averages the gradients, as DDP would
                dist.all_reduce(g)
                g /= world
            due = t % cfg["T"] == 0
            with count_calls(dist, ("all_reduce",)) as counts:
                if cfg.get("by_hand"):
                    statistics = _distributed.reduced_statistics(
                        layers, state.factors, captures, dist.group.WORLD,
                        loss_average=loss_average) if due else None
                    updates, state = tx.update(grads, state, params, statistics=statistics)
                else:
                    updates, state = tx.update(grads, state, params,
                                               captures=captures if due else None)
            calls.append(counts["all_reduce"])
            params = sf.apply_updates(params, updates)
        out[name] = dict(params=params, calls=calls)
    return out


@functools.cache
def _results():
    return run(_rank, 2)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pure_core_on_two_processes_equals_one(name):
    cfg = CONFIGS[name]
    ref, _ = run_core(cfg["kind"], STEPS, cfg["loss_average"], T=cfg["T"], **cfg["hp"])
    ranks = [r[name] for r in _results()]
    assert_same(ranks[0]["params"], ref)
    for k, p in ranks[1]["params"].items():
        assert torch.equal(p, ranks[0]["params"][k])
    assert ranks[0]["calls"] == [int(t % cfg["T"] == 0) for t in range(STEPS)]

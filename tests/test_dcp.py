"""SINGD's state through ``torch.distributed.checkpoint`` (fully_shard and DDP models).

Two processes train 2 steps, save model and optimizer with ``get_state_dict`` +
``dcp.save``; two fresh processes ``dcp.load`` + ``set_state_dict`` and train 2 more:
bit-identical to 4 uninterrupted steps. The slow test saves with 4 processes and
resumes with 2 (DCP reshards the sharded velocity; the replicated factors are read
whole). The same save/resume with a DDP model (all state replicated) is bit-identical
too: equal to one process on the concatenated batch at 1e-10. Checkpoints go to a
temporary directory.
"""

from __future__ import annotations

import functools
import tempfile

import pytest
import torch

import singd_functional as sf
from tests._multiprocess import run
from tests.test_fsdp import BASE, _shard, batch, loss_fn, make_tiny
from tests.test_optim import assert_same

dcp = pytest.importorskip("torch.distributed.checkpoint")
HP = dict(BASE, T=3, structures=("dense", "block2diagonal"))
SAFE = (torch.Tensor, str, int, float, bool, type(None))


def _train(rank, world, path, start, steps, load, ddp=False):
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_tiny()) if ddp else _shard(make_tiny(), world)
    opt = sf.SINGD(model, params=list(model.parameters()), warn_unsupported=False,
                   loss_average="batch", **HP)
    if load:
        model_sd, optim_sd = get_state_dict(model, opt)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    fn = loss_fn("batch")
    for t in range(start, start + steps):
        x, y = batch(t)
        opt.zero_grad()
        fn(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
        opt.step()
    model_sd, optim_sd = get_state_dict(model, opt)
    if path is not None and not load:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    return dict(
        params={k: v.detach().clone() if ddp else v.full_tensor()
                for k, v in model.named_parameters()},
        safe=all(isinstance(v, SAFE) for v in _leaves(optim_sd)),
        steps=[g["step"] for g in opt.param_groups],
    )


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    else:
        yield tree


def _resume(save_world: int, load_world: int, ddp=False):
    with tempfile.TemporaryDirectory() as path:
        saved = run(functools.partial(_train, path=path, start=0, steps=2, load=False, ddp=ddp),
                    save_world)
        resumed = run(functools.partial(_train, path=path, start=2, steps=2, load=True, ddp=ddp),
                      load_world)
    return saved, resumed


@pytest.mark.parametrize("ddp", [False, True], ids=["fsdp2", "ddp"])
def test_save_with_two_resume_with_two_is_bit_exact(ddp):
    saved, resumed = _resume(2, 2, ddp)
    straight = run(functools.partial(_train, path=None, start=0, steps=4, load=False, ddp=ddp),
                   2)
    assert all(r["safe"] for r in saved), "the optimizer state holds more than plain data"
    assert [r["steps"] for r in resumed] == [[4], [4]]
    for r, s in zip(resumed, straight):
        for k, p in r["params"].items():
            assert torch.equal(p, s["params"][k]), f"{k}: the resumed run differs"
    moved = max((a - b).abs().max() for a, b in
                zip(resumed[0]["params"].values(), saved[0]["params"].values()))
    assert moved > 1e-3, "the resumed steps did not move the parameters"


def _single_process(steps: int) -> dict:
    model = make_tiny()
    opt = sf.SINGD(model, params=list(model.parameters()), warn_unsupported=False,
                   loss_average="batch", **HP)
    fn = loss_fn("batch")
    for t in range(steps):
        x, y = batch(t)
        opt.zero_grad()
        fn(model(x), y).backward()
        opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.slow
def test_save_with_four_resume_with_two():
    _, resumed = _resume(4, 2)
    assert_same(resumed[0]["params"], _single_process(4))

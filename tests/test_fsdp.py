"""SINGD on a ``fully_shard`` (FSDP2) model equals one process on the concatenated batch.

Two gloo processes (four in the slow test) shard a small pre-norm transformer-style model
(Linear embedding, residual blocks of LayerNorm + two Linear, Linear head) with
``fully_shard`` per block and on the root; each trains on its part of every batch. The
reference is the same optimizer on the unsharded model in this process on the whole
batch (float64, 1e-10). The LayerNorm parameters are passed explicitly (SINGD's identity
path on sharded non-layer parameters). Also checked: the velocity stays sharded, the
factors replicated, and what travels in ``step``: one all_reduce on statistics steps,
and one all_gather per step only when some layer's C mixes rows across shards.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import singd_functional as sf
from singd_functional import _fsdp
from singd_functional.structures import get
from tests._multiprocess import count_calls, run
from tests.test_optim import BASE, assert_same

fsdp = pytest.importorskip("torch.distributed.fsdp")
BATCH, STEPS, SEQ = 8, 4, 3


class Block(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.blocks = nn.Sequential(Block(6, 8), Block(6, 8))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


def make_tiny(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return Tiny().to(dtype)


def batch(t: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(2000 + t)
    x = torch.randn(BATCH, SEQ, 4, generator=g, dtype=torch.float64).to(dtype)
    return x, torch.randint(0, 3, (BATCH, SEQ), generator=g)


def loss_fn(loss_average, world=1):
    def fn(out, y):
        total = F.cross_entropy(out.reshape(-1, 3), y.reshape(-1), reduction="sum")
        if loss_average is None:  # the shards' gradients are averaged: the sum / W
            return total / world
        return total / (y.shape[0] if loss_average == "batch" else y.numel())
    return fn


CONFIGS = {
    "dense": dict(loss_average="batch+sequence", hp=dict(BASE)),
    # diagonal C: D's rows need only the local rows of G (no all_gather)
    "diagonal-C": dict(loss_average="batch", hp=dict(BASE, structures=("dense", "diagonal"))),
    # block2: aligned with the 4-row shards of `up` and the 2-row ones of `head`, not with
    # the 3-row shards of the 6-row layers (those are gathered)
    "block2-T2-keep-unsharded": dict(
        loss_average="batch", reshard=False,
        hp=dict(BASE, T=2, structures=("block3diagonal", "block2diagonal"))),
    "toeplitz-sum-ikfac": dict(
        loss_average=None,
        hp=dict(BASE, lr=0.01, kfac_like=True, structures=("triltoeplitz", "triutoeplitz"))),
    # every nn.Linear sharded on its own too (fully_shard changes its class to a subclass)
    "per-linear-diagonal-K": dict(loss_average="batch", per_linear=True,
                                  hp=dict(BASE, structures=("diagonal", "dense"))),
    "hierarchical-wd": dict(
        loss_average="batch", hp=dict(BASE, weight_decay=0.01, structures=("diagonal", "hierarchical3_2"))),
}

FSDP = tuple(CONFIGS)
# HSDP: a 2 x 2 mesh (replicate x shard), four processes
HSDP = tuple(f"hsdp-{n}" for n in ("dense", "block2-T2-keep-unsharded", "toeplitz-sum-ikfac"))
CONFIGS.update({name: dict(CONFIGS[name[5:]], mesh_shape=(2, 2)) for name in HSDP})


def _shard(model, world, reshard=True, mp_policy=None, mesh_shape=None, per_linear=False):
    """fully_shard per block and on the root; a 2-D ``mesh_shape`` (replicate, shard): HSDP.

    ``per_linear``: every nn.Linear on its own first.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    shape = mesh_shape or (world,)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard")[-len(shape):])
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard,
                  mp_policy=mp_policy or MixedPrecisionPolicy())
    if per_linear:
        for module in [m for m in model.modules() if isinstance(m, nn.Linear)]:
            fully_shard(module, **kwargs)
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _train_rank(rank: int, world: int, cfg: dict) -> dict:
    dtype = cfg.get("dtype", torch.float64)
    model = _shard(make_tiny(dtype), world, cfg.get("reshard", True), cfg.get("mp_policy"),
                   cfg.get("mesh_shape"), cfg.get("per_linear", False))
    opt = sf.SINGD(model, params=list(model.parameters()), warn_unsupported=False,
                   loss_average=cfg["loss_average"],
                   **cfg["hp"])
    fn = loss_fn(cfg["loss_average"])
    calls = []
    for t in range(STEPS):
        x, y = batch(t, dtype)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        fn(model(x), y).backward()
        with count_calls(dist, ("all_reduce", "all_gather")) as counts:
            opt.step()
        calls.append(dict(counts))
    velocity_sharded = all(_fsdp.is_sharded(opt.state[p]["momentum_buffer"])
                           for p in model.parameters())
    factors_plain = all(not _fsdp.is_sharded(leaf) for st in opt.state.values() if "K" in st
                        for leaf in (*st["K"].leaves, *st["C"].leaves))
    return dict(
        params={k: v.full_tensor().detach() for k, v in model.named_parameters()},
        calls=calls, velocity_sharded=velocity_sharded, factors_plain=factors_plain,
        state_bytes=_state_bytes(opt),
    )


def _state_bytes(opt) -> dict:
    """Bytes this process holds: sharded velocity, replicated factors (and momenta)."""
    velocity = factors = 0
    for st in opt.state.values():
        v = st["momentum_buffer"]
        velocity += _fsdp.local(v).numel() * v.element_size()
        for key in ("K", "C", "m_K", "m_C"):
            if key in st:
                factors += sum(t.numel() * t.element_size() for t in st[key].leaves)
    return dict(velocity=velocity, factors=factors)


def _single_process(cfg: dict, world: int) -> dict:
    model = make_tiny()
    opt = sf.SINGD(model, params=list(model.parameters()), warn_unsupported=False,
                   loss_average=cfg["loss_average"],
                   **cfg["hp"])
    fn = loss_fn(cfg["loss_average"], world)
    for t in range(STEPS):
        x, y = batch(t)
        opt.zero_grad()
        fn(model(x), y).backward()
        opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}


def _split_work_refusal(world: int) -> str:
    model = _shard(make_tiny(), world)
    try:
        sf.SINGD(model, split_work=True, warn_unsupported=False)
    except ValueError as e:
        return str(e)
    return ""


def _transposed_kind_refusal(world: int) -> str:
    """A kind whose weight is stored [d_in, d_out] (GPT-2's Conv1D) cannot use row shards."""
    from tests.test_layers import CONV1D_KIND, Conv1D

    with sf.register_layer_kind(Conv1D, CONV1D_KIND):
        model = nn.Sequential(Conv1D(4, 6)).double()
        _shard_root(model, world)
        try:
            sf.SINGD(model, loss_average="batch", **BASE)
        except NotImplementedError as e:
            return str(e)
    return ""


def _shard_root(model, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))


def _all_configs(rank: int, world: int, names: tuple[str, ...]) -> dict:
    out = {name: _train_rank(rank, world, CONFIGS[name]) for name in names}
    out["split_work"] = _split_work_refusal(world)
    out["transposed"] = _transposed_kind_refusal(world)
    return out


@functools.cache
def _results(world: int, names: tuple[str, ...]):
    return run(functools.partial(_all_configs, names=names), world)


def _gathered_layers(cfg: dict, world: int) -> int:
    """How many layers' C mix rows across the shards (their G rows are all-gathered)."""
    model = make_tiny()
    C_type = get(cfg["hp"].get("structures", ("dense", "dense"))[1])
    count = 0
    for info in sf.find_layers(model):
        C = C_type.eye(info.d_C, dtype=torch.float64)
        chunk = -(-info.d_out // world)
        blocks = [_fsdp.row_block(C, min(r * chunk, info.d_out), min((r + 1) * chunk, info.d_out))
                  for r in range(world)]
        count += any(b is None for b in blocks)
    return count


def _check(name: str, world: int, results: list[dict]):
    cfg = CONFIGS[name]
    ranks = [r[name] for r in results]
    assert_same(ranks[0]["params"], _single_process(cfg, world))
    for r in ranks[1:]:
        for k, p in r["params"].items():
            assert torch.equal(p, ranks[0]["params"][k]), f"{k}: the processes diverged"
    assert all(r["velocity_sharded"] and r["factors_plain"] for r in ranks)
    T = cfg["hp"]["T"]
    gathers = int(_gathered_layers(cfg, cfg.get("mesh_shape", (world,))[-1]) > 0)
    for r in ranks:
        assert r["calls"] == [dict(all_reduce=int(t % T == 0), all_gather=gathers)
                              for t in range(STEPS)]


@pytest.mark.parametrize("name", FSDP)
def test_two_processes_equal_one_process(name):
    _check(name, 2, _results(2, FSDP))


def test_local_structures_need_no_gather():
    assert _gathered_layers(CONFIGS["diagonal-C"], 2) == 0
    assert 0 < _gathered_layers(CONFIGS["block2-T2-keep-unsharded"], 2) < 6
    assert _gathered_layers(CONFIGS["dense"], 2) == 6


def test_split_work_is_refused_with_the_fix():
    assert "drop split_work" in _results(2, FSDP)[0]["split_work"]


def test_a_kind_with_transposed_weight_storage_is_refused():
    assert "dim 0 is not the output rows" in _results(2, FSDP)[0]["transposed"]


def test_state_per_process_shards_the_velocity():
    ranks = [r["dense"] for r in _results(2, FSDP)]
    model = make_tiny()
    numel = sum(p.numel() for p in model.parameters())
    assert sum(r["state_bytes"]["velocity"] for r in ranks) == numel * 8
    assert ranks[0]["state_bytes"]["factors"] == ranks[1]["state_bytes"]["factors"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense", "diagonal-C", "block2-T2-keep-unsharded"])
def test_four_processes_equal_one_process(name):
    _check(name, 4, _results(4, ("dense", "diagonal-C", "block2-T2-keep-unsharded")))




@pytest.mark.slow
@pytest.mark.parametrize("name", list(HSDP))
def test_hsdp_four_processes_equal_one_process(name):
    """A 2 x 2 mesh (replicate x shard): rows sharded over 2, statistics reduced over 4."""
    _check(name, 4, _results(4, HSDP))


def _mixed_precision_rank(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    out = {}
    for reshard in (True, False):
        cfg = dict(loss_average="batch", dtype=torch.float32, reshard=reshard, mp_policy=policy,
                   hp=dict(BASE, structures=("dense", "diagonal")))
        out[str(reshard)] = _train_rank(rank, world, cfg)
    return out


def test_mixed_precision_bf16_params_fp32_reduce():
    """bf16 compute, fp32 master weights, factors and reduction: close to fp32 on one process."""
    results = run(_mixed_precision_rank, 2)
    model = make_tiny(torch.float32)
    opt = sf.SINGD(model, params=list(model.parameters()), warn_unsupported=False,
                   loss_average="batch",
                   **dict(BASE, structures=("dense", "diagonal")))
    fn = loss_fn("batch")
    for t in range(STEPS):
        x, y = batch(t, torch.float32)
        opt.zero_grad()
        fn(model(x), y).backward()
        opt.step()
    ref = {k: v.detach() for k, v in model.named_parameters()}
    start = make_tiny(torch.float32).state_dict()
    for reshard in ("True", "False"):
        params = results[0][reshard]["params"]
        for k, p in params.items():
            assert p.dtype == torch.float32
            assert torch.equal(p, results[1][reshard]["params"][k])
            moved = (ref[k] - start[k]).norm()
            err = (p - ref[k]).norm()
            assert err < 0.1 * moved, f"{k}: off by {err:.2e} of a move of {moved:.2e}"

"""A transformer (Embedding, TransformerEncoderLayer blocks, LayerNorm, Linear head) on FSDP2.

Two gloo processes shard the model with ``fully_shard`` per block and on the root; each
trains on its half of every batch with the drop-in ``SINGD(model)``. The reference is the
same optimizer on the unsharded model in this process on the whole batch (float64,
1e-10), and the processes must agree exactly. What the layer kinds bring to the row
shards (docs/distributed.md):

* ``nn.MultiheadAttention``: ``in_proj_weight`` [3E, E] and ``out_proj.weight`` are
  sharded on their output rows, as a Linear's; the kind's own forward reads the
  parameters FSDP2 has all-gathered for the block's forward.
* ``nn.Embedding``: its weight [V, d] is W^T of the layer's matrix, so FSDP2's dim 0 is
  the vocabulary, K's side; K is diagonal (the kind forces it), so D's columns of a
  shard's vocabulary need only that shard's rows of the gradient, whatever C is.
* a head tied to the embedding (``head.weight is emb.weight``): one parameter in the
  root's shard, preconditioned as the head's Linear rows.
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
from tests._multiprocess import count_calls, run
from tests.test_optim import BASE, assert_same

fsdp = pytest.importorskip("torch.distributed.fsdp")
VOCAB, WIDTH, HEADS, BATCH, SEQ, STEPS = 10, 8, 2, 4, 5, 3


class Transformer(nn.Module):
    def __init__(self, tied: bool):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(WIDTH, HEADS, 12, dropout=0.0, batch_first=True)
            for _ in range(2))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=not tied)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def make_model(tied: bool) -> nn.Module:
    torch.manual_seed(0)
    return Transformer(tied).double()


def batch(t: int):
    g = torch.Generator().manual_seed(3000 + t)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def loss(out, y):
    return F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))


CONFIGS = {
    # dense C: every row-sharded layer is gathered, the embedding (column shards) is not
    "dense": dict(tied=False, hp=dict(BASE)),
    # block2 C: row-local for the 4-row shards of the width-8 layers, gathered for the
    # 5-row shards of the head and for nothing else
    "block2-C-T2-tied": dict(tied=True, hp=dict(BASE, T=2, structures=("dense", "block2diagonal"))),
    # every attention module a fully_shard unit of its own: its parameters are resharded
    # by FSDP2's post-forward hook, after which the kind must not read them
    "per-attention-unit": dict(tied=False, per_attention=True, hp=dict(BASE)),
}


def _optimizer(model, cfg):
    return sf.SINGD(model, params=list(model.parameters()), warn_unsupported=False,
                    loss_average="batch+sequence", **cfg["hp"])


def _train_rank(rank: int, world: int, name: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    cfg = CONFIGS[name]
    model = make_model(cfg["tied"])
    mesh = init_device_mesh("cpu", (world,))
    if cfg.get("per_attention"):
        for block in model.blocks:
            fully_shard(block.self_attn, mesh=mesh)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = _optimizer(model, cfg)
    calls, gathered = [], set()
    real_gather = _fsdp._gather_rows

    def recording_gather(pending, d_out):
        gathered.update(name for name, _, _ in pending)
        return real_gather(pending, d_out)

    _fsdp._gather_rows = recording_gather
    try:
        for t in range(STEPS):
            x, y = (z.chunk(world)[rank] for z in batch(t))
            opt.zero_grad()
            loss(model(x), y).backward()
            with count_calls(dist, ("all_reduce", "all_gather")) as counts:
                opt.step()
            calls.append(dict(counts))
    finally:
        _fsdp._gather_rows = real_gather
    return dict(params={k: v.full_tensor().detach() for k, v in model.named_parameters()},
                layers=[info.name for info in opt.layers], calls=calls,
                gathered=sorted(gathered))


def _single_process(name: str) -> dict:
    cfg = CONFIGS[name]
    model = make_model(cfg["tied"])
    opt = _optimizer(model, cfg)
    for t in range(STEPS):
        x, y = batch(t)
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    return dict(params={k: v.detach() for k, v in model.named_parameters()},
                layers=[info.name for info in opt.layers])


@functools.cache
def _results(world: int):
    return run(lambda rank, w: {n: _train_rank(rank, w, n) for n in CONFIGS}, world)


def _check(name: str, world: int):
    ranks = [r[name] for r in _results(world)]
    ref = _single_process(name)
    assert ranks[0]["layers"] == ref["layers"]
    kinds = {n.split(".")[-1] for n in ref["layers"]}
    assert {"in_proj", "out_proj", "linear1", "linear2", "head"} <= kinds
    assert ("emb" in ref["layers"]) == (not CONFIGS[name]["tied"])  # tied: the head owns it
    assert_same(ranks[0]["params"], ref["params"])
    for r in ranks[1:]:
        for k, p in r["params"].items():
            assert torch.equal(p, ranks[0]["params"][k]), f"{k}: the processes diverged"
    T = CONFIGS[name]["hp"]["T"]
    # one statistics all_reduce on statistics steps, one all_gather of the mixed rows
    assert all(r["calls"] == [dict(all_reduce=int(t % T == 0), all_gather=1)
                              for t in range(STEPS)] for r in ranks)
    # the rows of a layer are gathered when its C mixes shards of ceil(d_out / W) rows;
    # the embedding's shards are columns (K's side, diagonal): never gathered
    d_out = dict(in_proj=3 * WIDTH, out_proj=WIDTH, linear1=12, linear2=WIDTH, head=VOCAB)
    if CONFIGS[name]["hp"].get("structures") is None:  # dense C
        expected = [n for n in ref["layers"] if n != "emb"]
    else:  # block2diagonal C
        expected = [n for n in ref["layers"] if -(-d_out[n.split(".")[-1]] // world) % 2]
    assert ranks[0]["gathered"] == sorted(expected)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_equal_one_process(name):
    _check(name, 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_four_processes_equal_one_process(name):
    _check(name, 4)

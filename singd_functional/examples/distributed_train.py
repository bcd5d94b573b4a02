"""Multi-process SINGD training in every data-parallel mode, launched with ``torchrun``.

One script, one process per device (CPU processes with gloo when there is no GPU)::

    # one machine, 2 processes (4 for HSDP: 2 replicas x 2 shards)
    cd singd_functional/examples
    torchrun --nproc-per-node 2 distributed_train.py --mode ddp
    torchrun --nproc-per-node 2 distributed_train.py --mode unwrapped
    torchrun --nproc-per-node 2 distributed_train.py --mode ddp --split-work
    torchrun --nproc-per-node 2 distributed_train.py --mode fsdp2
    torchrun --nproc-per-node 4 distributed_train.py --mode hsdp --replicas 2

    # save a distributed checkpoint every 10 steps (--save-every); the same command resumes
    torchrun --nproc-per-node 2 distributed_train.py --mode fsdp2 --checkpoint /tmp/singd_ckpt

    # several machines: the same script, on every node (node 0 is the rendezvous host)
    torchrun --nnodes 2 --node-rank $NODE_RANK --nproc-per-node 8 \\
        --rdzv-backend c10d --rdzv-endpoint $HOST0:29500 \\
        distributed_train.py --mode fsdp2

Modes (docs/distributed.md says what each sends per step):

* ``ddp``: ``DistributedDataParallel(model)``; SINGD reduces the statistics.
* ``unwrapped``: the plain model; SINGD's step reduces the gradients too (averaged for a
  mean loss), in the same collective as the statistics.
* ``fsdp2``: ``fully_shard`` per block and on the root; factors replicated, velocity
  and parameters sharded.
* ``hsdp``: ``fully_shard`` on a 2-D mesh (``--replicas`` x the rest).

``--split-work`` (ddp / unwrapped) gives each layer's factor update and preconditioning
to one process. Every mode trains the same model on the same data and prints the same
loss curve up to rounding.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import singd_functional as sf


class Block(nn.Module):
    """Pre-norm residual MLP block (a transformer block without attention)."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Model(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 32, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(vocab, d)
        self.blocks = nn.Sequential(*(Block(d) for _ in range(depth)))
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


def wrap(model: nn.Module, mode: str, replicas: int, device: torch.device) -> nn.Module:
    """The model as the mode runs it."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode in ("fsdp2", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        world = dist.get_world_size()
        if mode == "fsdp2":
            mesh = init_device_mesh(device.type, (world,))
        else:
            mesh = init_device_mesh(device.type, (replicas, world // replicas),
                                    mesh_dim_names=("replicate", "shard"))
        for block in model.get_submodule("blocks").children():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def batch(step: int, rank: int, world: int, per_rank: int, device):
    """This process's part of the step's global batch (a toy next-token task: +1 mod 32)."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, 32, (per_rank * world, 1), generator=g)
    tokens = (start + torch.arange(9)) % 32
    tokens = tokens.chunk(world)[rank]
    x = F.one_hot(tokens[:, :-1], 32).float()
    return x.to(device), tokens[:, 1:].to(device)


def train(args, device: torch.device | None = None) -> list[float]:
    """Train in an initialised process group; returns the global mean loss per step."""
    device = device or torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial model on every process
    model = Model().to(device)
    net = wrap(model, args.mode, args.replicas, device)
    opt = sf.SINGD(net, params=list(model.parameters()), warn_unsupported=False,
                   lr=args.lr, T=args.T,
                   loss_average="batch+sequence", structures=tuple(args.structures),
                   split_work=args.split_work)
    start = _resume(model, opt, args.checkpoint)
    losses = []
    for step in range(start, args.steps):
        x, y = batch(step, rank, world, args.batch, device)
        opt.zero_grad()
        loss = F.cross_entropy(net(x).reshape(-1, 32), y.reshape(-1))
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)  # for printing only
        losses.append(total.item() / world)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:.4f}", flush=True)
        if args.checkpoint and (step + 1) % args.save_every == 0:
            _save(model, opt, args.checkpoint)
    return losses


def _save(model, opt, path: str) -> None:
    """Model and optimizer state through torch.distributed.checkpoint (every process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def _resume(model, opt, path: str | None) -> int:
    """Load the checkpoint at ``path`` if there is one; the step to continue from."""
    if not path or not os.path.exists(os.path.join(path, ".metadata")):
        return 0
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return opt.param_groups[0]["step"]


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["ddp", "unwrapped", "fsdp2", "hsdp"], default="ddp")
    parser.add_argument("--split-work", action="store_true")
    parser.add_argument("--replicas", type=int, default=2, help="hsdp: replica groups")
    parser.add_argument("--structures", nargs=2, default=["dense", "dense"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="sequences per process")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--T", type=int, default=5)
    parser.add_argument("--checkpoint", default=None, help="a directory for dcp.save/load")
    parser.add_argument("--save-every", type=int, default=10)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    try:
        train(args, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

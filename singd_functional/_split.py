"""Work split across data-parallel processes (``SINGD(..., split_work=True)``).

Replicated data parallelism repeats every layer's factor update and preconditioning on
every process. With the split, each layer has one owner process:

    all processes   statistics all-reduced as before (one collective, t % T == 0)
    owner only      factor update of its layers (K, C, m_K, m_C) and D = C C^T G K K^T
    ONE all_gather  each process sends the D of its layers and, on statistics steps,
                    their new K, C, m_K, m_C; every process unpacks all of them
    all processes   the heavy-ball step on every parameter (elementwise, cheap)

(one all_gather per param group: the groups step one after the other). Every process
ends the step with the same parameters and the same, complete state (a checkpoint from
any process is whole). The owners are chosen once, by a cost model
of the per-step work (longest-first greedy onto the least-loaded process):

    cost = 2 (d_K s_C + d_C s_K)  +  4 (s_K^2 / d_K + s_C^2 / d_C) / T

with s the stored entries of a factor (``storage_numel``): the two structured products
of D per step, and the factor update's structured products (K m_K, the Grams, Pi)
amortised over T. For dense factors that is 2 d_K d_C (d_K + d_C) + 4 (d_K^3 + d_C^3)/T
flops up to a constant; diagonal factors cost O(d_K d_C) and are rarely worth moving.

What it costs: the all_gather moves, per process and step, about (W - 1)/W of all
layers' D (the size of the gradients) plus the owned factors every T steps; what it
saves: (W - 1)/W of the factor and preconditioning work. It pays when that work, not
the forward/backward pass or the network, bounds the step: wide dense layers, small T,
a fast interconnect (benchmarks/distributed_bench.py measures both).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .factors import Factors
from .layers import LayerInfo
from .precondition import layer_gradient_matrix, natural_gradient, split_layer_update
from .structures import StructuredMatrix
from .transform import SINGDState


def layer_cost(info: LayerInfo, K: StructuredMatrix, C: StructuredMatrix, T: int) -> float:
    """The cost model of the module docstring for one layer with factors like K, C."""
    s_K, s_C = K.storage_numel(), C.storage_numel()
    precondition = 2.0 * (info.d_K * s_C + info.d_C * s_K)
    factor_update = 4.0 * (s_K * s_K / info.d_K + s_C * s_C / info.d_C)
    return precondition + factor_update / T


def assign(costs: Mapping[str, float], world: int) -> dict[str, int]:
    """Owner process of each layer: largest cost first, onto the least-loaded process.

    Deterministic (ties broken by name and rank), so every process computes the same.
    """
    load = [0.0] * world
    owners = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += costs[name]
    return owners


def _payload(name: str, D_shape, state: SINGDState, updated: bool) -> list[tuple[Any, Any]]:
    """(shape, dtype) of what the owner of ``name`` sends: D, then the new factors."""
    K, C = state.factors[name]
    out = [(D_shape, None)]
    if updated:
        mats = [K, C, *(state.momenta[name] if name in state.momenta else ())]
        out += [(leaf.shape, leaf.dtype) for M in mats for leaf in M.leaves]
    return out


def split_update(
    layers: tuple[LayerInfo, ...],
    make_tx: Callable[[tuple[LayerInfo, ...]], Any],
    grads: Mapping[str, Tensor],
    state: SINGDState,
    params: Mapping[str, Tensor],
    *,
    owners: Mapping[str, int],
    group,
    statistics: Mapping[str, Any] | None,
    hyperparams,
    grad_scale=1.0,
):
    """``tx.update`` of the pure core with each layer's work done by its owner only.

    Args:
        layers: the layers of this update.
        make_tx: builds the group's pure transform over the given layers (called with
            ``()``: the factor update and the heavy-ball step without preconditioning).
        grads, state, params, statistics, hyperparams, grad_scale: as for ``tx.update``;
            the same on every process (the gradients and statistics are reduced).
        owners: per layer name, the rank (in ``group``) that does its work.
        group: the data-parallel process group.

    Returns:
        ``(updates, new_state)``, identical on every process.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    statistics = dict(statistics or {})
    tx = make_tx(())
    mine = {n: s for n, s in statistics.items() if owners[n] == rank}
    # Stage 4 for the owned layers only: a transform over no layers only updates factors
    _, factor_state = tx.update({}, state._replace(velocity={}), {}, statistics=mine or None,
                                hyperparams=hyperparams)

    G_of = {info.name: layer_gradient_matrix(info, grads) for info in layers
            if owners[info.name] == rank}
    by_rank: list[list[LayerInfo]] = [[] for _ in range(world)]
    for info in layers:
        by_rank[owners[info.name]].append(info)
    layouts = [[(info, _payload(info.name, (info.d_C, info.d_K), state, info.name in statistics))
                for info in infos] for infos in by_rank]
    sizes = [sum(_numel(shape) for _, payload in layout for shape, _ in payload)
             for layout in layouts]
    dtypes = [G.dtype for G in grads.values()]
    dtypes += [leaf.dtype for f in state.factors.values() for M in f for leaf in M.leaves]
    buf_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    device = next(iter(grads.values())).device

    sent = []
    for info, payload in layouts[rank]:
        K, C = factor_state.factors[info.name]
        D = natural_gradient(K, C, G_of[info.name], factor_state.products.get(info.name))
        sent.append(D.reshape(-1))
        if len(payload) > 1:
            mats = [*factor_state.factors[info.name],
                    *(factor_state.momenta.get(info.name) or ())]
            sent += [leaf.reshape(-1) for M in mats for leaf in M.leaves]
    width = max(sizes)
    mine_buf = torch.zeros(width, dtype=buf_dtype, device=device)
    if sent:
        flat = torch.cat([t.to(buf_dtype) for t in sent])
        mine_buf[: flat.numel()] = flat
    gathered = [torch.empty_like(mine_buf) for _ in range(world)]
    dist.all_gather(gathered, mine_buf, group=group)

    factors, momenta = dict(factor_state.factors), dict(factor_state.momenta)
    directions: dict[str, Tensor] = {}
    for r, layout in enumerate(layouts):
        offset = 0
        for info, payload in layout:
            pieces = []
            for shape, dtype in payload:
                n = _numel(shape)
                pieces.append((gathered[r][offset : offset + n].reshape(shape), dtype))
                offset += n
            D = pieces[0][0].to(grads[info.weight].dtype)  # the owner's own D round-trips exactly
            directions.update(split_layer_update(info, D, params))
            if r != rank and len(pieces) > 1:
                factors[info.name], momenta_new = _unpack(state, info.name, pieces[1:])
                if momenta_new is not None:
                    momenta[info.name] = momenta_new
    keys = list(state.velocity)
    updates, hb_state = tx.update(
        {k: directions.get(k, grads[k]) for k in keys},
        factor_state._replace(factors=factors, momenta=momenta, velocity=state.velocity),
        params, hyperparams=hyperparams, grad_scale=grad_scale,
    )
    return updates, hb_state._replace(count=state.count + 1)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _unpack(state: SINGDState, name: str, pieces) -> tuple[Factors, Factors | None]:
    """The new (K, C) and (m_K, m_C) of a layer from its owner's leaves, in state's types."""
    leaves = iter(t.to(dtype) for t, dtype in pieces)
    K, C = state.factors[name]
    new_K = type(K)(*(next(leaves) for _ in K.leaves))
    new_C = type(C)(*(next(leaves) for _ in C.leaves))
    if name not in state.momenta:
        return Factors(new_K, new_C), None
    m_K, m_C = state.momenta[name]
    new_mK = type(m_K)(*(next(leaves) for _ in m_K.leaves))
    new_mC = type(m_C)(*(next(leaves) for _ in m_C.leaves))
    return Factors(new_K, new_C), Factors(new_mK, new_mC)

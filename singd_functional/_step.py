"""The drop-in face's step (private): recordings -> statistics -> pure core -> parameters.

Per step: the parts recorded since the last step are accumulated per layer
(``statistics.accumulate``) and, with several processes, all-reduced in one buffer
(``_distributed``); then each param group's pure transform (``transform.singd``, built
from the group's static entries and cached) is called with the group's numbers of now
(``HyperParams``) and its updates are added to the parameters. No formula lives here.

Two variants of the last call share the step's work across processes: parameters
sharded by ``fully_shard`` go to ``_fsdp.sharded_update`` (row shards), and
``split_work`` to ``_split.split_update`` (one owner per layer). An unwrapped model's
gradients are reduced with the statistics (``_distributed.all_reduce_step``).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from . import _amp, _distributed, _fsdp, _options, _recording, _split
from ._groups import (
    LOCKED,
    Group,
    Layer,
    all_layers,
    check_weight,
    follow_params,
    group_transform,
    locked,
    store_factors,
)
from .factors import Factors
from .precondition import outer_products
from .statistics import LayerStatistics
from .transform import HyperParams, SINGDState


def step(optimizer) -> None:
    """One SINGD step over every param group (the body of ``SINGD.step``)."""
    if _amp.skipped(optimizer):
        _recording.drop(optimizer)  # GradScaler skips this step; so do the statistics
        optimizer._explicit_grad_scale = None
        return
    for grp, group in zip(optimizer._groups, optimizer.param_groups):
        check(grp, group)  # every group before any changes: a step is all or nothing
    with torch.no_grad(), _recording.no_autocast():
        grad_scale, statistics_scale = _amp.scales(optimizer, _recording.has_parts(optimizer))
        for layer in all_layers(optimizer._groups):
            follow_params(optimizer, layer)
        statistics = _statistics(optimizer, statistics_scale)
        for grp, group in zip(optimizer._groups, optimizer.param_groups):
            _update_group(optimizer, grp, group, statistics.get(grp.index, {}), grad_scale)
    optimizer._explicit_grad_scale = None


def check(grp: Group, group: dict) -> None:
    """Raise if param group ``grp.index`` cannot step as it is now set (changes nothing)."""
    where = f"param group {grp.index}"
    _options.check_group(where, group)
    now = locked(group)
    if now != grp.locked:
        raise ValueError(
            f"{where}: {dict(zip(LOCKED, now))} changed after the "
            f"optimizer was built (was {dict(zip(LOCKED, grp.locked))}); the factors "
            "cannot change structure: build a new optimizer instead"
        )
    if grp.layers and not grp.keeps_momenta and not group["kfac_like"] and group["alpha1"] != 0:
        raise ValueError(
            f"{where} was built with alpha1=0 (no Riemannian momenta kept); "
            "it cannot be raised later: build the optimizer with alpha1 > 0"
        )
    for layer in grp.layers:
        check_weight(grp, layer)


def _statistics(optimizer, statistics_scale) -> dict[int, dict[str, LayerStatistics]]:
    """Per due group, per layer with a gradient: its accumulated (and reduced) statistics."""
    parts = _recording.take(optimizer)
    ratio = None
    if statistics_scale is not None:
        scale = float(statistics_scale)
        if scale != optimizer._statistics_scale:
            ratio = (optimizer._statistics_scale / scale) ** 2
        optimizer._statistics_scale = scale

    entries: list[tuple[Group, Layer, _distributed.LocalStatistics, object]] = []
    for grp, group in zip(optimizer._groups, optimizer.param_groups):
        if group["step"] % group["T"] != 0:
            continue
        for layer in grp.layers:
            layer_parts = parts.get(layer.name)
            stats = None
            if layer_parts and grp.weight(layer).grad is not None:
                stats = _recording.combine(layer_parts, group["loss_average"])
                if ratio is not None:  # H_C was divided by the expected scale squared
                    stats = LayerStatistics(stats.H_K, stats.H_C * ratio)
            local = _distributed.LocalStatistics(
                stats,
                sum(p.rows for p in layer_parts or ()),
                sum(p.loss_terms for p in layer_parts or ()),
            )
            entries.append((grp, layer, local, group["loss_average"]))

    process_group = _distributed.resolve_group(optimizer.process_group)
    if process_group is None:
        reduced = [local.stats for _, _, local, _ in entries]
    else:
        templates = []
        for grp, layer, local, loss_average in entries:
            state = optimizer.state[grp.weight(layer)]
            zeros = LayerStatistics(state["K"].map(torch.zeros_like),
                                    state["C"].map(torch.zeros_like))
            templates.append((zeros, local, loss_average))
        grads = _gradients_to_reduce(optimizer)
        reduced, summed = _distributed.all_reduce_step(templates, grads, process_group)
        for (p, g, _), total in zip(grads, summed):
            if g is not None and total is not None:
                g.copy_(total)
            else:
                p.grad = total

    out: dict[int, dict[str, LayerStatistics]] = {}
    unrecorded = []
    for (grp, layer, _, _), stats in zip(entries, reduced):
        if stats is not None:
            out.setdefault(grp.index, {})[layer.name] = stats
        elif grp.weight(layer).grad is not None and layer.name not in optimizer._unrecorded:
            unrecorded.append(layer.name)
    if unrecorded:
        optimizer._unrecorded.update(unrecorded)
        warnings.warn(
            f"SINGD: layers {unrecorded} have gradients but recorded no statistics: their "
            "modules were not called in forward (a weight used directly, as in "
            "F.linear(x, m.weight), is no layer call), so their factors keep their values "
            "(the identity until then). Call the module, or pass its parameters to "
            "another optimizer",
            stacklevel=4,
        )
    return out


def _update_group(optimizer, grp: Group, group: dict, statistics: dict, grad_scale) -> None:
    active = tuple(l for l in grp.layers if grp.weight(l).grad is not None)
    layer_keys = {k for l in grp.layers for k in l.info.params}
    keys = [k for l in active for k in l.info.params]
    keys += [k for k, p in grp.params.items() if k not in layer_keys and p.grad is not None]
    if not keys:
        group["step"] += 1
        return
    st_of = optimizer.state
    for k in keys:
        p, st = grp.params[k], st_of[grp.params[k]]
        v = st["momentum_buffer"]
        if v.dtype != p.dtype or v.device != p.device:
            st["momentum_buffer"] = v.to(dtype=p.dtype, device=p.device)

    # a frozen bias beside a trained weight: a zero column in G, and no update
    no_grad = {k for k in keys if grp.params[k].grad is None}
    grads: dict[str, Tensor] = {
        k: torch.zeros_like(grp.params[k]) if k in no_grad else grp.params[k].grad  # type: ignore[misc]
        for k in keys}
    params = {k: grp.params[k].detach() for k in keys}
    layer_state = {l.name: st_of[grp.weight(l)] for l in active}
    factors = {n: Factors(s["K"], s["C"]) for n, s in layer_state.items()}
    state = SINGDState(
        count=torch.tensor(group["step"]),
        factors=factors,
        momenta={n: Factors(s["m_K"], s["m_C"]) for n, s in layer_state.items() if "m_K" in s},
        velocity={k: st_of[grp.params[k]]["momentum_buffer"] for k in keys},
        fallback=(),
        products=_cached_products(active, factors) if group["T"] > 1 else {},
    )
    statistics = {n: s for n, s in statistics.items() if n in layer_state}
    options = dict(statistics=statistics or None, grad_scale=grad_scale,
                   hyperparams=hyperparams(grp, group, due=bool(statistics)))
    infos = tuple(l.info for l in active)
    split_group = _distributed.resolve_group(optimizer.process_group) \
        if optimizer.split_work else None  # (refused for fully_shard models in SINGD())

    def make_tx(layer_infos):
        return group_transform(grp, group, tuple(l for l in active if l.info in layer_infos))

    if any(_fsdp.is_sharded(p) for p in params.values()):  # fully_shard: on row shards
        updates, new = _fsdp.sharded_update(infos, make_tx, grads, state, params, **options)
    elif split_group is not None:  # each layer's work on its owner, one all_gather
        updates, new = _split.split_update(
            infos, make_tx, grads, state, params,
            owners=_owners(optimizer, split_group), group=split_group, **options,
        )
    else:
        updates, new = group_transform(grp, group, active).update(
            grads, state, params, **options
        )
    for k in keys:
        if k in no_grad:
            continue
        p = grp.params[k]
        _fsdp.local(p).add_(updates[k].to(p.dtype))  # a sharded p: its rows
        st_of[p]["momentum_buffer"] = new.velocity[k]
    for name, st in layer_state.items():
        store_factors(st, new.factors[name], new.momenta.get(name))
    for layer in active:
        if layer.name in new.products:
            layer.products = new.products[layer.name]
    group["step"] += 1


def _gradients_to_reduce(optimizer) -> list[tuple[Tensor, Tensor | None, bool]]:
    """(parameter, local gradient, summed?) of every parameter, if the step reduces them.

    It does for an unwrapped model (``reduce_gradients`` None: neither wrapped in
    DistributedDataParallel nor sharded by fully_shard, which reduce them already).
    """
    reduce = optimizer.reduce_gradients
    if reduce is None:
        reduce = not isinstance(optimizer.model, DistributedDataParallel) and not any(
            _fsdp.is_sharded(p) for grp in optimizer._groups for p in grp.params.values()
        )
    if not reduce:
        return []
    return [(p, p.grad, group["loss_average"] is None)
            for grp, group in zip(optimizer._groups, optimizer.param_groups)
            for p in grp.params.values()]


def _owners(optimizer, process_group) -> dict[str, int]:
    """The owner rank of every layer under ``split_work`` (chosen once per world size)."""
    world = torch.distributed.get_world_size(process_group)
    if optimizer._split_owners is None or optimizer._split_owners[0] != world:
        costs = {}
        for grp, group in zip(optimizer._groups, optimizer.param_groups):
            for layer in grp.layers:
                st = optimizer.state[grp.weight(layer)]
                costs[layer.name] = _split.layer_cost(layer.info, st["K"], st["C"], group["T"])
        optimizer._split_owners = (world, _split.assign(costs, world))
    return optimizer._split_owners[1]


def _cached_products(active: tuple[Layer, ...], factors: dict[str, Factors]) -> dict:
    """K K^T and C C^T of each layer, recomputed where missing or out of date."""
    out = {}
    for layer in active:
        K, C = factors[layer.name]
        cached = layer.products
        fresh = cached is not None and all(
            cached[k].dtype == M.dtype and cached[k].device == M.device
            for k, M in (("K", K), ("C", C)) if k in cached
        )
        out[layer.name] = cached if fresh else outer_products(K, C)
    return out


def hyperparams(grp: Group, group: dict, due: bool) -> HyperParams:
    """The group's numbers now (lr_cov is only evaluated when the factors update)."""
    lr_cov = group["lr_cov"]
    alpha1 = group["alpha1"] if grp.keeps_momenta else None
    return HyperParams(
        lr=group["lr"], momentum=group["momentum"], damping=group["damping"],
        alpha1=alpha1, weight_decay=group["weight_decay"],
        lr_cov=(lr_cov(group["step"]) if callable(lr_cov) else lr_cov) if due else None,
    )

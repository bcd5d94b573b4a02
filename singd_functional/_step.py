"""The drop-in face's step (private): recordings -> statistics -> pure core -> parameters.

Per step: the parts recorded since the last step are accumulated per layer
(``statistics.accumulate``) and, with several processes, all-reduced in one buffer
(``_distributed``); then each param group's pure transform (``transform.singd``, built
from the group's static entries and cached) is called with the group's numbers of now
(``HyperParams``) and its updates are added to the parameters. No formula lives here.
"""

from __future__ import annotations

import torch

from . import _amp, _distributed, _recording
from ._groups import (
    LOCKED,
    Group,
    Layer,
    all_layers,
    follow_params,
    group_transform,
    locked,
    store_factors,
)
from .factors import Factors
from .precondition import outer_products
from .statistics import LayerStatistics, accumulate
from .transform import HyperParams, SINGDState


def step(optimizer) -> None:
    """One SINGD step over every param group (the body of ``SINGD.step``)."""
    if _amp.skipped(optimizer):
        _recording.drop(optimizer)  # GradScaler skips this step; so do the statistics
        optimizer._explicit_grad_scale = None
        return
    with torch.no_grad(), _recording.no_autocast():
        grad_scale, statistics_scale = _amp.scales(optimizer, _recording.has_parts(optimizer))
        for layer in all_layers(optimizer._groups):
            follow_params(optimizer, layer)
        statistics = _statistics(optimizer, statistics_scale)
        for grp, group in zip(optimizer._groups, optimizer.param_groups):
            _update_group(optimizer, grp, group, statistics.get(grp.index, {}), grad_scale)
    optimizer._explicit_grad_scale = None


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
                stats = accumulate([p.stats for p in layer_parts], group["loss_average"])
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
        reduced = _distributed.all_reduce_statistics(templates, process_group)

    out: dict[int, dict[str, LayerStatistics]] = {}
    for (grp, layer, _, _), stats in zip(entries, reduced):
        if stats is not None:
            out.setdefault(grp.index, {})[layer.name] = stats
    return out


def _update_group(optimizer, grp: Group, group: dict, statistics: dict, grad_scale) -> None:
    index = grp.index
    now = locked(group)
    if now != grp.locked:
        raise ValueError(
            f"param group {index}: {dict(zip(LOCKED, now))} changed after the "
            f"optimizer was built (was {dict(zip(LOCKED, grp.locked))}); the factors "
            "cannot change structure: build a new optimizer instead"
        )
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
    grads = {k: torch.zeros_like(grp.params[k]) if k in no_grad else grp.params[k].grad
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
    updates, new = group_transform(grp, group, active).update(
        grads, state, params,
        statistics=statistics or None,
        hyperparams=hyperparams(grp, group, due=bool(statistics)),
        grad_scale=grad_scale,
    )
    for k in keys:
        if k in no_grad:
            continue
        p = grp.params[k]
        p.add_(updates[k].to(p.dtype))
        st_of[p]["momentum_buffer"] = new.velocity[k]
    for name, st in layer_state.items():
        store_factors(st, new.factors[name], new.momenta.get(name))
    for layer in active:
        if layer.name in new.products:
            layer.products = new.products[layer.name]
    group["step"] += 1


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
    alpha1 = None
    if grp.keeps_momenta:
        alpha1 = group["alpha1"]
    elif not group["kfac_like"] and group["alpha1"] != 0:
        raise ValueError(
            f"param group {grp.index} was built with alpha1=0 (no Riemannian momenta kept); "
            "it cannot be raised later: build the optimizer with alpha1 > 0"
        )
    return HyperParams(
        lr=group["lr"], momentum=group["momentum"], damping=group["damping"],
        alpha1=alpha1, weight_decay=group["weight_decay"],
        lr_cov=(lr_cov(group["step"]) if callable(lr_cov) else lr_cov) if due else None,
    )

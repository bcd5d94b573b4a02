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

A group without statistics this step (otherwise) takes the core's preconditioning stage
alone and does weight decay, heavy-ball, lr and the parameter update in place, fused
over its parameters (``_lean_update``): the core's numbers to a rounding (the
heavy-ball's, as torch.optim.SGD rounds it), without its fresh tensors per parameter.
A group with statistics does the same after its factor update, which the eager drop-in
(no ``compile=``) writes layer by layer into the state's own tensors
(``_update_factors_``): one layer's temporaries alive at a time, no second copy of the
factors.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from . import _amp, _distributed, _fsdp, _options, _recording, _split, guard
from ._groups import (
    LOCKED,
    Group,
    Layer,
    check_weight,
    follow_weight,
    group_directions,
    group_transform,
    locked,
    store_factors,
)
from .factors import Factors
from .fallbacks import _check_velocity, _decayed_, _descend_, _heavy_ball_
from .precondition import outer_products
from .statistics import LayerStatistics
from .transform import HyperParams, SINGDState


def step(optimizer) -> None:
    """One SINGD step over every param group (the body of ``SINGD.step``).

    A step whose gradients or statistics are not finite changes nothing (``guard``):
    decided on the device, once for all groups and, under DDP, identically on every
    process. ``group["step"]`` counts the call all the same (it schedules T and
    ``lr_cov(t)`` and lives on the host, which cannot know the verdict without waiting).

    Groups without statistics this step: their directions are computed first and
    checked (a non-finite gradient shows in its direction; ``_lean_directions``), so the
    verdict is known before their update and enters as numbers: the directions made
    finite and weighted by ok (``_lean_update``), lr times ok, momentum 1 where not ok;
    then v <- 1 v + 0 and the update -0 v leave everything as it was, at the cost of one
    check and one cheap pass over the directions. (Under split_work their gradients are
    checked instead and zeroed in place, ``guard.zero_where_not_``, and lr and weight
    decay gated.) Groups with statistics, eagerly: the verdict takes their gradients and
    statistics, then each layer's factors are written where ok (``_update_factors_``: a
    layer whose update overflows from finite statistics keeps its factors, the step
    goes on), and their directions follow as above (made finite; weighted by ok). Under
    fully_shard or split_work they take the core's update first; the verdict takes its
    new factors, momenta and buffers, and each changed tensor is selected with
    ``torch.where`` (``_apply``).
    """
    for grp, group in zip(optimizer._groups, optimizer.param_groups):
        check(grp, group)  # every group before any changes: a step is all or nothing
    skips = optimizer._skips
    skips.warn_once()
    with torch.no_grad(), _recording.no_autocast():
        grad_scale, statistics_scale = _amp.scales(optimizer, _recording.has_parts(optimizer))
        for grp, group in zip(optimizer._groups, optimizer.param_groups):
            for layer in grp.layers:  # (their weights were checked above)
                w = grp.weight(layer)
                follow_weight(optimizer.state[w], w, group["preconditioner_dtype"])
        statistics, present, flag = _statistics(optimizer, statistics_scale)
        plans = [_plan(optimizer, grp, group, statistics.get(grp.index, {}))
                 for grp, group in zip(optimizer._groups, optimizer.param_groups)]
        live = [(plan, group) for plan, group in zip(plans, optimizer.param_groups) if plan]
        # (not yet under fully_shard: its DTensor updates would need a DTensor verdict)
        sharded = any(_fsdp.is_sharded(p) for plan, _ in live for p in plan.params.values())
        guarded = optimizer._guard and bool(live) and not sharded
        # plain groups step in place (_lean_update), guarded or not, so that the guard
        # changes no bit of a kept step; fully_shard / split_work keep the core's path
        lean = optimizer._lean and not sharded and not optimizer.split_work
        del statistics  # (the plans hold them: each layer's is let go once it is used)
        in_place = [n for n, (plan, _) in enumerate(live) if plan.statistics and lean]
        # the directions of the plain groups first, checked while in cache (one verdict
        # for all groups: it also takes the new state of the groups with statistics)
        directions = {n: _lean_directions(plan, group, grad_scale, guarded)
                      for n, (plan, group) in enumerate(live) if lean and not plan.statistics}
        ok = _verdict(optimizer, [plan for n, (plan, _) in enumerate(live)
                                  if n in in_place or not (plan.statistics or lean)],
                      flag) if guarded else None
        results: dict[int, tuple] = {}
        for n, (plan, group) in enumerate(live):
            if n not in in_place and (plan.statistics or not (guarded or lean)):
                results[n] = _update(optimizer, plan, group, grad_scale, None)
        if guarded:
            changed = [leaf for n, (_, new) in results.items()
                       for leaf, _ in guard.changed_leaves(new, live[n][0].state)]
            changed += [t for n in in_place for stats in live[n][0].statistics.values()
                        for M in stats for t in M.leaves]
            ok = guard.every([ok, *(finite for _, finite in directions.values()),
                              guard.all_finite(changed) if changed else None])
            del changed
        for n in in_place:  # written where ok; their directions are made finite (gated)
            _update_factors_(optimizer, *live[n], ok, present)
            directions[n] = _lean_directions(*live[n], grad_scale, guarded)
        selected = set(results) if ok is not None else set()
        for n, (plan, group) in enumerate(live):
            if n in directions:
                _lean_update(plan, *directions[n][0], ok)  # applied in place
            elif n not in results:
                results[n] = _update(optimizer, plan, group, grad_scale, ok)
        for n, (plan, _) in enumerate(live):
            if n in results:
                updates, new = results[n]
                _apply(optimizer, plan, updates, new, ok if n in selected else None, present)
        for group in optimizer.param_groups:
            group["step"] += 1
        if ok is not None:
            skips.add(~ok)
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


def _verdict(optimizer, plans, flag) -> Tensor | None:
    """0-d bool: the gradients of ``plans`` finite, GradScaler agrees, no process saw a bad
    statistic; None when there is nothing to check."""
    grads = [g for plan in plans for g in plan.grads.values()]
    found_inf = _amp.found_inf(optimizer)
    return guard.every([
        guard.all_finite(grads) if grads else None,
        None if found_inf is None else found_inf == 0,
        None if flag is None else flag == 0,
    ])


def _statistics(optimizer, statistics_scale):
    """Per due group, per layer with a gradient: its accumulated (and reduced) statistics.

    Returns ``(statistics, present, flag)``: ``present`` maps the layers this process
    had no statistics for to a 0-d bool (did any process have some? DDP only), and
    ``flag`` is the number of processes whose statistics were not finite (0-d, DDP
    only, reduced in the statistics' one collective); both None / empty otherwise.
    Nothing is read back to the host.
    """
    parts = _recording.take(optimizer)
    ratio = None
    if statistics_scale is not None:
        old = optimizer._statistics_scale
        if isinstance(statistics_scale, Tensor) or isinstance(old, Tensor):
            ratio = (old / statistics_scale) ** 2  # on the device: powers of 2 stay exact
        elif statistics_scale != old:
            ratio = (old / statistics_scale) ** 2
        optimizer._statistics_scale = statistics_scale

    entries: list[tuple[Group, Layer, _distributed.LocalStatistics, object]] = []
    for grp, group in zip(optimizer._groups, optimizer.param_groups):
        if group["step"] % group["T"] != 0:
            continue
        for layer in grp.layers:
            layer_parts = parts.get(layer.name) or []
            stats = None
            if layer_parts and grp.weight(layer).grad is not None:
                stats = _recording.combine(layer_parts, group["loss_average"])
                if stats is not None and ratio is not None:
                    # H_C was divided by the expected scale squared
                    stats = LayerStatistics(stats.H_K, stats.H_C * ratio)
            local = _distributed.LocalStatistics(
                stats,
                sum(p.rows for p in layer_parts),
                sum(p.loss_terms for p in layer_parts),
            )
            entries.append((grp, layer, local, group["loss_average"]))

    present: dict[str, Tensor] = {}
    flag = None
    process_group = _distributed.resolve_group(optimizer.process_group)
    if process_group is None:
        reduced = [(local.stats, None) for _, _, local, _ in entries]
    else:
        templates = []
        for grp, layer, local, loss_average in entries:
            state = optimizer.state[grp.weight(layer)]
            zeros = LayerStatistics(state["K"].map(torch.zeros_like),
                                    state["C"].map(torch.zeros_like))
            templates.append((zeros, local, loss_average))
        if templates:
            mine = [t for _, _, local, _ in entries if local.stats is not None
                    for M in local.stats for t in M.leaves]
            anchor = templates[0][0].H_K.device
            flag = (~guard.all_finite(mine, device=anchor)).to(torch.float32)
        grads = _gradients_to_reduce(optimizer)
        reduced, summed = _distributed.all_reduce_step(templates, grads, process_group,
                                                       nonfinite=flag)
        for (p, g, _), total in zip(grads, summed):
            if g is not None and total is not None:
                g.copy_(total)
            else:
                p.grad = total

    out: dict[int, dict[str, LayerStatistics]] = {}
    unrecorded = []
    for (grp, layer, _, _), (stats, here) in zip(entries, reduced):
        if stats is not None:
            out.setdefault(grp.index, {})[layer.name] = stats
            if here is not None:
                present[layer.name] = here
        elif (grp.weight(layer).grad is not None and not parts.get(layer.name)
              and layer.name not in optimizer._unrecorded):
            unrecorded.append(layer.name)  # (an empty batch did record: no warning)
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
    return out, present, flag


class _Plan(NamedTuple):
    grp: Group
    keys: list
    no_grad: set
    grads: dict
    params: dict
    layer_state: dict
    state: SINGDState
    statistics: dict
    active: tuple
    old_products: dict  # K K^T, C C^T of the updating layers, for a skipped step (_apply)


def _plan(optimizer, grp: Group, group: dict, statistics: dict) -> _Plan | None:
    """What the group's update needs, read from the optimizer; nothing is changed here."""
    named = grp.params
    active = tuple(l for l in grp.layers if named[l.info.weight].grad is not None)
    keys = [k for l in active for k in l.info.params]
    keys += [k for k in grp.plain if named[k].grad is not None]
    if not keys:
        return None
    # one pass over the keys, one state lookup each (Python per key and layer is a
    # large part of a small model's plain step)
    st_of = optimizer.state
    states, grads, params, velocity = {}, {}, {}, {}
    no_grad = set()  # a frozen bias beside a trained weight: a zero column in G, no update
    for k in keys:
        p = named[k]
        st = states[k] = st_of[p]
        v = st["momentum_buffer"]
        if v.dtype != p.dtype or v.device != p.device:
            v = st["momentum_buffer"] = v.to(dtype=p.dtype, device=p.device)
        velocity[k] = v
        g = p.grad
        if g is None:
            no_grad.add(k)
            g = torch.zeros_like(p)
        grads[k] = g
        params[k] = p.detach()
    layer_state = {l.name: states[l.info.weight] for l in active}
    factors = {n: Factors(s["K"], s["C"]) for n, s in layer_state.items()}
    statistics = {n: s for n, s in statistics.items() if n in layer_state}
    # a guarded statistics step keeps the updating layers' old products aside (not passed
    # to the core) so that a skipped step gets them back without building them again
    old_products = {l.name: l.products for l in active
                    if l.name in statistics and _fresh(l.products, factors[l.name])} \
        if group["T"] > 1 and optimizer._guard and not optimizer.split_work else {}
    state = SINGDState(
        count=torch.tensor(group["step"]),
        factors=factors,
        momenta={n: Factors(s["m_K"], s["m_C"]) for n, s in layer_state.items() if "m_K" in s},
        velocity=velocity,
        fallback=(),
        products=_cached_products(active, factors, statistics) if group["T"] > 1 else {},
    )
    return _Plan(grp, keys, no_grad, grads, params, layer_state, state, statistics, active,
                 old_products)


def _gated(hp: HyperParams, gate: Tensor) -> HyperParams:
    """The numbers of a step that is a no-op where ``gate`` (0-d bool) is False, given
    zero directions there: lr and weight decay times the gate, momentum 1 where False."""
    wide = gate.to(torch.float64)
    lr, momentum, weight_decay = hp.lr, hp.momentum, hp.weight_decay
    assert lr is not None and momentum is not None and weight_decay is not None  # filled
    return hp._replace(
        lr=lr * wide,
        momentum=torch.where(gate, wide.new_full((), 0.0) + momentum
                             if isinstance(momentum, Tensor) else wide.new_full((), momentum),
                             1.0),
        weight_decay=weight_decay * wide if _nonzero(weight_decay) else weight_decay,
    )


def _update(optimizer, plan: _Plan, group: dict, grad_scale, gate: Tensor | None):
    """The group's pure update; with ``gate``, a no-op where the gate is False (``step``)."""
    hp = hyperparams(plan.grp, group, due=bool(plan.statistics))
    grads = plan.grads
    if gate is not None:
        # in place: finite gradients stay bit for bit, those of a skipped step become 0
        grads = {k: guard.zero_where_not_(gate, g) for k, g in grads.items()}
        hp = _gated(hp, gate)
    options = dict(statistics=plan.statistics or None, grad_scale=grad_scale, hyperparams=hp)
    grp, active = plan.grp, plan.active
    infos = tuple(l.info for l in active)
    split_group = _distributed.resolve_group(optimizer.process_group) \
        if optimizer.split_work else None  # (refused for fully_shard models in SINGD())

    def make_tx(layer_infos):
        return group_transform(grp, group, tuple(l for l in active if l.info in layer_infos))

    if any(_fsdp.is_sharded(p) for p in plan.params.values()):  # fully_shard: row shards
        return _fsdp.sharded_update(infos, make_tx, grads, plan.state, plan.params, **options)
    if split_group is not None:  # each layer's work on its owner, one all_gather
        return _split.split_update(
            infos, make_tx, grads, plan.state, plan.params,
            owners=_owners(optimizer, split_group), group=split_group, **options,
        )
    return group_transform(grp, group, active).update(grads, plan.state, plan.params, **options)


def _update_factors_(optimizer, plan: _Plan, group: dict, ok: Tensor | None, present: dict
                     ) -> None:
    """The factor update of a group with statistics, layer by layer into the state's own
    tensors (``step``), then their products; ``plan.state`` holds the new factors for
    the step's directions (``_lean_update``).

    Eagerly (no ``compile=``), each layer's statistics are the step's own (written over:
    its new momenta) and are let go with its temporaries before the next layer's
    update, so that one layer's work is alive at a time; the products are built from
    the factors written. Written where ``ok`` (and where some process had statistics,
    ``present``) and, guarded, where the layer's new factors and momenta are finite: a
    layer whose update overflows from finite statistics keeps its factors.
    """
    hp = hyperparams(plan.grp, group, due=True)
    update = group_directions(plan.grp, group, plan.active).update_layer
    state = plan.state
    # (compile=: a skipped layer gets its old products back; eagerly they are let go)
    old_products = dict(plan.old_products) if optimizer._kernels is not None else {}
    plan.old_products.clear()
    made: dict[str, tuple] = {}
    for name in list(plan.statistics):
        K_C, m, products = update(state.factors[name], state.momenta.get(name),
                                  plan.statistics.pop(name), hp.damping,
                                  0.0 if hp.alpha1 is None else hp.alpha1, hp.lr_cov)
        finite = None if ok is None else guard.all_finite(
            [t for M in (*K_C, *(m or ())) for t in M.leaves], device=ok.device)
        keep = guard.every([ok, present.get(name), finite])
        factors = _write_(keep, K_C, state.factors[name])
        momenta = None if m is None else _write_(keep, m, state.momenta[name])
        del K_C, m
        state.factors[name] = factors
        if momenta is not None:
            state.momenta[name] = momenta
        store_factors(plan.layer_state[name], factors, momenta)
        made[name] = (products, keep)
        del products
    if group["T"] > 1:  # the cached products (_cached_products), once all layers are done
        for name, (products, keep) in made.items():
            if products is None or (keep is not None and name not in old_products):
                products = outer_products(*state.factors[name])
            elif keep is not None:  # (compile=: the kernel's, or the old ones)
                products = guard.select(keep, products, old_products.pop(name))
            state.products[name] = products


def _write_(keep: Tensor | None, new: Factors, old: Factors) -> Factors:
    """``new`` where ``keep`` (0-d bool; None: everywhere), written into ``old``'s leaves
    where they can take it (contiguous, of its shapes and dtypes); else selected anew."""
    if keep is not None:  # old where not keep, else new: the guard's selection, into old
        return guard.select(~keep, old, new, into_new=True)
    leaves = [(n, o) for M, O in zip(new, old) for n, o in zip(M.leaves, O.leaves)]
    if not all(o.is_contiguous() and o.shape == n.shape and o.dtype == n.dtype
               for n, o in leaves):
        return new
    for n, o in leaves:
        if n is not o:
            o.copy_(n)
    return old


def _lean_directions(plan: _Plan, group: dict, grad_scale, guarded: bool
                     ) -> tuple[tuple[HyperParams, list, list[Tensor]], Tensor | None]:
    """The directions of a step without statistics, decayed: ``((hp, keys, directions),
    finite)``; with ``guarded``, made finite in place and ``finite`` (0-d bool) says
    whether they were (None otherwise).

    They come from the core's preconditioning stage (``group_directions``: C C^T G K K^T
    per layer, the gradient elsewhere), plus weight decay in place
    (``fallbacks._decayed_``). A non-finite gradient shows in its direction (NaN and inf
    propagate through the products, inf times 0 is NaN), so the directions are checked
    instead of the gradients: just written, they are in cache.
    """
    grp = plan.grp
    hp = hyperparams(grp, group, due=False)
    velocity = plan.state.velocity
    _check_velocity(plan.grads, velocity, plan.params)
    kron = group_directions(grp, group, plan.active)
    directions, _ = kron.step(plan.grads, plan.state, velocity, None, None, grad_scale,
                              hp.damping, hp.alpha1, None)
    keys = [k for k in plan.keys if k not in plan.no_grad]
    # a direction that is the gradient itself (no layer, no loss scale) is not ours
    d = [directions[k] if directions[k] is not plan.grads[k] else directions[k].clone()
         for k in keys]
    _decayed_(d, [plan.params[k] for k in keys], hp.weight_decay)
    finite = guard.all_finite_cleaned_(d) if guarded and d else None
    return (hp, keys, d), finite


def _lean_update(plan: _Plan, hp: HyperParams, keys: list, d: list, gate: Tensor | None) -> None:
    """A step without statistics, in place: ``_update`` + ``_apply`` to a rounding.

    Heavy-ball, lr and the parameter update in place on the directions of
    ``_lean_directions``, fused over the group's parameters (``fallbacks._heavy_ball_``,
    ``_descend_``), on the state's own momentum buffers. With ``gate`` (the directions
    then are finite), they are weighted by it, and lr and momentum gated (``_gated``): a
    skipped step changes nothing, bit for bit.
    """
    velocity = [plan.state.velocity[k] for k in keys]
    weight = None
    if gate is not None:
        hp, weight = _gated(hp, gate), gate.to(d[0].dtype) if d else None
    _heavy_ball_(velocity, d, hp.momentum, weight)
    _descend_([plan.params[k] for k in keys], velocity, hp.lr)
    for layer in plan.active:
        if layer.name in plan.state.products:
            layer.products = plan.state.products[layer.name]


def _nonzero(value) -> bool:
    return isinstance(value, Tensor) or value != 0


def _apply(optimizer, plan: _Plan, updates, new: SINGDState, ok: Tensor | None,
           present: dict) -> None:
    """Write the update into the parameters and the optimizer state.

    With ``ok`` (statistics steps), every changed tensor is ``torch.where``-selected on
    it; a layer that no process had statistics for (``present``, DDP) keeps its factors.
    """
    grp, st_of, old = plan.grp, optimizer.state, plan.state
    keep = {n: (present[n] if n in present else None) for n in plan.layer_state}
    if ok is not None:
        keep = {n: ok if k is None else ok & k for n, k in keep.items()}
        # (the core's buffers and updates are fresh tensors, ours to write into)
        new = new._replace(velocity=guard.select(ok, new.velocity, old.velocity,
                                                 into_new=True))
        updates = {k: guard.zero_where_not_(ok, u) for k, u in updates.items()}  # ours
    if any(k is not None for k in keep.values()):
        def pick(tree, old_tree):
            return {n: guard.select(keep[n], t, old_tree[n], into_new=True)
                    if keep.get(n) is not None and n in old_tree else t
                    for n, t in tree.items()}
        factors = pick(new.factors, old.factors)
        # the old products of the updating layers were set aside (not passed to the
        # core, which built the new ones from the new factors for this step's direction):
        # a skipped step selects them back, so the products are built once per step. A
        # layer with none set aside (split_work, a stale cache) has its products rebuilt
        # from the selected factors (the core's numbers where the step is kept).
        old_products = {**old.products, **plan.old_products}
        products = {n: outer_products(*factors[n])
                    if keep.get(n) is not None and n not in old_products else t
                    for n, t in new.products.items()}
        new = new._replace(factors=factors,
                           momenta=pick(new.momenta, old.momenta),
                           products=pick(products, old_products))
    for k in plan.keys:
        if k in plan.no_grad:
            continue
        p = grp.params[k]
        _fsdp.local(p).add_(updates[k].to(p.dtype))  # a sharded p: its rows
        st_of[p]["momentum_buffer"] = new.velocity[k]
    for name, st in plan.layer_state.items():
        store_factors(st, new.factors[name], new.momenta.get(name))
    for layer in plan.active:
        if layer.name in new.products:
            layer.products = new.products[layer.name]


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


def _cached_products(active: tuple[Layer, ...], factors: dict[str, Factors],
                     updating: dict) -> dict:
    """K K^T and C C^T of each layer, recomputed where missing or out of date.

    Layers in ``updating`` get new factors this step, and the core builds their new
    products from those: their old products are not passed to it and dropped here. An
    unguarded step so holds two d x d matrices less at its peak (dense factors); a
    guarded one has kept them aside in ``_plan`` (``old_products``) for a skipped step,
    which costs that memory and saves building them again (``_apply``).
    """
    out = {}
    for layer in active:
        if layer.name in updating:
            layer.products = None
            continue
        cached = layer.products
        out[layer.name] = cached if _fresh(cached, factors[layer.name]) \
            else outer_products(*factors[layer.name])
    return out


def _fresh(cached: dict | None, factors: Factors) -> bool:
    """Whether cached products are there, in the factors' dtypes and devices."""
    return cached is not None and all(
        cached[k].dtype == M.dtype and cached[k].device == M.device
        for k, M in (("K", factors.K), ("C", factors.C)) if k in cached
    )


def hyperparams(grp: Group, group: dict, due: bool) -> HyperParams:
    """The group's numbers now (lr_cov is only evaluated when the factors update)."""
    lr_cov = group["lr_cov"]
    alpha1 = group["alpha1"] if grp.keeps_momenta else None
    return HyperParams(
        lr=group["lr"], momentum=group["momentum"], damping=group["damping"],
        alpha1=alpha1, weight_decay=group["weight_decay"],
        lr_cov=(lr_cov(group["step"]) if callable(lr_cov) else lr_cov) if due else None,
    )

"""Data-parallel SINGD: statistics (and an unwrapped model's gradients) in one collective.

Who reduces the gradients decides what loss the W processes differentiate together:

    DDP / fully_shard (averaged gradients)     L_eff = (1/W) sum_w L_w
    unwrapped model, mean loss (step averages) L_eff = (1/W) sum_w L_w
    unwrapped model, sum loss  (step sums)     L_eff =       sum_w L_w

(L_w: the loss process w differentiated.) For an unwrapped model -- ``torch.distributed``
initialised, the model neither DDP-wrapped nor sharded -- the step reduces ``p.grad``
itself, as the official package does (it all-reduces the preconditioned gradients with
AVG for averaged losses and SUM for a sum loss; preconditioning is linear and the
factors agree on every process, so reducing the gradients first is the same). With
L_eff = s sum_w L_w the statistics below are L_eff's, which makes W processes equal to
one process that differentiates L_eff on the concatenated batch. Each process captured
its own output gradients g_w = dL_eff/dz / s, so with G_hat = c sum g g^T
(docs/algorithm.md#statistics) and A_hat a mean over a-rows:

    H_K = sum_w R_w H_K_w / sum_w R_w          R_w: a-rows of process w
    H_C = c s^2 sum_w H_C_w / c_w              c_w: loss terms of process w (statistics.
                                               loss_scale), c = sum_w c_w, or 1 for
                                               loss_average None

With equal local batches and a mean loss ("batch", "batch+sequence", a count) H_C is
the plain mean over processes; with a sum loss (None) it is sum_w H_C_w / W^2 under DDP
(the statistics of the sum loss divided by W that the averaged gradient belongs to) and
sum_w H_C_w for an unwrapped model. (The official package sums both factors for None,
which is difference 3 in
docs/algorithm.md#differences-from-the-official-package.)

Everything every process contributes in a step travels in ONE flat buffer per device
(one ``all_reduce``): statistics on steps with t % T == 0, an unwrapped model's
gradients on every step, and the row, loss-term and has-a-gradient counts, so nothing
syncs per layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .capture import LayerCapture
from .layers import LayerInfo
from .statistics import LayerStatistics, layer_statistics, part_counts

WORLD = "world"  # sentinel: the default process group, when one is initialised


class LocalStatistics(NamedTuple):
    """One layer's statistics on this process, with the counts the reduction weighs by.

    Attributes:
        stats: accumulated :class:`LayerStatistics`, or None when this process has none
            (the layer was not called, or got no gradient, here).
        rows: R_w, the number of a-rows (summed over the micro-batches).
        loss_terms: c_w, the loss-term count c of docs/algorithm.md#statistics (summed
            over micro-batches).
    """

    stats: LayerStatistics | None
    rows: float
    loss_terms: float


def counts(info: LayerInfo, capture: LayerCapture, kfac_approx: str, loss_average):
    """(R, c): a-rows and loss terms of one backward pass (``statistics.part_counts``)."""
    return part_counts(info, capture, kfac_approx, loss_average)


def resolve_group(process_group: Any):
    """The process group to reduce over, or None when there is nothing to reduce."""
    if process_group is None or not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if isinstance(process_group, str) and process_group == WORLD \
        else process_group
    return group if dist.get_world_size(group) > 1 else None


def _flat(stats: LayerStatistics) -> list[Tensor]:
    return [*stats.H_K.leaves, *stats.H_C.leaves]


def reduced_statistics(
    layers: tuple[LayerInfo, ...],
    factors: Mapping[str, Any],
    captures: Mapping[str, LayerCapture],
    group,
    *,
    kfac_approx: str = "expand",
    loss_average="batch",
    grad_scale=1.0,
) -> dict[str, LayerStatistics]:
    """Every layer's statistics from this process's captures, reduced over ``group``.

    The functional face's data-parallel statistics: pass the result to
    ``tx.update(..., statistics=...)`` with the averaged gradients, and W processes step
    like one on the concatenated batch (L_eff = (1/W) sum_w L_w, module docstring).
    One collective; a layer no process captured is left out (its factors are kept).

    Args:
        layers: the transform's layers, in the same order on every process.
        factors: per layer name, its current ``Factors`` (``state.factors``).
        captures: per layer name, this process's :class:`LayerCapture` (a layer may be
            missing here: this process then contributes nothing to it).
        group: a process group with more than one process (see :func:`resolve_group`).
        kfac_approx, loss_average, grad_scale: those of the transform.
    """
    entries = []
    for info in layers:
        K, C = factors[info.name]
        capture = captures.get(info.name)
        local = LocalStatistics(None, 0.0, 0.0)
        if capture is not None:
            stats = layer_statistics(info, K, C, capture, kfac_approx=kfac_approx,
                                     loss_average=loss_average, grad_scale=grad_scale)
            local = LocalStatistics(stats, *counts(info, capture, kfac_approx, loss_average))
        zeros = LayerStatistics(K.map(torch.zeros_like), C.map(torch.zeros_like))
        entries.append((zeros, local, loss_average))
    reduced = all_reduce_statistics(entries, group)
    # a layer this process did not capture: kept when some process did (a host read, in
    # that case only)
    return {info.name: stats for info, (stats, here) in zip(layers, reduced)
            if stats is not None and (here is None or bool(here))}


def all_reduce_statistics(
    entries: list[tuple[LayerStatistics, LocalStatistics, Any]], group,
    nonfinite: Tensor | None = None,
) -> list[tuple[LayerStatistics | None, Tensor | None]]:
    """Reduce every layer's statistics over ``group``, in one collective.

    :func:`all_reduce_step` without gradients (the model is wrapped in DDP or sharded).
    """
    return all_reduce_step(entries, [], group, nonfinite=nonfinite)[0]


def all_reduce_step(
    entries: list[tuple[LayerStatistics, LocalStatistics, Any]],
    grads: list[tuple[Tensor, Tensor | None, bool]],
    group,
    nonfinite: Tensor | None = None,
) -> tuple[list[tuple[LayerStatistics | None, Tensor | None]], list[Tensor | None]]:
    """Reduce the statistics (module docstring) and, for an unwrapped model, the gradients.

    Everything travels in one flat buffer per device: one ``all_reduce`` per step. The
    counts are divided on the device, so nothing is read back to the host (except a
    parameter without a local gradient: whether another process had one).

    Args:
        entries: per layer, in the same order on every process: a template (zeros of the
            right structures, dtypes and devices, used when this process has no
            statistics for the layer), its :class:`LocalStatistics`, and its
            ``loss_average``.
        grads: per parameter, in the same order on every process: the parameter, its
            local gradient (None: none on this process) and whether the gradients are
            summed (a sum loss) rather than averaged. Empty when the model is wrapped in
            DDP or sharded: the gradients are then the averaged ones already. With a
            summed gradient the differentiated loss is sum_w L_w, so its layers' H_C
            is sum_w H_C_w (``c / W^2`` becomes 1).
        group: a process group with more than one process.
        nonfinite: optional 0-d float tensor, this process's count of non-finite
            statistics; it rides in the same buffer and is replaced in place by the sum
            over processes, so every process takes the same skip decision.

    Returns:
        Per entry, ``(statistics of L_eff, present)``: ``present`` is None when this
        process had statistics for the layer, else a 0-d bool tensor saying whether any
        process had (when none had, the statistics are zeros and must not be used); per
        gradient, the mean (or sum) over the processes, or None when no process had one.
    """
    W = dist.get_world_size(group)
    unwrapped = bool(grads)  # the gradients are reduced here: a sum loss's are summed
    by_device: dict[torch.device, tuple[list[int], list[int]]] = {}
    for i, (template, _, _) in enumerate(entries):
        by_device.setdefault(template.H_K.device, ([], []))[0].append(i)
    for j, (p, _, _) in enumerate(grads):
        by_device.setdefault(p.device, ([], []))[1].append(j)

    out: list[tuple[LayerStatistics | None, Tensor | None]] = [(None, None)] * len(entries)
    reduced_grads: list[Tensor | None] = [None] * len(grads)
    for n_device, (device, (idx, gidx)) in enumerate(by_device.items()):
        leaves = [leaf for i in idx for leaf in _flat(entries[i][0])]
        leaves += [grads[j][0] for j in gidx]
        wide = any(leaf.dtype == torch.float64 for leaf in leaves)
        buf_dtype = torch.float64 if wide else torch.float32
        parts, shapes, counts = [], [], []
        for i in idx:
            template, local, _ = entries[i]
            if local.stats is None:
                contribution = [torch.zeros_like(t) for t in _flat(template)]
                counts += [0.0, 0.0]
            else:
                weighted = LayerStatistics(
                    local.stats.H_K * local.rows, local.stats.H_C * (1.0 / local.loss_terms)
                )
                contribution = _flat(weighted)
                counts += [float(local.rows), local.loss_terms]
            shapes.append([(t.shape, t.dtype) for t in contribution])
            parts += [t.reshape(-1).to(buf_dtype) for t in contribution]
        for j in gidx:
            p, g, _ = grads[j]
            parts.append((torch.zeros_like(p) if g is None else g).reshape(-1).to(buf_dtype))
            counts += [float(g is not None), 0.0]
        parts.append(_counts_on(device, counts, buf_dtype))
        flag = nonfinite if n_device == 0 else None  # rides on the first device's buffer
        if flag is not None:
            parts.append(flag.reshape(1).to(device=device, dtype=buf_dtype))
        buf = torch.cat(parts)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        if flag is not None:
            flag.copy_(buf[-1])
            buf = buf[:-1]

        totals = buf[-len(counts):].reshape(-1, 2)
        offset = 0
        for k, i in enumerate(idx):
            template, local, loss_average = entries[i]
            leaves = []
            for shape, _ in shapes[k]:
                n = shape.numel()
                leaves.append(buf[offset : offset + n].reshape(shape))
                offset += n
            rows, loss_terms = totals[k, 0], totals[k, 1]
            n_K = len(template.H_K.leaves)
            H_K = type(template.H_K)(*leaves[:n_K]).scale(1.0 / rows.clamp(min=1.0))
            c = 1.0 if loss_average is None else loss_terms
            s = 1.0 if unwrapped and loss_average is None else 1.0 / W  # L_eff = s sum_w L_w
            H_C = type(template.H_C)(*leaves[n_K:]).scale(c * s**2)
            stats = LayerStatistics(H_K.to(dtype=template.H_K.dtype),
                                    H_C.to(dtype=template.H_C.dtype))
            out[i] = (stats, None if local.stats is not None else rows > 0)
        for k, j in enumerate(gidx, start=len(idx)):
            p, g_local, summed = grads[j]
            n = p.numel()
            g = buf[offset : offset + n].reshape(p.shape)
            offset += n
            if g_local is not None or bool(totals[k, 0] > 0):
                reduced_grads[j] = (g if summed else g * (1.0 / W)).to(p.dtype)
    return out, reduced_grads


def _counts_on(device: torch.device, counts: list, dtype: torch.dtype) -> Tensor:
    """The row / loss-term counts as one tensor on ``device``, without a blocking copy.

    Host numbers travel in one (pinned, on a GPU) non-blocking copy; counts that are
    tensors already (a tensor ``loss_average``) are put in place on the device.
    """
    host = torch.tensor([0.0 if isinstance(c, Tensor) else c for c in counts], dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    out = host.to(device, non_blocking=True)
    on_device = [(k, c) for k, c in enumerate(counts) if isinstance(c, Tensor)]
    if on_device:
        where = torch.tensor([k for k, _ in on_device]).to(device, non_blocking=True)
        values = torch.stack([c.to(device=device, dtype=dtype).reshape(()) for _, c in on_device])
        out = out.index_put((where,), values)
    return out

"""Data-parallel SINGD: the Kronecker statistics of all processes, in one collective.

Gradients are not the optimizer's to reduce: ``DistributedDataParallel`` averages them
(for an unwrapped model, the training loop does), so every process of W sees the
gradient of

    L_eff = (1/W) sum_w L_w          (L_w: the loss process w differentiated)

on the concatenated batch. The statistics below are L_eff's, which makes W processes
equal to one process that differentiates L_eff on the concatenated batch. Each process
captured its own output gradients g_w = W * dL_eff/dz, so with G_hat = c sum g g^T
(ALGORITHM.md) and A_hat a mean over a-rows:

    H_K = sum_w R_w H_K_w / sum_w R_w          R_w: a-rows of process w
    H_C = (c / W^2) sum_w H_C_w / c_w          c_w: loss terms of process w (statistics.
                                               loss_scale), c = sum_w c_w, or 1 for
                                               loss_average None

With equal local batches and a mean loss ("batch", "batch+sequence", a count) H_C is
the plain mean over processes; with a sum loss (None) it is sum_w H_C_w / W^2, the
statistics of the sum loss divided by W that DDP's averaged gradient belongs to. (The
official package sums both factors for None, which is bug 5 of ALGORITHM.md.)

Everything every process contributes in a step travels in ONE flat buffer per device
(one ``all_reduce``); the row and loss-term counts ride along, so nothing syncs per layer.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .capture import LayerCapture
from .layers import LayerInfo
from .statistics import LayerStatistics, part_counts

WORLD = "world"  # sentinel: the default process group, when one is initialised


class LocalStatistics(NamedTuple):
    """One layer's statistics on this process, with the counts the reduction weighs by.

    Attributes:
        stats: accumulated :class:`LayerStatistics`, or None when this process has none
            (the layer was not called, or got no gradient, here).
        rows: R_w, the number of a-rows (summed over the micro-batches).
        loss_terms: c_w, the loss-term count of ALGORITHM.md (summed over micro-batches).
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


def all_reduce_statistics(
    entries: list[tuple[LayerStatistics, LocalStatistics, Any]], group,
    nonfinite: Tensor | None = None,
) -> list[tuple[LayerStatistics | None, Tensor | None]]:
    """Reduce every layer's statistics over ``group`` (module docstring), in one collective.

    Nothing is read back to the host: the counts are divided on the device.

    Args:
        entries: per layer, in the same order on every process: a template (zeros of the
            right structures, dtypes and devices, used when this process has no
            statistics for the layer), its :class:`LocalStatistics`, and its
            ``loss_average``.
        group: a process group with more than one process.
        nonfinite: optional 0-d float tensor, this process's count of non-finite
            statistics; it rides in the same buffer and is replaced in place by the sum
            over processes, so every process takes the same skip decision.

    Returns:
        Per entry, ``(statistics of L_eff, present)``: ``present`` is None when this
        process had statistics for the layer, else a 0-d bool tensor saying whether any
        process had (when none had, the statistics are zeros and must not be used).
    """
    W = dist.get_world_size(group)
    by_device: dict[torch.device, list[int]] = {}
    for i, (template, _, _) in enumerate(entries):
        by_device.setdefault(template.H_K.device, []).append(i)

    out: list[tuple[LayerStatistics | None, Tensor | None]] = [(None, None)] * len(entries)
    for n_device, (device, idx) in enumerate(by_device.items()):
        parts, shapes, counts = [], [], []
        wide = any(leaf.dtype == torch.float64 for i in idx for leaf in _flat(entries[i][0]))
        buf_dtype = torch.float64 if wide else torch.float32
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
        parts.append(_counts_on(device, counts, buf_dtype))
        with_flag = nonfinite is not None and n_device == 0
        if with_flag:
            parts.append(nonfinite.reshape(1).to(device=device, dtype=buf_dtype))
        buf = torch.cat(parts)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        if with_flag:
            nonfinite.copy_(buf[-1])
            buf = buf[:-1]

        totals = buf[-2 * len(idx) :].reshape(-1, 2)
        offset = 0
        for j, i in enumerate(idx):
            template, local, loss_average = entries[i]
            leaves = []
            for shape, _ in shapes[j]:
                n = shape.numel()
                leaves.append(buf[offset : offset + n].reshape(shape))
                offset += n
            rows, loss_terms = totals[j, 0], totals[j, 1]
            n_K = len(template.H_K.leaves)
            H_K = type(template.H_K)(*leaves[:n_K]).scale(1.0 / rows.clamp(min=1.0))
            c = 1.0 if loss_average is None else loss_terms
            H_C = type(template.H_C)(*leaves[n_K:]).scale(c / W**2)
            stats = LayerStatistics(H_K.to(dtype=template.H_K.dtype),
                                    H_C.to(dtype=template.H_C.dtype))
            out[i] = (stats, None if local.stats is not None else rows > 0)
    return out


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

"""Stage 3 of the data path: Kronecker statistics H_K, H_C from one layer's capture.

From a layer's inputs x and output gradients g (docs/algorithm.md#statistics):

    a-rows (R x d_K), g-rows (R' x d_C)    per kfac_approx ("expand" or "reduce")
    H_K = Pi_K(K^T A_hat K),   A_hat = (1/R) sum_i a_i a_i^T
    H_C = Pi_C(C^T G_hat C),   G_hat = c sum_i g_i g_i^T,  c from loss_average

both computed as Pi(Y Y^T) with Y = K^T X, or, for many more rows than d_K (a
convolution's patches), as Pi(K^T (X X^T) K) from the d_K x d_K Gram X X^T.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .capture import LayerCapture
from .layers import LayerInfo, layer_kind
from .structures import StructuredMatrix

LOSS_AVERAGES = (None, "batch", "batch+sequence")
KFAC_APPROXES = ("expand", "reduce")


class LayerStatistics(NamedTuple):
    """H_K (d_K x d_K) and H_C (d_C x d_C), in the structures of K and C."""

    H_K: StructuredMatrix
    H_C: StructuredMatrix


def _pooled_rows(info: LayerInfo, capture: LayerCapture) -> tuple[Tensor, Tensor]:
    """The kind's rows of every call, pooled along the sharing dimension:
    ``a`` [N, S, d_in], ``g`` [N, S', d_out] (see :func:`layer_rows`)."""
    rows = layer_kind(info).rows
    per_call = [rows(info, x, g) for x, g in zip(capture.inputs, capture.output_grads)]
    a = torch.cat([p[0] for p in per_call], 1) if len(per_call) > 1 else per_call[0][0]
    g = torch.cat([p[1] for p in per_call], 1) if len(per_call) > 1 else per_call[0][1]
    return a, g


def layer_rows(info: LayerInfo, capture: LayerCapture, kfac_approx: str):
    """The a-rows and g-rows of docs/algorithm.md#statistics for one layer.

    The rows of one call come from the layer's kind (:attr:`LayerKind.rows`).
    Several calls of the layer in one forward pass are pooled as extra weight-sharing
    positions (concatenated along the sharing dimension); they must share the batch
    size (:func:`layer_part` handles calls of different batch sizes).

    Returns:
        ``(a, g, N, S)``: ``a`` [R, d_K] (with the constant-1 bias column when the
        bias is trained), ``g`` [R', d_C], the batch size ``N`` and the number of
        weight-sharing positions ``S`` (summed over calls).
    """
    a, g = _pooled_rows(info, capture)
    N, S = a.shape[0], a.shape[1]
    if kfac_approx == "expand":
        a, g = a.reshape(N * S, a.shape[-1]), g.reshape(N * S, g.shape[-1])
    else:
        a, g = a.mean(1), g.sum(1)
    if info.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
    return a, g, N, S


def _meta(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def batch_and_positions(info: LayerInfo, capture: LayerCapture) -> tuple[int, int]:
    """(N, S) of :func:`layer_rows`, from the kind's rows of 'meta' copies (no arithmetic)."""
    rows = layer_kind(info).rows
    shapes = [rows(info, _meta(x), _meta(g))[0].shape
              for x, g in zip(capture.inputs, capture.output_grads)]
    return shapes[0][0], sum(s[1] for s in shapes)


def _call_groups(info: LayerInfo, capture: LayerCapture) -> list[LayerCapture]:
    """The calls of one pass, grouped by batch size (first appearance order).

    Calls with one batch size pool as weight-sharing positions; calls with another
    (``l1(model(x_lab)) + l2(model(x_unlab))``) are separate loss terms
    (docs/algorithm.md#statistics).
    The batch sizes come from the kind's rows of 'meta' copies (no arithmetic).
    """
    rows = layer_kind(info).rows
    groups: dict[int, list[int]] = {}
    for i, (x, g) in enumerate(zip(capture.inputs, capture.output_grads)):
        groups.setdefault(rows(info, _meta(x), _meta(g))[0].shape[0], []).append(i)
    if len(groups) == 1:
        return [capture]
    return [
        LayerCapture(tuple(capture.inputs[i] for i in idx),
                     tuple(capture.output_grads[i] for i in idx))
        for idx in groups.values()
    ]


def loss_scale(loss_average, N: int, S: int):
    """c of docs/algorithm.md#statistics: the loss terms the differentiated loss averages."""
    if loss_average is None:
        return 1.0
    if loss_average == "batch":
        return float(N)
    if loss_average == "batch+sequence":
        return float(N * S)
    return loss_average  # a user-given count (int, float or 0-d tensor)


class StatisticsPart(NamedTuple):
    """One layer's statistics from one backward pass, with the counts parts combine by.

    Attributes:
        stats: the pass's :class:`LayerStatistics`.
        rows: R, its number of a-rows (0 for an empty batch; then ``stats`` are zeros).
        loss_terms: c, its loss-term count (:func:`loss_scale`, summed over call groups
            of different batch sizes); a float or a 0-d tensor.
    """

    stats: LayerStatistics
    rows: int
    loss_terms: Any


def part_counts(info: LayerInfo, capture: LayerCapture, kfac_approx: str, loss_average):
    """(R, c) of :class:`StatisticsPart`, from the tensor shapes only (no rows are built)."""
    rows, terms = 0, 0.0
    for grp in _call_groups(info, capture):
        N, S = batch_and_positions(info, grp)
        rows += N * S if kfac_approx == "expand" else N
        terms = terms + loss_scale(loss_average, N, S)
    return rows, terms


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums of squares run in at least float32: float16 overflows past 65504 (e.g. 16,384
    rows of std-2 activations), bfloat16 keeps 8 bits; the result is cast once."""
    return torch.promote_types(dtype, torch.float32)


def _wide(M: StructuredMatrix) -> StructuredMatrix:
    dtype = _accumulation_dtype(M.dtype)
    return M if M.dtype == dtype else M.to(dtype=dtype)


def layer_part(
    info: LayerInfo,
    K: StructuredMatrix,
    C: StructuredMatrix,
    capture: LayerCapture,
    *,
    kfac_approx: str = "expand",
    loss_average="batch",
    grad_scale=1.0,
) -> StatisticsPart:
    """H_K and H_C of one layer from one forward/backward pass, with its counts.

    Args:
        info: the layer.
        K, C: the current factors (their structures and dtypes are used; the sums run
            in at least float32 and are normalised, and the loss scale removed, before
            the one cast to the factors' dtypes).
        capture: the layer's inputs and output gradients.
        kfac_approx: ``"expand"`` or ``"reduce"``.
        loss_average: ``None``, ``"batch"``, ``"batch+sequence"`` or a count.
        grad_scale: the loss scale s the output gradients carry (GradScaler); H_C is
            divided by s^2.

    Calls of the layer with different batch sizes in one pass are separate loss terms:
    H_K is the mean over all their a-rows, H_C the sum of each group's c_j sum g g^T
    (docs/algorithm.md#gradient-accumulation). An empty batch gives zero statistics
    with ``rows == 0``.
    """
    own = layer_kind(info).statistics
    if own is not None:  # a kind-specific statistic (e.g. token counts of an embedding)
        stats = own(info, K, C, capture, kfac_approx=kfac_approx, loss_average=loss_average,
                    grad_scale=grad_scale)
        # its counts from the output gradients' shapes (its rows may be one-hot: not built)
        N = capture.output_grads[0].shape[0] if capture.output_grads[0].dim() > 1 else 1
        S = sum(g.numel() // max(g.shape[-1], 1) for g in capture.output_grads) // max(N, 1)
        rows = N * S if kfac_approx == "expand" else N
        return StatisticsPart(stats, rows, loss_scale(loss_average, N, S))
    Kw, Cw = _wide(K), _wide(C)
    sums = []
    for grp in _call_groups(info, capture):
        a, g = _pooled_rows(info, grp)
        N, S = a.shape[0], a.shape[1]
        if kfac_approx == "reduce":
            a, g = a.mean(1, keepdim=True), g.sum(1, keepdim=True)
        sums.append((_sum_of_squares(Kw, a, info.bias is not None), _sum_of_squares(Cw, g),
                     a.shape[0] * a.shape[1], loss_scale(loss_average, N, S)))
    if len(sums) == 1:
        sum_K, sum_C, rows, terms = sums[0]
        H_C = sum_C.scale(terms / grad_scale**2)
    else:  # several batch sizes: each group keeps its own c
        sum_K, sum_C, rows, terms = sums[0][0], sums[0][1].scale(sums[0][3]), sums[0][2], sums[0][3]
        for part_K, part_C, r, c in sums[1:]:
            sum_K, sum_C = sum_K + part_K, sum_C + part_C.scale(c)
            rows, terms = rows + r, terms + c
        H_C = sum_C.scale(1.0 / grad_scale**2)
    H_K = sum_K.scale(1.0 / rows if rows else 0.0)
    return StatisticsPart(LayerStatistics(_cast(H_K, K.dtype), _cast(H_C, C.dtype)), rows, terms)


def _sum_of_squares(M: StructuredMatrix, rows: Tensor, bias: bool = False) -> StructuredMatrix:
    """Pi(M^T X X^T M) for the rows [N, S, d] (X = their transpose [d (+1), N S], with a
    row of ones for a trained bias; zeros without rows: an FFT of none fails).

    For rows strided along d (a convolution's patches and output gradients, with many
    more rows than d: 65,536 at d = 28 and 16,384 at d = 145 on the benchmark CNN) the
    d x d Gram X X^T first, then Pi(M^T (X X^T) M), costs d^2 multiply-adds per row
    (plus 2 d^3 once) against ``M.inner_cost()`` per row for ``project_inner`` on X
    copied to [d, N S]: on the CNN's conv2 (d = 145) 8.4 vs 21.5 ms (dense), 10.2 vs
    14.0 (hierarchical15_15), 9.5 vs 36.4 (triltoeplitz), 9.1 vs 8.9 (block30diagonal),
    1 thread. Rows contiguous along d (Linear inputs) keep ``project_inner`` on their
    transposed view: there the structured products beat the Gram (block30diagonal
    1.2 vs 7.2 ms at d = 385, 1,024 rows), and a per-structure cost model is not built.
    """
    N, S, d = rows.shape[0], rows.shape[1], M.dim
    R = N * S
    if R == 0:
        return M.map(torch.zeros_like)
    rows = rows.to(M.dtype)
    if rows.stride(-1) != 1 and R * d * d + 2 * d**3 < R * M.inner_cost():
        return M.project_inner_gram(_gram(rows, bias))
    return M.project_inner(_columns(rows, bias))


def _columns(rows: Tensor, bias: bool) -> Tensor:
    """The rows [N, S, d] as the columns X [d (+1 with the bias), N S], with one copy at
    most, in whichever layout the rows' strides make cheap.

    Rows contiguous along d (a Linear input) become [N S, d (+1)] and X is its
    transposed view. Rows strided along d (a convolution's patches, a view of a
    [d, N, S] buffer) give X [d (+1), N S] contiguous along the positions: a view
    without bias; the [N S, d] copy took 3.0-6.6 ms for the benchmark CNN's patches.
    """
    N, S, d = rows.shape
    if rows.stride(-1) == 1:
        if bias:
            rows = torch.cat([rows, rows.new_ones(N, S, 1)], -1)
        return rows.reshape(N * S, rows.shape[-1]).mT
    cols = rows.permute(2, 0, 1)
    if bias:
        cols = torch.cat([cols, cols.new_ones(1, N, S)], 0)
    return cols.reshape(cols.shape[0], N * S)


def _gram(rows: Tensor, bias: bool) -> Tensor:
    """X X^T [d (+1), d (+1)] for the columns X of :func:`_columns`, without copying the
    rows: one product on a [N S, d] or [d, N S] view where the strides allow one (Linear
    inputs, convolution patches), else one per sample (a convolution's output
    gradients, a transposed view of [N, d, S]); the bias row's entries are the rows'
    sums and their count."""
    N, S, d = rows.shape
    if rows.is_contiguous() or rows.permute(2, 0, 1).is_contiguous():
        X = _columns(rows, False)  # a view
        A, total = X @ X.mT, X.sum(-1)
    else:
        A, total = (rows.mT @ rows).sum(0), rows.sum((0, 1))
    if not bias:
        return A
    count = total.new_full((1,), N * S)
    return torch.cat([torch.cat([A, total.unsqueeze(-1)], -1),
                      torch.cat([total, count]).unsqueeze(-2)], -2)


def _cast(M: StructuredMatrix, dtype: torch.dtype) -> StructuredMatrix:
    return M if M.dtype == dtype else M.to(dtype=dtype)


def layer_statistics(
    info: LayerInfo,
    K: StructuredMatrix,
    C: StructuredMatrix,
    capture: LayerCapture,
    *,
    kfac_approx: str = "expand",
    loss_average="batch",
    grad_scale=1.0,
) -> LayerStatistics:
    """The statistics of :func:`layer_part` without its counts (same arguments)."""
    return layer_part(info, K, C, capture, kfac_approx=kfac_approx,
                      loss_average=loss_average, grad_scale=grad_scale).stats


def accumulate(parts, loss_average) -> LayerStatistics | None:
    """Combine micro-batches' statistics into the whole batch's
    (docs/algorithm.md#gradient-accumulation).

    ``parts`` are :class:`StatisticsPart` (from :func:`layer_part`), weighted by
    their counts::

        H_K = sum_i R_i H_K_i / sum_i R_i
        H_C = c sum_i H_C_i / c_i,   c = sum_i c_i   (c = c_i = 1 for loss_average None)

    which for a mean loss assumes each micro-batch's loss was weighted so that the
    accumulated gradient is the full batch's (weight n_i / N; 1/k for equal parts),
    and a sum loss was not scaled. Parts with zero rows contribute nothing; None when
    every part is empty. Plain :class:`LayerStatistics` count as equal parts.
    """
    parts = [p if isinstance(p, StatisticsPart) else StatisticsPart(p, 1, 1.0) for p in parts]
    parts = [p for p in parts if p.rows]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0].stats
    k = len(parts)
    H_K, H_C = parts[0].stats
    if _equal(p.rows for p in parts) and _equal(p.loss_terms for p in parts):
        for p in parts[1:]:  # equal parts: the plain mean and sum (same numbers as always)
            H_K, H_C = H_K + p.stats.H_K, H_C + p.stats.H_C
        return LayerStatistics(H_K.scale(1.0 / k),
                               H_C.scale(1.0 if loss_average is None else float(k)))
    rows = sum(p.rows for p in parts)
    terms = parts[0].loss_terms
    for p in parts[1:]:
        terms = terms + p.loss_terms

    def weight_C(p: StatisticsPart):
        return 1.0 if loss_average is None else terms / p.loss_terms

    H_K, H_C = H_K.scale(parts[0].rows / rows), H_C.scale(weight_C(parts[0]))
    for p in parts[1:]:
        H_K = H_K + p.stats.H_K.scale(p.rows / rows)
        H_C = H_C + p.stats.H_C.scale(weight_C(p))
    return LayerStatistics(H_K, H_C)


def _equal(values) -> bool:
    values = list(values)
    return all(not isinstance(v, Tensor) for v in values) and len(set(values)) == 1

"""Stage 3 of the data path: Kronecker statistics H_K, H_C from one layer's capture.

From a layer's inputs x and output gradients g (ALGORITHM.md, "Statistics"):

    a-rows (R x d_K), g-rows (R' x d_C)    per kfac_approx ("expand" or "reduce")
    H_K = Pi_K(K^T A_hat K),   A_hat = (1/R) sum_i a_i a_i^T
    H_C = Pi_C(C^T G_hat C),   G_hat = c sum_i g_i g_i^T,  c from loss_average

both computed as Pi(Y Y^T) with Y = K^T X (never forming A_hat or G_hat).
"""

from __future__ import annotations

from typing import NamedTuple

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


def layer_rows(info: LayerInfo, capture: LayerCapture, kfac_approx: str):
    """The a-rows and g-rows of ALGORITHM.md for one layer.

    The rows of one call come from the layer's kind (:attr:`LayerKind.rows`).
    Several calls of the layer in one forward pass are pooled as extra weight-sharing
    positions (concatenated along the sharing dimension).

    Returns:
        ``(a, g, N, S)``: ``a`` [R, d_K] (with the constant-1 bias column when the
        bias is trained), ``g`` [R', d_C], the batch size ``N`` and the number of
        weight-sharing positions ``S`` (summed over calls).
    """
    rows = layer_kind(info).rows
    per_call = [rows(info, x, g) for x, g in zip(capture.inputs, capture.output_grads)]
    a = torch.cat([p[0] for p in per_call], 1) if len(per_call) > 1 else per_call[0][0]
    g = torch.cat([p[1] for p in per_call], 1) if len(per_call) > 1 else per_call[0][1]
    N, S = a.shape[0], a.shape[1]
    if kfac_approx == "expand":
        a, g = a.reshape(N * S, a.shape[-1]), g.reshape(N * S, g.shape[-1])
    else:
        a, g = a.mean(1), g.sum(1)
    if info.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
    return a, g, N, S


def batch_and_positions(info: LayerInfo, capture: LayerCapture) -> tuple[int, int]:
    """(N, S) of :func:`layer_rows`, from the kind's rows of 'meta' copies (no arithmetic)."""

    def meta(t: Tensor) -> Tensor:
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    rows = layer_kind(info).rows
    shapes = [rows(info, meta(x), meta(g))[0].shape
              for x, g in zip(capture.inputs, capture.output_grads)]
    return shapes[0][0], sum(s[1] for s in shapes)


def loss_scale(loss_average, N: int, S: int):
    """c of ALGORITHM.md: how many loss terms the differentiated loss averages over."""
    if loss_average is None:
        return 1.0
    if loss_average == "batch":
        return float(N)
    if loss_average == "batch+sequence":
        return float(N * S)
    return loss_average  # a user-given count (int, float or 0-d tensor)


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
    """H_K and H_C of one layer from one forward/backward pass.

    Args:
        info: the layer.
        K, C: the current factors (their structures and dtypes are used).
        capture: the layer's inputs and output gradients.
        kfac_approx: ``"expand"`` or ``"reduce"``.
        loss_average: ``None``, ``"batch"``, ``"batch+sequence"`` or a count.
        grad_scale: the loss scale s the output gradients carry (GradScaler); H_C is
            divided by s^2.
    """
    own = layer_kind(info).statistics
    if own is not None:  # a kind-specific statistic (e.g. token counts of an embedding)
        return own(info, K, C, capture, kfac_approx=kfac_approx, loss_average=loss_average,
                   grad_scale=grad_scale)
    a, g, N, S = layer_rows(info, capture, kfac_approx)
    a = a.to(K.dtype)
    g = g.to(C.dtype)
    H_K = K.project_inner(a.mT).scale(1.0 / a.shape[0])
    H_C = C.project_inner(g.mT).scale(loss_scale(loss_average, N, S) / grad_scale**2)
    return LayerStatistics(H_K, H_C)


def accumulate(parts: list[LayerStatistics], loss_average) -> LayerStatistics:
    """Combine k micro-batches' statistics into the whole batch's (ALGORITHM.md).

    H_K is the MEAN of the parts; H_C is their SUM, times k unless ``loss_average``
    is None (an averaged loss's micro-batch g already carries the 1/N of the whole
    batch while its own c counts only its rows).
    """
    k = len(parts)
    if k == 1:
        return parts[0]
    H_K, H_C = parts[0]
    for p in parts[1:]:
        H_K, H_C = H_K + p.H_K, H_C + p.H_C
    return LayerStatistics(H_K.scale(1.0 / k), H_C.scale(1.0 if loss_average is None else float(k)))

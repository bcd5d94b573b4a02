"""Stage 5 of the data path: the preconditioned (natural) gradient of one layer.

    D = C C^T G K K^T,   G = [grad W | grad b]  ([d_out, d_K])

computed right-to-left with structured products only (nothing is inverted, no
d x d product of the factors is formed).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layers import LayerInfo, layer_kind
from .structures import StructuredMatrix


def layer_gradient_matrix(info: LayerInfo, grads) -> Tensor:
    """G = [grad W (its kind's weight matrix view, [d_out, d_in]) | grad b] of one layer."""
    G = layer_kind(info).weight_matrix(info, grads[info.weight])
    if info.bias is not None:
        G = torch.cat([G, grads[info.bias].reshape(info.d_out, 1)], 1)
    return G


def natural_gradient(
    K: StructuredMatrix,
    C: StructuredMatrix,
    G: Tensor,
    cached: dict[str, StructuredMatrix] | None = None,
) -> Tensor:
    """C C^T G K K^T for G [d_C, d_K]; returns [d_C, d_K] in G's dtype.

    ``cached`` may hold ``"K"``: K K^T and/or ``"C"``: C C^T (see
    :func:`outer_products`); a cached product costs one structured product instead
    of two.
    """
    cached = cached or {}
    dtype = G.dtype

    def left(X: Tensor) -> Tensor:  # C C^T X
        X = X.to(C.dtype)
        return cached["C"].matmat(X) if "C" in cached else C.outer_matmat(X)

    def right(X: Tensor) -> Tensor:  # X K K^T: K K^T is symmetric, a row-form product
        X = X.to(K.dtype)
        return cached["K"].matmat_right(X) if "K" in cached else K.outer_matmat_right(X)

    if K.row_form_transposed:
        # X K K^T comes out column-major (block-diagonal): form it first, so that the
        # column-form C C^T (.) writes D in row order. A column-major D made every later
        # elementwise pass over it (momentum, apply) stride across rows: the natural
        # gradient plus one update of the weights measured 0.45-0.76x the other order's
        # time at d = 513-2049 (block30diagonal, cached products).
        return left(right(G)).to(dtype)
    return right(left(G)).to(dtype)


def outer_products(K: StructuredMatrix, C: StructuredMatrix) -> dict[str, StructuredMatrix]:
    """K K^T and C C^T in the forms worth keeping between factor updates
    (``StructuredMatrix.outer_cache``; structures without one are left out)."""
    out = {}
    for key, M in (("K", K), ("C", C)):
        cache = M.outer_cache()
        if cache is not None:
            out[key] = cache
    return out


def split_layer_update(info: LayerInfo, D: Tensor, params) -> dict[str, Tensor]:
    """Split D [d_out, d_K] into tensors shaped like the layer's weight (and bias)."""
    W = params[info.weight]
    out = {info.weight: layer_kind(info).weight_from_matrix(info, D[:, : info.d_in], W)}
    if info.bias is not None:
        out[info.bias] = D[:, info.d_in].reshape(params[info.bias].shape)
    return out

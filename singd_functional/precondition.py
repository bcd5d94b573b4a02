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
from .structures._base import _eager
from .structures.diagonal import Diagonal


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
    if K.row_form_transposed:
        # X K K^T comes out column-major (dense, block-diagonal): form it first, so that the
        # column-form C C^T (.) writes D in row order. A column-major D made every later
        # elementwise pass over it (momentum, apply) stride across rows: the natural
        # gradient plus one update of the weights measured 0.45-0.76x the other order's
        # time at d = 513-2049 (block30diagonal, cached products).
        return _outer_left(C, _outer_right(K, G, cached), cached).to(G.dtype)
    return _outer_right(K, _outer_left(C, G, cached), cached).to(G.dtype)


def _outer_left(C: StructuredMatrix, X: Tensor, cached: dict) -> Tensor:
    """C C^T X in C's dtype (``cached["C"]``: C C^T, one product instead of two)."""
    X = _in(X, C.dtype)
    return cached["C"].matmat(X) if "C" in cached else C.outer_matmat(X)


def _outer_right(K: StructuredMatrix, X: Tensor, cached: dict) -> Tensor:
    """X K K^T in K's dtype: K K^T is symmetric, so a row-form product."""
    X = _in(X, K.dtype)
    return cached["K"].matmat_right(X) if "K" in cached else K.outer_matmat_right(X)


def _in(X: Tensor, dtype: torch.dtype) -> Tensor:
    """``X.to(dtype)``, without the call where X already is in it (``Tensor.to`` costs
    about a microsecond even then, and runs several times per layer and step)."""
    return X if X.dtype == dtype else X.to(dtype)


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
        db, shape = D[:, info.d_in], params[info.bias].shape
        out[info.bias] = db if db.shape == shape else db.reshape(shape)
    return out


def layer_directions(
    info: LayerInfo,
    K: StructuredMatrix,
    C: StructuredMatrix,
    grads,
    cached: dict[str, StructuredMatrix] | None = None,
) -> dict[str, Tensor]:
    """D = C C^T G K K^T of one layer, as tensors shaped like its weight (and bias).

    A diagonal K does not mix the columns of G, so the bias column is preconditioned
    on its own, D_b = C C^T g_b k_b^2, without joining [grad W | grad b] and splitting
    D (the same numbers; a dense C C^T's product of one column may round differently).
    """
    if info.bias is None or not isinstance(K, Diagonal):
        D = natural_gradient(K, C, layer_gradient_matrix(info, grads), cached)
        return split_layer_update(info, D, grads)
    cached = cached or {}
    KK = cached["K"] if "K" in cached else K.outer_self()  # k^2 (its product, as uncached)
    assert isinstance(KK, Diagonal)
    left = {"C": cached["C"]} if "C" in cached else {}
    kind, d_in = layer_kind(info), info.d_in
    G_W = kind.weight_matrix(info, grads[info.weight])
    left_W = _in(_outer_left(C, G_W, left), K.dtype)
    # times k^2 in place where C C^T G is a fresh eager tensor: one weight-sized tensor
    # less per layer and step (the drop-in's plain step 0.904x), the same numbers
    if _writable(left_W, G_W):
        D_W = _in(left_W.mul_(KK.values[:d_in]), G_W.dtype)
    else:
        D_W = _in(Diagonal(KK.values[:d_in]).matmat_right(left_W), G_W.dtype)
    g_b = grads[info.bias].reshape(info.d_out, 1)
    D_b = natural_gradient(K, C, g_b, {**left, "K": Diagonal(KK.values[d_in:])})
    return {info.weight: kind.weight_from_matrix(info, D_W, grads[info.weight]),
            info.bias: D_b.reshape(grads[info.bias].shape)}


def _writable(result: Tensor, source: Tensor) -> bool:
    """Whether ``result`` (computed from ``source``) may be overwritten: an eager tensor
    outside autograd that does not share ``source``'s memory (no structure returns its
    argument, but none promises it). Traced (``torch.compile`` fuses the products
    anyway) or under a functorch transform (vmap, grad): no."""
    return _eager(result) and (
        result.untyped_storage().data_ptr() != source.untyped_storage().data_ptr())

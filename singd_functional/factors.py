"""Stage 4 of the data path: the inverse-free update of the factors K and C.

docs/algorithm.md#factor-update (lam = damping, rho = 1/2 or (1 - alpha1)/2)::

    SINGD:  D_K = rho (avg_tr(H_C) H_K + lam avg_tr(CtC) KtK - I)      (and C alike)
    IKFAC:  D_K = rho (H_K + lam KtK - I)
    m_K <- alpha1 m_K + D_K
    K   <- K - beta_K K m_K,   beta_K = lr_cov [/ max(1, max|m_K|) if normalize_lr_cov]

with KtK = Pi_K(K^T K). Everything stays in the structures of K and C.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .statistics import LayerStatistics
from .structures import StructuredMatrix
from .structures._base import _eager


class Factors(NamedTuple):
    """One layer's pair: K (d_K x d_K) and C (d_C x d_C), or their momenta."""

    K: StructuredMatrix
    C: StructuredMatrix


def factor_directions(
    factors: Factors, stats: LayerStatistics, damping, *, kfac_like: bool, rho,
    overwrite_stats: bool = False,
) -> Factors:
    """The Riemannian directions (D_K, D_C) before momentum.

    Each temporary is let go as soon as it is used (K^T K once D_K has it, each sum
    once it has its diagonal), and, eagerly, written over where it is ours (``_scratch``):
    at most four factor-sized matrices are alive at once. ``overwrite_stats``: the
    caller gives up ``stats`` (the drop-in's, made this step), so D is written into them.
    """
    # `.scale(s)` rather than `* s`: dynamo cannot trace `structured * tensor`
    K, C = factors
    H_K, H_C = stats
    KtK, CtC = K.gram(), C.gram()
    if kfac_like:
        s_K, s_C = damping, damping
        a_K = a_C = None
    else:
        s_K, s_C = damping * CtC.average_trace(), damping * KtK.average_trace()
        a_K, a_C = H_C.average_trace(), H_K.average_trace()
    D_K = _direction(H_K, a_K, KtK, s_K, rho, overwrite_stats, K)
    del KtK
    D_C = _direction(H_C, a_C, CtC, s_C, rho, overwrite_stats, C)
    return Factors(D_K, D_C)


def _direction(H: StructuredMatrix, a, gram: StructuredMatrix, s, rho, overwrite: bool,
               factor: StructuredMatrix) -> StructuredMatrix:
    """rho ((a H | H) + s gram - I), in the order of operations of docs/algorithm.md;
    ``gram`` (of ``factor``) is ours, ``H`` too where ``overwrite``."""
    damped = _scale_(gram, s) if _scratch(gram, factor) else gram.scale(s)
    del gram
    if overwrite and _scratch(H, damped):
        D = _add_(H if a is None else _scale_(H, a), damped)
    else:
        D = (H if a is None else H.scale(a)) + damped
    del damped
    if _scratch(D):  # D is ours: rho (D - I) into its leaves (for dense: into H_K)
        return _scale_(_add_diag_(D, -1.0), rho)
    return D.add_diag(-1.0).scale(rho)


def _scratch(M: StructuredMatrix, *others: StructuredMatrix) -> bool:
    """Whether M (a fresh result) may be written over with an elementwise op's result:
    eagerly, each leaf contiguous with a storage of its own, of its own size (a Toeplitz
    product's coefficients are the head of a longer FFT output: written over, the state
    would keep the whole output), that none of ``others`` (of M's structure, shapes and
    dtypes: the op then rounds as out of place) shares. No structure's product returns
    its argument, but none promises it."""
    leaves = M.leaves
    if not _eager(*leaves):
        return False
    ptrs = {t.untyped_storage().data_ptr() for t in leaves}
    if len(ptrs) != len(leaves) or not all(
            t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
            for t in leaves):
        return False
    for other in others:
        if type(other) is not type(M) or any(
                a.shape != b.shape or a.dtype != b.dtype
                or b.untyped_storage().data_ptr() in ptrs
                for a, b in zip(leaves, other.leaves)):
            return False
    return True


def _scale_(M: StructuredMatrix, s):
    for t in M.leaves:
        t.mul_(s)
    return M


def _add_diag_(M: StructuredMatrix, value):
    """M + value I written back into M's leaves: the structure's own add_diag (a
    temporary, let go at once), so that D stays where it was written."""
    new = M.add_diag(value)
    for a, b in zip(M.leaves, new.leaves):
        if b is not a:
            a.copy_(b)
    return M


def _add_(M: StructuredMatrix, other: StructuredMatrix):
    for a, b in zip(M.leaves, other.leaves):
        a.add_(b)
    return M


def update_factors(
    factors: Factors,
    momenta: Factors | None,
    stats: LayerStatistics,
    *,
    damping,
    alpha1,
    lr_cov,
    kfac_like: bool,
    normalize_lr_cov: bool,
    overwrite_stats: bool = False,
) -> tuple[Factors, Factors | None]:
    """One factor update; returns the new ``(factors, momenta)``.

    ``momenta`` is None when the transform keeps none (alpha1 == 0 or IKFAC); then
    m = D. Hyperparameters may be floats or 0-d tensors. ``overwrite_stats``: ``stats``
    are the caller's to give up (:func:`factor_directions`); nothing else it passes is
    written to.
    """
    rho = 0.5 * (1.0 - alpha1) if normalize_lr_cov else 0.5
    D = factor_directions(factors, stats, damping, kfac_like=kfac_like, rho=rho,
                          overwrite_stats=overwrite_stats)
    if momenta is None:
        m = D
    else:
        m = Factors(*(_add_(d, old.scale(alpha1)) if _scratch(d, old) else
                      old.scale(alpha1) + d for d, old in zip(D, momenta)))
    del D  # (the momenta hold it now): two factor-sized matrices less below
    beta_K = beta_C = lr_cov
    if normalize_lr_cov:
        beta_K = lr_cov / torch.clamp(m.K.max_abs(), min=1.0)
        beta_C = lr_cov / torch.clamp(m.C.max_abs(), min=1.0)
    K, C = factors
    new = Factors(_descent(K, m.K, beta_K), _descent(C, m.C, beta_C))
    return new, (None if momenta is None else m)


def _descent(K: StructuredMatrix, m: StructuredMatrix, beta) -> StructuredMatrix:
    """K - beta K m, into the product's storage where it is ours."""
    step = K.matmul(m)
    if not _scratch(step, K, m):
        return K - step.scale(beta)
    for k, t in zip(K.leaves, _scale_(step, beta).leaves):
        torch.sub(k, t, out=t)
    return step

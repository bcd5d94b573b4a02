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


class Factors(NamedTuple):
    """One layer's pair: K (d_K x d_K) and C (d_C x d_C), or their momenta."""

    K: StructuredMatrix
    C: StructuredMatrix


def factor_directions(
    factors: Factors, stats: LayerStatistics, damping, *, kfac_like: bool, rho
) -> Factors:
    """The Riemannian directions (D_K, D_C) before momentum.

    Each temporary is let go as soon as it is used (K^T K once D_K has it, each sum
    once it has its diagonal): at most four factor-sized matrices are alive at once,
    where computing both sides first kept six (dense: d x d each).
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
    D_K = _direction(H_K, a_K, KtK.scale(s_K), rho)
    del KtK
    D_C = _direction(H_C, a_C, CtC.scale(s_C), rho)
    return Factors(D_K, D_C)


def _direction(H: StructuredMatrix, a, damped: StructuredMatrix, rho) -> StructuredMatrix:
    """rho ((a H | H) + damped - I), in the order of operations of docs/algorithm.md."""
    D = (H if a is None else H.scale(a)) + damped
    del damped
    return D.add_diag(-1.0).scale(rho)


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
) -> tuple[Factors, Factors | None]:
    """One factor update; returns the new ``(factors, momenta)``.

    ``momenta`` is None when the transform keeps none (alpha1 == 0 or IKFAC); then
    m = D. Hyperparameters may be floats or 0-d tensors.
    """
    rho = 0.5 * (1.0 - alpha1) if normalize_lr_cov else 0.5
    D = factor_directions(factors, stats, damping, kfac_like=kfac_like, rho=rho)
    if momenta is None:
        m = D
    else:
        m = Factors(momenta.K.scale(alpha1) + D.K, momenta.C.scale(alpha1) + D.C)
    del D  # (the momenta hold it now): two factor-sized matrices less below
    beta_K = beta_C = lr_cov
    if normalize_lr_cov:
        beta_K = lr_cov / torch.clamp(m.K.max_abs(), min=1.0)
        beta_C = lr_cov / torch.clamp(m.C.max_abs(), min=1.0)
    K, C = factors
    new = Factors(K - K.matmul(m.K).scale(beta_K), C - C.matmul(m.C).scale(beta_C))
    return new, (None if momenta is None else m)

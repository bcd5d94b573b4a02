"""Stage 4, the factor update: bit for bit the formula of docs/algorithm.md#factor-update
in its order of operations (the reference below), whatever order ``update_factors``
lets its temporaries go in."""

from __future__ import annotations

import optree
import pytest
import torch

import singd_functional as sf
from singd_functional.factors import Factors, update_factors
from singd_functional.statistics import LayerStatistics

STRUCTURES = ["dense", "diagonal", "block3diagonal", "hierarchical3_2", "triltoeplitz"]


def reference(factors, momenta, stats, *, damping, alpha1, lr_cov, kfac_like,
              normalize_lr_cov):
    """The update as written before its temporaries were ordered (one expression each)."""
    rho = 0.5 * (1.0 - alpha1) if normalize_lr_cov else 0.5
    K, C = factors
    H_K, H_C = stats
    KtK, CtC = K.gram(), C.gram()
    if kfac_like:
        D_K = (H_K + KtK.scale(damping)).add_diag(-1.0)
        D_C = (H_C + CtC.scale(damping)).add_diag(-1.0)
    else:
        D_K = H_K.scale(H_C.average_trace()) + KtK.scale(damping * CtC.average_trace())
        D_C = H_C.scale(H_K.average_trace()) + CtC.scale(damping * KtK.average_trace())
        D_K, D_C = D_K.add_diag(-1.0), D_C.add_diag(-1.0)
    D = Factors(D_K.scale(rho), D_C.scale(rho))
    m = D if momenta is None else Factors(momenta.K.scale(alpha1) + D.K,
                                          momenta.C.scale(alpha1) + D.C)
    beta_K = beta_C = lr_cov
    if normalize_lr_cov:
        beta_K = lr_cov / torch.clamp(m.K.max_abs(), min=1.0)
        beta_C = lr_cov / torch.clamp(m.C.max_abs(), min=1.0)
    new = Factors(K - K.matmul(m.K).scale(beta_K), C - C.matmul(m.C).scale(beta_C))
    return new, (None if momenta is None else m)


def _random(structure, d, generator, scale=1.0):
    A = torch.randn(d, d, generator=generator, dtype=torch.float32) * scale
    return sf.structures.get(structure).from_dense(torch.eye(d) + A)


def _leaves(tree):
    return optree.tree_leaves(tree, namespace=sf.PYTREE_NAMESPACE)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("kfac_like", [False, True], ids=["singd", "ikfac"])
@pytest.mark.parametrize("normalize_lr_cov", [False, True], ids=["plain", "normalized"])
@pytest.mark.parametrize("tensor_hp", [False, True], ids=["floats", "tensors"])
def test_update_factors_is_the_formula_bit_for_bit(structure, kfac_like, normalize_lr_cov,
                                                   tensor_hp):
    g = torch.Generator().manual_seed(0)
    d_K, d_C = 7, 5
    factors = Factors(_random(structure, d_K, g, 0.1), _random(structure, d_C, g, 0.1))
    momenta = None if kfac_like else Factors(_random(structure, d_K, g, 0.01),
                                             _random(structure, d_C, g, 0.01))
    Y_K, Y_C = torch.randn(d_K, 9, generator=g), torch.randn(d_C, 9, generator=g)
    T = sf.structures.get(structure)
    stats = LayerStatistics(T.project_outer(Y_K), T.project_outer(Y_C))
    hp = dict(damping=1e-3, alpha1=0.0 if kfac_like else 0.5, lr_cov=0.05)
    if tensor_hp:
        hp = {k: torch.tensor(v, dtype=torch.float64) for k, v in hp.items()}
    kw = dict(hp, kfac_like=kfac_like, normalize_lr_cov=normalize_lr_cov)
    got = update_factors(factors, momenta, stats, **kw)
    want = reference(factors, momenta, stats, **kw)
    got_leaves, want_leaves = _leaves(got), _leaves(want)
    assert len(got_leaves) == len(want_leaves) > 0
    for a, b in zip(got_leaves, want_leaves):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("kfac_like", [False, True], ids=["singd", "ikfac"])
def test_overwritten_statistics_give_the_same_bits_and_only_they_are_written(structure,
                                                                           kfac_like):
    """``overwrite_stats``: the same numbers, written into the statistics (dense: the new
    momenta are their memory); factors and momenta passed in stay as they were, and
    without it the statistics too (the pure core mutates nothing)."""
    g = torch.Generator().manual_seed(1)
    d_K, d_C = 7, 5
    factors = Factors(_random(structure, d_K, g, 0.1), _random(structure, d_C, g, 0.1))
    momenta = None if kfac_like else Factors(_random(structure, d_K, g, 0.01),
                                             _random(structure, d_C, g, 0.01))
    T = sf.structures.get(structure)
    Y_K, Y_C = torch.randn(d_K, 9, generator=g), torch.randn(d_C, 9, generator=g)
    kw = dict(damping=1e-3, alpha1=0.0 if kfac_like else 0.5, lr_cov=0.05,
              kfac_like=kfac_like, normalize_lr_cov=True)
    inputs = (factors, momenta)
    before = [t.clone() for t in _leaves(inputs)]
    stats = LayerStatistics(T.project_outer(Y_K), T.project_outer(Y_C))
    stats_before = [t.clone() for t in _leaves(stats)]
    want = update_factors(factors, momenta, stats, **kw)
    for a, b in zip(_leaves(stats), stats_before):
        assert torch.equal(a, b)
    got = update_factors(factors, momenta, stats, overwrite_stats=True, **kw)
    for a, b in zip(_leaves(got), _leaves(want)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for a, b in zip(_leaves(inputs), before):
        assert torch.equal(a, b)
    if structure == "dense":
        written = got[1] if momenta is not None else None
        if written is not None:
            assert written.K.mat.data_ptr() == stats.H_K.mat.data_ptr()
        assert not torch.equal(stats.H_K.mat, stats_before[0])


@pytest.mark.parametrize("structure", STRUCTURES)
def test_new_factors_and_momenta_hold_storages_of_their_own_size(structure):
    """The state after an update holds no more bytes than its leaves: a product whose
    leaves are the head of a longer buffer (Toeplitz coefficients out of an FFT) is not
    written over in place, or the state would keep the whole buffer."""
    g = torch.Generator().manual_seed(2)
    d_K, d_C = 7, 5
    factors = Factors(_random(structure, d_K, g, 0.1), _random(structure, d_C, g, 0.1))
    momenta = Factors(_random(structure, d_K, g, 0.01), _random(structure, d_C, g, 0.01))
    T = sf.structures.get(structure)
    stats = LayerStatistics(T.project_outer(torch.randn(d_K, 9, generator=g)),
                            T.project_outer(torch.randn(d_C, 9, generator=g)))
    new = update_factors(factors, momenta, stats, damping=1e-3, alpha1=0.5, lr_cov=0.05,
                         kfac_like=False, normalize_lr_cov=True)
    for t in _leaves(new):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()

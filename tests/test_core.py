"""The pure core equals the dense oracle of tests/oracle.py (float64, 1e-10 relative)."""

from __future__ import annotations

import pytest

from tests.models import make_batch, make_loss, make_model, run_core
from tests.oracle import DenseOracle

STRUCTURES = [
    "dense", "diagonal", "block3diagonal", "block30diagonal", "hierarchical3_2",
    "hierarchical15_15", "triltoeplitz", "triutoeplitz", "triltopleftdiag",
    "trilbottomrightdiag", "triutopleftdiag", "triubottomrightdiag",
]
BASE = dict(lr=0.05, momentum=0.9, damping=1e-3, alpha1=0.5, lr_cov=0.05, T=1)


def run_oracle(kind, steps, loss_average="batch", T=1, **hp):
    model = make_model(kind)
    oracle = DenseOracle(model, loss_average=loss_average, T=T, **hp)
    loss_fn = make_loss(loss_average)
    for t in range(steps):
        x, y = make_batch(kind, t)
        oracle.step(lambda x=x, y=y: loss_fn(model(x), y))
    return dict(model.named_parameters()), oracle


def assert_same(params, ref, tol=1e-10):
    for k, p in params.items():
        r = ref[k].detach()
        err = (p - r).norm() / r.norm().clamp(min=1e-300)
        assert err <= tol, f"{k}: relative error {err:.3e}"


def check(kind, steps=15, **hp):
    cfg = {**BASE, **hp}
    params, state = run_core(kind, steps, **cfg)
    ref, oracle = run_oracle(kind, steps, **cfg)
    assert_same(params, ref)
    moved = any((p - make_model(kind).state_dict()[k]).abs().max() > 1e-3 for k, p in params.items())
    assert moved, "the run did not move the parameters: the test would not catch anything"
    return state, oracle


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("kfac_like", [False, True], ids=["singd", "ikfac"])
def test_every_structure_matches_oracle(structure, kfac_like):
    state, oracle = check("mlp", structures=(structure, structure), kfac_like=kfac_like,
                          kfac_approx="reduce" if kfac_like else "expand")
    # the factors themselves agree, and K is not symmetric after the updates
    for name, (K, C) in state.factors.items():
        ref = oracle.state[name]
        assert (K.to_dense() - ref["K"]).norm() <= 1e-10 * ref["K"].norm()
        assert (C.to_dense() - ref["C"]).norm() <= 1e-10 * ref["C"].norm()
    K = state.factors["2"].K.to_dense()
    if structure not in ("diagonal",):
        assert (K - K.T).abs().max() > 1e-8, "K stayed symmetric: the test misses K^T bugs"


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq", "twice"])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("loss_average", [None, "batch", "batch+sequence", 13])
def test_models_approx_and_loss_average(kind, kfac_approx, loss_average):
    structures = {"mlp": ("block3diagonal", "hierarchical3_2"), "cnn": ("dense", "triltoeplitz"),
                  "seq": ("triutoeplitz", "dense"), "twice": ("dense", "diagonal")}[kind]
    check(kind, steps=15, kfac_approx=kfac_approx, loss_average=loss_average, structures=structures,
          lr=0.01 if loss_average is None else 0.05)


@pytest.mark.parametrize("structure", ["dense", "hierarchical3_2", "triltoeplitz", "trilbottomrightdiag"])
@pytest.mark.parametrize("kfac_like", [False, True], ids=["singd", "ikfac"])
def test_options(structure, kfac_like):
    """normalize_lr_cov, an lr_cov schedule, weight decay, momentum and T > 1 together."""
    check("cnn", steps=16, structures=(structure, "dense"), kfac_like=kfac_like,
          normalize_lr_cov=True, weight_decay=1e-2, momentum=0.5, T=3,
          lr_cov=lambda t: 0.2 / (1 + t))


@pytest.mark.parametrize("normalize", [False, True])
def test_normalize_lr_cov_and_T(normalize):
    check("seq", steps=15, normalize_lr_cov=normalize, T=4, structures=("hierarchical3_2", "triltopleftdiag"))


def test_block_structure_on_small_layers_equals_dense():
    """docs/algorithm.md#differences-from-the-official-package, 1: with d_K <= B, block{B}diagonal must equal dense."""
    p_block, _ = run_core("mlp", 25, **{**BASE, "structures": ("block30diagonal", "block30diagonal")})
    p_dense, _ = run_core("mlp", 25, **{**BASE, "structures": ("dense", "dense")})
    assert_same(p_block, p_dense, 1e-12)


@pytest.mark.parametrize("structure", ["dense", "diagonal", "block3diagonal", "hierarchical3_2"])
def test_cached_products_give_the_same_numbers(structure):
    """cache_preconditioner keeps K K^T, C C^T between updates: same trajectory."""
    cfg = {**BASE, "structures": (structure, "dense"), "T": 3}
    p_cached, state = run_core("cnn", 12, cache_preconditioner=True, **cfg)
    p_plain, plain_state = run_core("cnn", 12, **cfg)
    assert_same(p_cached, p_plain, 1e-12)
    assert plain_state.products == {}
    for name, cached in state.products.items():
        # every structure here keeps both (hierarchical: a HierarchicalOuter, checked below)
        assert set(cached) == {"K", "C"}
        K = state.factors[name].K
        if "K" in cached:
            expected = K.to_dense() @ K.to_dense().T
            assert (cached["K"].to_dense() - expected).abs().max() < 1e-12

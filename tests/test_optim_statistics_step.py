"""The drop-in's statistics step: the guard's selection changes no number, builds K K^T
and C C^T once, and a skipped statistics step leaves factors and products as they were.

The eager step writes each layer's new factors into the state's tensors where the
guard keeps the step (the default; ``_step._update_factors_``) and rebuilds the
products from what it wrote; the unguarded step (``opt._guard = False``) writes them
as they are. Both must agree bit for bit wherever the step is kept.
"""

from __future__ import annotations

import pytest
import torch

import singd_functional as sf
from singd_functional import _step, transform
from singd_functional.precondition import outer_products

# structures closed under K K^T (cached products) and one that is not (no products)
STRUCTURES = [("dense", "dense"), ("diagonal", "block2diagonal"), ("dense", "triltoeplitz")]
HP = dict(lr=0.05, momentum=0.9, damping=1e-3, alpha1=0.5, lr_cov=0.05, weight_decay=1e-3)


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 3)).to(dtype)


def _batch(t, dtype=torch.float64):
    g = torch.Generator().manual_seed(t)
    return torch.randn(16, 5, generator=g, dtype=dtype), torch.randn(16, 3, generator=g,
                                                                     dtype=dtype)


def _step_once(model, opt, x, y):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _leaves(tree):
    import optree

    return optree.tree_leaves(tree, namespace=sf.PYTREE_NAMESPACE)


def _layer_numbers(opt):
    """Every factor, momentum, buffer and cached product of the drop-in, in one list."""
    out = []
    for p in opt.param_groups[0]["params"]:
        st = opt.state[p]
        out += [st["momentum_buffer"]]
        out += [t for key in ("K", "C", "m_K", "m_C") if key in st for t in _leaves(st[key])]
    for grp in opt._groups:
        for layer in grp.layers:
            out += [t for M in (layer.products or {}).values() for t in _leaves(M)]
    return out


def _assert_identical(a, b):
    assert len(a) == len(b)
    for s, t in zip(a, b):
        assert s.dtype == t.dtype and torch.equal(s, t)


@pytest.mark.parametrize("structures", STRUCTURES, ids=lambda s: "-".join(s))
@pytest.mark.parametrize("T", [1, 2, 3])
def test_guarded_statistics_steps_equal_the_unguarded_bit_for_bit(structures, T):
    runs = []
    for guarded in (True, False):
        model = _model()
        opt = sf.SINGD(model, structures=structures, T=T, **HP)
        opt._guard = guarded
        runs.append((model, opt))
    for t in range(7):
        x, y = _batch(t)
        for model, opt in runs:
            _step_once(model, opt, x, y)
        (m_a, o_a), (m_b, o_b) = runs
        _assert_identical(list(m_a.parameters()), list(m_b.parameters()))
        _assert_identical(_layer_numbers(o_a), _layer_numbers(o_b))
    # the cached products are those of the factors kept
    for grp in runs[0][1]._groups:
        for layer in grp.layers:
            st = runs[0][1].state[grp.weight(layer)]
            want = outer_products(st["K"], st["C"]) if T > 1 else {}
            got = layer.products or {}
            assert set(got) == set(want)
            for k in want:
                _assert_identical(_leaves(got[k]), _leaves(want[k]))


@pytest.mark.parametrize("structures", STRUCTURES[:2], ids=lambda s: "-".join(s))
def test_a_guarded_statistics_step_builds_the_products_once(structures, monkeypatch):
    """Each statistics step builds each layer's K K^T, C C^T once: the eager drop-in,
    from the factors it wrote (the old ones on a skipped step), and the core none."""
    model = _model()
    opt = sf.SINGD(model, structures=structures, T=2, **HP)
    for t in range(2):  # step 0 fills the cache, step 1 is a plain step
        _step_once(model, opt, *_batch(t))
    calls = {"core": 0, "drop-in": 0}

    def counting(where, original):
        def wrapped(*args):
            calls[where] += 1
            return original(*args)
        return wrapped

    monkeypatch.setattr(transform, "outer_products",
                        counting("core", transform.outer_products))
    monkeypatch.setattr(_step, "outer_products", counting("drop-in", _step.outer_products))
    _step_once(model, opt, *_batch(2))  # kept
    assert calls == {"core": 0, "drop-in": 2}
    x, y = _batch(3)
    _step_once(model, opt, x, y)  # plain
    x, y = _batch(4)
    x[2, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped"):
        _step_once(model, opt, x, y)  # skipped statistics step
        _step_once(model, opt, *_batch(5))  # (the warning comes one step late)
    assert calls == {"core": 0, "drop-in": 4}


@pytest.mark.parametrize("structures", STRUCTURES, ids=lambda s: "-".join(s))
@pytest.mark.parametrize("how", ["nan_input", "overflow"])
def test_a_skipped_statistics_step_changes_no_factor_product_or_parameter(structures, how):
    dtype = torch.float32 if how == "overflow" else torch.float64
    model = _model(dtype)
    opt = sf.SINGD(model, structures=structures, T=2, **HP)
    for t in range(3):
        _step_once(model, opt, *_batch(t, dtype))
    _step_once(model, opt, *_batch(3, dtype))  # plain: the next step updates the factors
    before_params = [p.detach().clone() for p in model.parameters()]
    before = [t.clone() for t in _layer_numbers(opt)]
    products = [layer.products for grp in opt._groups for layer in grp.layers]
    x, y = _batch(4, dtype)
    if how == "nan_input":
        x[0, 3] = float("nan")
    else:  # finite gradients, statistics beyond float32
        x[0, 0] = 1e25
    _step_once(model, opt, x, y)
    assert int(opt.skipped_steps) == 1
    _assert_identical(list(model.parameters()), before_params)
    _assert_identical(_layer_numbers(opt), before)
    assert all(p is None or all(torch.isfinite(t).all() for M in p.values() for t in _leaves(M))
               for p in products)


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "unguarded"])
def test_an_eager_statistics_step_writes_into_the_state_tensors(guarded):
    """K, C, m_K, m_C keep their tensors (and memory) across statistics steps: the new
    values are written into them, no second copy is kept."""
    model = _model()
    opt = sf.SINGD(model, structures=("dense", "dense"), T=1, **HP)
    opt._guard = guarded
    _step_once(model, opt, *_batch(0))
    keys = ("K", "C", "m_K", "m_C")
    states = [opt.state[p] for p in (model[0].weight, model[2].weight)]
    ptrs = [[st[k].mat.data_ptr() for k in keys] for st in states]
    before = [[st[k].mat.clone() for k in keys] for st in states]
    _step_once(model, opt, *_batch(1))
    assert [[st[k].mat.data_ptr() for k in keys] for st in states] == ptrs
    assert all(not torch.equal(st[k].mat, b)
               for st, bs in zip(states, before) for k, b in zip(keys, bs))


def test_a_layer_whose_update_overflows_keeps_its_factors_and_the_step_goes_on():
    """Finite statistics, but K m_K beyond float32 in one layer: that layer keeps K, C,
    m_K, m_C bit for bit (unguarded, its K becomes inf); the other layer updates as
    unguarded, and the step is not counted as skipped."""
    runs = []
    for guarded in (True, False):
        model = _model(torch.float32)
        opt = sf.SINGD(model, structures=("dense", "dense"), T=1, **{**HP, "lr": 0.0})
        opt._guard = guarded
        _step_once(model, opt, *_batch(0, torch.float32))
        opt.state[model[0].weight]["K"].mat.mul_(1e15)  # finite statistics, K m_K is not
        runs.append((model, opt))
    keys = ("K", "C", "m_K", "m_C")
    (model, opt), (ref_model, ref) = runs
    bad = opt.state[model[0].weight]
    before = [bad[k].mat.clone() for k in keys]
    for m, o in runs:
        _step_once(m, o, *_batch(1, torch.float32))
    for k, b in zip(keys, before):
        assert torch.equal(bad[k].mat, b)
    assert not torch.isfinite(ref.state[ref_model[0].weight]["K"].mat).all()
    good, ref_good = opt.state[model[2].weight], ref.state[ref_model[2].weight]
    for k in keys:
        assert torch.equal(good[k].mat, ref_good[k].mat)
    assert int(opt.skipped_steps) == 0

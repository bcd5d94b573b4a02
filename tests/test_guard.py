"""skip_nonfinite: a step whose gradients or statistics are not finite changes nothing."""

from __future__ import annotations

import contextlib

import pytest
import torch

import singd_functional as sf
from singd_functional.statistics import accumulate, layer_part
from tests._no_sync import HostSync, no_host_sync
from tests.models import make_batch, make_loss, make_model

HP = dict(lr=0.05, lr_cov=0.05, structures=("dense", "hierarchical3_2"))


def _setup(kind="mlp", dtype=torch.float64, **hp):
    model = make_model(kind).to(dtype)
    layers = sf.find_layers(model)
    tx = sf.skip_nonfinite(sf.singd(layers, **{**HP, **hp}))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return model, layers, tx, params


def _leaves(tree):
    import optree
    return [t.clone() for t in optree.tree_leaves(tree, namespace=sf.PYTREE_NAMESPACE)]


def _assert_identical(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), "a skipped step changed the state"


def _poison_row(x):
    x = x.clone()
    x[3] = float("nan")
    return x


@pytest.mark.parametrize("how", ["input_row", "loss", "inf_row"])
@pytest.mark.parametrize("statistics_step", [True, False], ids=["stats", "plain"])
def test_a_nonfinite_step_changes_nothing_and_training_goes_on(how, statistics_step):
    model, layers, tx, params = _setup()
    loss_fn = make_loss("batch")
    bad_loss = (lambda out, y: loss_fn(out, y) * float("nan")) if how == "loss" else loss_fn
    capture, bad_capture = (sf.make_capture(model, f, layers) for f in (loss_fn, bad_loss))
    state = tx.init(params)

    def step(params, state, t, cap=capture, poison=None):
        x, y = make_batch("mlp", t)
        _, grads, caps = cap(params, poison(x) if poison else x, y)
        updates, state = tx.update(grads, state, params, captures=caps)
        return sf.apply_updates(params, updates), state

    params, state = step(params, state, 0)
    before = _leaves((params, state.inner))
    poison = {"input_row": _poison_row,
              "inf_row": lambda x: x.index_fill(0, torch.tensor([2]), float("inf")),
              "loss": None}[how]
    x, y = make_batch("mlp", 1)
    _, grads, caps = bad_capture(params, poison(x) if poison else x, y)
    updates, state = tx.update(grads, state, params, captures=caps if statistics_step else None)
    params = sf.apply_updates(params, updates)
    _assert_identical(_leaves((params, state.inner)), before)
    assert bool(state.skipped) and int(state.skipped_steps) == 1
    # the guarded run goes on as if the bad step had not happened
    params, state = step(params, state, 2)
    assert not bool(state.skipped) and int(state.skipped_steps) == 1
    _, ref_layers, ref_tx, ref = _setup()
    ref_state = ref_tx.init(ref)
    ref, ref_state = step(ref, ref_state, 0)
    ref, ref_state = step(ref, ref_state, 2)
    for k in ref:
        assert torch.equal(params[k], ref[k])
    assert all(torch.isfinite(p).all() for p in params.values())


def test_finite_gradients_with_overflowing_statistics_are_skipped():
    """One activation of 1e25 in float32: its gradient is finite, its square is not."""
    model, layers, tx, params = _setup(dtype=torch.float32)
    capture = sf.make_capture(model, make_loss("batch"), layers)
    state = tx.init(params)
    x, y = make_batch("mlp", 0)
    x = x.float()
    x[0, 0] = 1e25
    _, grads, caps = capture(params, x, y)
    assert all(torch.isfinite(g).all() for g in grads.values()), "the test needs finite grads"
    part = layer_part(layers[0], *state.inner.factors[layers[0].name], caps[layers[0].name])
    assert not torch.isfinite(part.stats.H_K.to_dense()).all(), "the statistics must overflow"
    before = _leaves((params, state.inner))
    updates, state = tx.update(grads, state, params, captures=caps)
    params = sf.apply_updates(params, updates)
    _assert_identical(_leaves((params, state.inner)), before)
    assert bool(state.skipped)


def test_one_bad_micro_batch_skips_the_accumulated_step():
    model, layers, tx, params = _setup(loss_average=None)
    capture = sf.make_capture(model, make_loss(None), layers)
    state = tx.init(params)
    before = _leaves((params, state.inner))
    x, y = make_batch("mlp", 0)
    grads, parts = None, {info.name: [] for info in layers}
    for i, (xs, ys) in enumerate(zip(x.chunk(2), y.chunk(2))):
        _, g, caps = capture(params, _poison_row(xs) if i == 1 else xs, ys)
        grads = g if grads is None else {n: grads[n] + g[n] for n in g}
        for info in layers:
            parts[info.name].append(layer_part(info, *state.inner.factors[info.name],
                                               caps[info.name], loss_average=None))
    stats = {n: accumulate(p, None) for n, p in parts.items()}
    updates, state = tx.update(grads, state, params, statistics=stats)
    params = sf.apply_updates(params, updates)
    _assert_identical(_leaves((params, state.inner)), before)
    assert int(state.skipped_steps) == 1


def test_plain_steps_neither_check_nor_copy_the_factors():
    model, layers, tx, params = _setup()
    capture = sf.make_capture(model, make_loss("batch"), layers)
    state = tx.init(params)
    x, y = make_batch("mlp", 0)
    _, grads, _ = capture(params, x, y)
    _, new = tx.update(grads, state, params)
    for name in state.inner.factors:
        for new_leaf, old_leaf in zip(new.inner.factors[name].K.leaves,
                                      state.inner.factors[name].K.leaves):
            assert new_leaf is old_leaf


def test_guarded_equals_unguarded_when_all_is_finite():
    model, layers, tx, params = _setup(kind="cnn")
    plain = sf.singd(layers, **HP)
    capture = sf.make_capture(model, make_loss("batch"), layers)
    p1, p2 = dict(params), dict(params)
    s1, s2 = tx.init(params), plain.init(params)
    for t in range(4):
        x, y = make_batch("cnn", t)
        _, g1, c1 = capture(p1, x, y)
        _, g2, c2 = capture(p2, x, y)
        u1, s1 = tx.update(g1, s1, p1, captures=c1 if t % 2 == 0 else None)
        u2, s2 = plain.update(g2, s2, p2, captures=c2 if t % 2 == 0 else None)
        p1, p2 = sf.apply_updates(p1, u1), sf.apply_updates(p2, u2)
    for k in p1:
        assert torch.equal(p1[k], p2[k])
    assert int(s1.inner.count) == 4 and int(s1.skipped_steps) == 0


def test_the_guard_does_not_synchronise():
    model, layers, tx, params = _setup()
    capture = sf.make_capture(model, make_loss("batch"), layers)
    state = tx.init(params)
    x, y = make_batch("mlp", 0)
    _, grads, caps = capture(params, _poison_row(x), y)
    with no_host_sync():
        updates, state = tx.update(grads, state, params, captures=caps)
        updates, state = tx.update(grads, state, params)
    assert int(state.skipped_steps) == 2


def test_all_finite_is_exact_in_every_dtype():
    big16 = torch.full((4,), 6e4, dtype=torch.float16)  # a sum of squares would overflow
    assert bool(sf.guard.all_finite([big16, torch.ones(3, dtype=torch.bfloat16),
                                     torch.ones(0), torch.arange(3)]))
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for bad in (float("nan"), float("inf"), -float("inf")):
            t = torch.ones(5, dtype=dtype)
            t[2] = bad
            assert not bool(sf.guard.all_finite([torch.ones(2), t]))


def test_the_detector_detects():
    t = torch.ones(())
    for convert in (lambda: t.item(), lambda: float(t), lambda: int(t), lambda: bool(t),
                    lambda: t.tolist(), lambda: [0, 1][t.long()]):
        with no_host_sync(), contextlib.suppress(HostSync):
            convert()
            raise AssertionError("a conversion went through")
    assert float(t) == 1.0  # restored


def test_the_guard_declares_what_it_wraps():
    model, layers, tx, params = _setup()
    inner = sf.singd(layers, **HP)
    assert tx.extras == inner.extras and tx.hyperparams == inner.hyperparams
    with pytest.raises(TypeError, match="capture"):
        tx.update({k: torch.zeros_like(v) for k, v in params.items()}, tx.init(params), params,
                  capture=None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("ok", [True, False])
def test_select_into_new_is_bit_exact_whatever_the_leaves_hold(dtype, ok):
    """In place, big leaves on their bits and small ones with where: NaN, inf and -0.0
    survive on the side that is picked; the tree returned is ``new`` itself."""
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1.5])

    def leaf(n, seed):
        t = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
        t[:6] = special.to(dtype).roll(seed)
        return t

    sizes = {"big": 1 << 15, "small": 7}  # either side of the bit path's threshold
    new = {k: leaf(n, 1) for k, n in sizes.items()}
    old = {k: leaf(n, 2) for k, n in sizes.items()}
    want = {k: (new if ok else old)[k].clone() for k in sizes}
    out = sf.guard.select(torch.tensor(ok), new, old, into_new=True)
    assert out is new
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[special.to(dtype).element_size()]
    for k in sizes:
        assert torch.equal(out[k].view(bits), want[k].view(bits)), k


def test_select_into_new_leaves_shared_storage_alone():
    """A leaf that is a view of its old one is selected out of place (so is every leaf)."""
    old = {"a": torch.arange(1 << 15, dtype=torch.float32), "b": torch.ones(3)}
    new = {"a": old["a"][:], "b": torch.zeros(3)}
    out = sf.guard.select(torch.tensor(False), new, old, into_new=True)
    assert out is not new and torch.equal(out["a"], old["a"]) and torch.equal(out["b"], old["b"])
    assert torch.equal(new["b"], torch.zeros(3))  # not written


@pytest.mark.parametrize("ok", [True, False])
def test_zero_where_not_in_place_is_exact(ok):
    t = torch.tensor([float("nan"), float("inf"), -0.0, 2.0])
    want = t.clone() if ok else torch.zeros(4)
    out = sf.guard.zero_where_not_(torch.tensor(ok), t)
    assert out is t and torch.equal(t.view(torch.int32), want.view(torch.int32))


def test_all_finite_cleaned_checks_then_cleans():
    a, b = torch.ones(4), torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    assert not bool(sf.guard.all_finite_cleaned_([a, b]))
    assert torch.isfinite(b).all() and torch.equal(a, torch.ones(4))
    assert bool(sf.guard.all_finite_cleaned_([a, b]))

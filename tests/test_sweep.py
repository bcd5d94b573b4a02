"""Vmapped sweeps (singd_functional/sweep.py) equal N sequential runs of the pure core."""

from __future__ import annotations

import math

import optree
import pytest
import torch

import singd_functional as sf
from tests.models import make_batch, make_loss, make_model

FAMILIES = [
    "dense", "diagonal", "block3diagonal", "hierarchical3_2", "triltoeplitz",
    "triutoeplitz", "triltopleftdiag", "trilbottomrightdiag", "triutopleftdiag",
    "triubottomrightdiag",
]
STEPS, T = 20, 3


def member_hyperparams(kfac_like: bool, dtype=torch.float64) -> sf.HyperParams:
    """Three members that differ in every numeric hyperparameter."""
    hp = dict(
        lr=[0.05, 0.02, 0.08],
        damping=[1e-3, 1e-2, 3e-3],
        lr_cov=[0.05, 0.1, 0.02],
        momentum=[0.9, 0.5, 0.0],
        weight_decay=[0.0, 1e-2, 1e-3],
    )
    if not kfac_like:
        hp["alpha1"] = [0.5, 0.2, 0.8]
    return sf.HyperParams(**{k: torch.tensor(v, dtype=dtype) for k, v in hp.items()})


def member(hp: sf.HyperParams, i: int) -> sf.HyperParams:
    """Member i's hyperparameters as 0-d tensors (what its own run is given)."""
    return sf.HyperParams(**{k: v[i] for k, v in hp._asdict().items() if v is not None})


def sequential(tx, capture, params, hp, batches, T=T):
    """One member's own run of the pure core: (losses [steps], params, state)."""
    state = tx.init(params)
    losses = []
    for t, (x, y) in enumerate(batches):
        loss, grads, captures = capture(params, x, y)
        updates, state = tx.update(
            grads, state, params, captures=captures if t % T == 0 else None, hyperparams=hp
        )
        params = sf.apply_updates(params, updates)
        losses.append(loss)
    return torch.stack(losses), params, state


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def assert_member_equals(sweep_state, losses, i, ref_losses, ref_params, ref_state, tol):
    assert rel_err(losses[:, i], ref_losses) <= tol, f"member {i}: loss curves differ"
    for k, p in ref_params.items():
        assert rel_err(sweep_state.params[k][i], p) <= tol, f"member {i}, {k}"
    for name, (K, C) in ref_state.factors.items():
        K_i, C_i = (f.map(lambda t, i=i: t[i]) for f in sweep_state.opt_state.factors[name])
        assert rel_err(K_i.to_dense(), K.to_dense()) <= tol, f"member {i}, K of {name}"
        assert rel_err(C_i.to_dense(), C.to_dense()) <= tol, f"member {i}, C of {name}"


def seeded(kind, n, dtype=torch.float64):
    models = [make_model(kind, seed=s).to(dtype) for s in range(n)]
    return models, [{k: v.detach().clone() for k, v in m.named_parameters()} for m in models]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kfac_like", [False, True], ids=["singd", "ikfac"])
def test_every_member_equals_its_sequential_run(family, kfac_like):
    """float64, 20 steps, T = 3, three members with their own seeds and hyperparameters."""
    models, member_params = seeded("mlp", 3)
    layers = sf.find_layers(models[0])
    capture = sf.make_capture(models[0], make_loss("batch"), layers)
    tx = sf.singd(layers, structures=(family, family), kfac_like=kfac_like,
                  kfac_approx="reduce" if kfac_like else "expand")
    hp = member_hyperparams(kfac_like)
    sweep = sf.make_sweep(tx, capture, hp)
    stacked, _ = torch.func.stack_module_state(models)
    batches = [make_batch("mlp", t) for t in range(STEPS)]
    state, losses = sweep.run(sweep.init(stacked, stacked=True), batches, T=T)
    assert losses.shape == (STEPS, 3)
    assert not state.diverged.any()
    for i in range(3):
        ref = sequential(tx, capture, member_params[i], member(hp, i), batches)
        assert_member_equals(state, losses, i, *ref, tol=1e-10)
    moved = rel_err(state.params["0.weight"][0], member_params[0]["0.weight"])
    assert moved > 1e-3, "the parameters barely moved: the comparison would catch nothing"
    # the members really differ (else one bug could hide behind another)
    assert rel_err(state.params["0.weight"][1], state.params["0.weight"][2]) > 1e-2


@pytest.mark.parametrize("structures", [("dense", "dense"), ("hierarchical3_2", "triltoeplitz")])
def test_float32(structures):
    models, member_params = seeded("mlp", 3, torch.float32)
    layers = sf.find_layers(models[0])
    capture = sf.make_capture(models[0], make_loss("batch"), layers)
    tx = sf.singd(layers, structures=structures)
    hp = member_hyperparams(False, torch.float32)
    sweep = sf.make_sweep(tx, capture, hp)
    stacked, _ = torch.func.stack_module_state(models)
    batches = [(x.float(), y) for x, y in (make_batch("mlp", t) for t in range(STEPS))]
    state, losses = sweep.run(sweep.init(stacked, stacked=True), batches, T=T)
    assert state.params["0.weight"].dtype == torch.float32
    for i in range(3):
        ref = sequential(tx, capture, member_params[i], member(hp, i), batches)
        assert_member_equals(state, losses, i, *ref, tol=1e-5)


@pytest.mark.parametrize("kind", ["cnn", "seq", "twice"])
def test_other_models_shared_params_grid(kind):
    """One set of parameters copied to every member; a grid over lr x damping."""
    model = make_model(kind)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    layers = sf.find_layers(model)
    capture = sf.make_capture(model, make_loss("batch"), layers)
    tx = sf.singd(layers, structures=("dense", "block3diagonal"), lr_cov=0.05)
    hp = sf.grid(lr=[0.02, 0.05], damping=[1e-3, 1e-2])
    sweep = sf.make_sweep(tx, capture, hp)
    batches = [make_batch(kind, t) for t in range(12)]
    state, losses = sweep.run(sweep.init(params), batches, T=2)
    for i in range(4):
        ref = sequential(tx, capture, params, member(hp, i), batches, T=2)
        assert_member_equals(state, losses, i, *ref, tol=1e-10)


def test_per_member_batches_and_seeds_only():
    """batch_axis=0 (every member its own batch) and (None, 0); members differ by seed only."""
    models, member_params = seeded("mlp", 3)
    layers = sf.find_layers(models[0])
    capture = sf.make_capture(models[0], make_loss("batch"), layers)
    tx = sf.singd(layers, lr=0.05, lr_cov=0.05, structures=("triutoeplitz", "dense"))
    stacked, _ = torch.func.stack_module_state(models)
    per_member = [[make_batch("mlp", 100 * i + t) for i in range(3)] for t in range(10)]
    batches = [(torch.stack([b[0] for b in bs]), torch.stack([b[1] for b in bs])) for bs in per_member]
    sweep = sf.make_sweep(tx, capture, num_members=3, batch_axis=0)
    state, losses = sweep.run(sweep.init(stacked, stacked=True), batches, T=2)
    for i in range(3):
        ref = sequential(tx, capture, member_params[i], None, [bs[i] for bs in per_member], T=2)
        assert_member_equals(state, losses, i, *ref, tol=1e-10)

    # shared inputs, per-member targets
    x = make_batch("mlp", 0)[0]
    ys = torch.stack([make_batch("mlp", 100 * i)[1] for i in range(3)])
    sweep = sf.make_sweep(tx, capture, num_members=3, batch_axis=(None, 0))
    state, losses = sweep.run(sweep.init(stacked, stacked=True), [(x, ys)] * 4, T=2)
    for i in range(3):
        ref = sequential(tx, capture, member_params[i], None, [(x, ys[i])] * 4, T=2)
        assert_member_equals(state, losses, i, *ref, tol=1e-10)


def test_diverging_member_is_masked_and_reported():
    """A member with a huge lr blows up; it stops with its last finite values, the
    others are exactly their sequential runs."""
    models, member_params = seeded("mlp", 1)
    params = member_params[0]
    layers = sf.find_layers(models[0])
    capture = sf.make_capture(models[0], make_loss("batch"), layers)
    tx = sf.singd(layers, lr_cov=0.05, structures=("dense", "hierarchical3_2"))
    hp = sf.HyperParams(lr=torch.tensor([0.05, 1e30, 0.02]), damping=torch.tensor([1e-3, 1e-3, 1e-2]))
    sweep = sf.make_sweep(tx, capture, hp)
    batches = [make_batch("mlp", t) for t in range(12)]
    state, losses = sweep.run(sweep.init(params), batches, T=2)
    assert state.diverged.tolist() == [False, True, False]
    for i in (0, 2):
        ref = sequential(tx, capture, params, member(hp, i), batches, T=2)
        assert_member_equals(state, losses, i, *ref, tol=1e-10)
        assert torch.isfinite(losses[:, i]).all()

    # the diverged member: replay its own run until its first non-finite step
    p, s = dict(params), tx.init(params)
    for t, (x, y) in enumerate(batches):
        loss, grads, captures = capture(p, x, y)
        updates, s_next = tx.update(grads, s, p, captures=captures if t % 2 == 0 else None,
                                    hyperparams=member(hp, 1))
        p_next = sf.apply_updates(p, updates)
        leaves = optree.tree_leaves((loss, updates, s_next), namespace=sf.PYTREE_NAMESPACE)
        if not all(torch.isfinite(v).all() for v in leaves if v.is_floating_point()):
            break
        p, s = p_next, s_next
    else:
        pytest.fail("lr = 1e30 did not diverge: the test checks nothing")
    assert torch.isfinite(losses[: t + 1, 1]).all() and torch.isnan(losses[t + 1 :, 1]).all()
    for k in params:
        assert rel_err(state.params[k][1], p[k]) <= 1e-10, f"{k}: the diverged member moved on"
        assert torch.isfinite(state.params[k][1]).all()
    assert torch.equal(state.opt_state.count, torch.tensor([12, t, 12]))


def test_chunks_equal_one_vmap():
    """chunk_size (members in groups, less memory) changes no number."""
    models, _ = seeded("mlp", 5)
    layers = sf.find_layers(models[0])
    capture = sf.make_capture(models[0], make_loss("batch"), layers)
    tx = sf.singd(layers, structures=("dense", "triltopleftdiag"))
    hp = sf.HyperParams(lr=torch.linspace(0.01, 0.05, 5, dtype=torch.float64))
    stacked, _ = torch.func.stack_module_state(models)
    batches = [make_batch("mlp", t) for t in range(4)]
    whole = sf.make_sweep(tx, capture, hp)
    chunked = sf.make_sweep(tx, capture, hp, chunk_size=2)
    s1, l1 = whole.run(whole.init(stacked, stacked=True), batches, T=2)
    s2, l2 = chunked.run(chunked.init(stacked, stacked=True), batches, T=2)
    assert torch.allclose(l1, l2, rtol=1e-12, atol=0)
    for k in s1.params:
        assert rel_err(s2.params[k], s1.params[k]) <= 1e-12


def test_grid():
    hp = sf.grid(lr=[1, 2], damping=[10, 20, 30])
    assert hp.lr.tolist() == [1, 1, 1, 2, 2, 2]
    assert hp.damping.tolist() == [10, 20, 30, 10, 20, 30]
    assert hp.momentum is None and hp.lr.dtype == torch.float64
    assert sf.grid(torch.float32, lr=torch.tensor([1.0])).lr.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        sf.grid(learning_rate=[1.0])
    with pytest.raises(ValueError, match="1-D"):
        sf.grid(lr=[[1.0]])


def test_errors_and_shared_values():
    model = make_model("mlp")
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    layers = sf.find_layers(model)
    capture = sf.make_capture(model, make_loss("batch"), layers)
    tx = sf.singd(layers)
    with pytest.raises(ValueError, match="one length N"):
        sf.make_sweep(tx, capture, sf.HyperParams(lr=torch.ones(2), damping=torch.ones(3)))
    with pytest.raises(ValueError, match=">= 0"):
        sf.make_sweep(tx, capture, sf.HyperParams(lr=torch.tensor([0.1, -0.1])))
    with pytest.raises(ValueError, match="nothing varies"):
        sf.make_sweep(tx, capture).init(params)
    stacked = {k: torch.stack([v, v]) for k, v in params.items()}
    with pytest.raises(ValueError, match="2 members"):
        sf.make_sweep(tx, capture, sf.grid(lr=[0.1, 0.2, 0.3])).init(stacked, stacked=True)
    with pytest.raises(ValueError, match="alpha1 cannot be overridden"):
        tx0 = sf.singd(layers, kfac_like=True)
        sweep = sf.make_sweep(tx0, capture, sf.grid(alpha1=[0.1, 0.2]))
        sweep.step(sweep.init(params), *make_batch("mlp", 0))

    # shared float and schedule values next to swept ones; changing a swept value in
    # the state (a schedule) is what the next step uses
    schedule = lambda t: 0.1 / (1 + t)  # noqa: E731
    hp = sf.HyperParams(lr=torch.tensor([0.05, 0.02]), momentum=0.5, lr_cov=schedule)
    sweep = sf.make_sweep(tx, capture, hp)
    state = sweep.init(params)
    batches = [make_batch("mlp", t) for t in range(6)]
    state, losses = sweep.run(state, batches[:3])
    state = state._replace(hyperparams={"lr": torch.tensor([0.01, 0.03])})
    state, losses2 = sweep.run(state, batches[3:], start=3)
    for i, (lr1, lr2) in enumerate([(0.05, 0.01), (0.02, 0.03)]):
        p, s = params, tx.init(params)
        for t, (x, y) in enumerate(batches):
            lr = torch.tensor(lr1 if t < 3 else lr2)
            _, grads, captures = capture(p, x, y)
            updates, s = tx.update(grads, s, p, captures=captures,
                                   hyperparams=sf.HyperParams(lr=lr, momentum=0.5, lr_cov=schedule))
            p = sf.apply_updates(p, updates)
        for k in p:
            assert rel_err(state.params[k][i], p[k]) <= 1e-10
    assert math.isfinite(losses2.sum().item())

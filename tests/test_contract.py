"""The strict contract (combine.py, hyperparams.py): declared extras, partition,
hyperparameters that reach every transform, SINGD as a chain of its primitives, guards."""

from __future__ import annotations

import dataclasses
import warnings

import optree
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import singd_functional as sf
import singd_functional.combine as combine


def setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).double()
    layers = sf.find_layers(model)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    capture = sf.make_capture(model, F.cross_entropy, layers)
    batches = [(torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,)))
               for _ in range(5)]
    return model, layers, params, capture, batches


def train(tx, capture, params, batches, hyperparams=None, T=2, **extra):
    """Run ``tx``; ``hyperparams`` is fixed or a callable of the step."""
    state = tx.init(params)
    for t, (x, y) in enumerate(batches):
        _, grads, caps = capture(params, x, y)
        hp = hyperparams(t) if callable(hyperparams) else hyperparams
        updates, state = tx.update(grads, state, params, captures=caps if t % T == 0 else None,
                                   hyperparams=hp, **extra)
        params = sf.apply_updates(params, updates)
    return params, state


LN = ("1.weight", "1.bias")


# ------------------------------------------------------------------- declared extras
@pytest.mark.parametrize("wrap", ["singd", "chain", "masked", "partition", "fallback"])
def test_a_misspelt_extra_is_a_type_error_with_a_suggestion(wrap):
    _, layers, params, capture, batches = setup()
    core = sf.singd(layers)
    tx = {
        "singd": core,
        "chain": sf.chain(sf.clip_by_global_norm(1.0), core),
        "masked": sf.masked(core, list(params)),
        "partition": sf.partition({"all": core}, {k: "all" for k in params}),
        "fallback": sf.singd(layers, fallback=sf.adamw()),
    }[wrap]
    _, grads, caps = capture(params, *batches[0])
    with pytest.raises(TypeError, match=r"captrues=.*did you mean `captures`"):
        tx.update(grads, tx.init(params), params, captrues=caps)
    with pytest.raises(TypeError, match=r"hyperparam=.*did you mean `hyperparams`"):
        tx.update(grads, tx.init(params), params, hyperparam=sf.HyperParams(lr=0.0))


def test_an_extra_nobody_declares_names_the_declared_ones():
    tx = sf.chain(sf.sgd(), sf.adamw())
    params = {"w": torch.zeros(2)}
    with pytest.raises(TypeError, match=r"`zzz=`; the transforms declare \['hyperparams'\]"):
        tx.update(params, tx.init(params), params, zzz=1)
    bare = sf.chain(sf.scale_by_schedule(lambda t: 1.0))
    with pytest.raises(TypeError, match="declare no extras"):
        bare.update(params, bare.init(params), params, captures=None)


def test_each_transform_gets_only_the_extras_it_declares():
    seen = []

    def init(params):
        return ()

    def update(updates, state, params=None, *, note=None):
        seen.append(note)
        return updates, state

    mine = sf.GradientTransformation(init, update, frozenset({"note"}))
    _, layers, params, capture, batches = setup()
    tx = sf.chain(mine, sf.singd(layers), sf.masked(mine, ["0.weight"]))
    assert tx.extras == {"note", "captures", "statistics", "grad_scale", "hyperparams"}
    _, grads, caps = capture(params, *batches[0])
    # singd would raise on `note=`, `mine` on `captures=`: neither gets the other's
    tx.update(grads, tx.init(params), params, note="hi", captures=caps)
    assert seen == ["hi", "hi"]


def test_missing_params_are_a_clear_error():
    _, layers, params, capture, batches = setup()
    _, grads, _ = capture(params, *batches[0])
    for tx in [sf.singd(layers), sf.chain(sf.clip_by_global_norm(1.0), sf.singd(layers)),
               sf.sgd(weight_decay=0.1), sf.adamw()]:
        with pytest.raises(ValueError, match="needs the parameters"):
            tx.update(grads, tx.init(params))


def test_a_hyperparameter_nobody_reads_is_a_type_error():
    _, layers, params, capture, batches = setup()
    _, grads, _ = capture(params, *batches[0])
    tx = sf.singd(layers)
    with pytest.raises(TypeError, match=r"sets \['b1'\], which no transform here reads"):
        tx.update(grads, tx.init(params), params, hyperparams=sf.HyperParams(b1=0.5))
    with_adamw = sf.singd(layers, fallback=sf.adamw())
    with_adamw.update(grads, with_adamw.init(params), params, hyperparams=sf.HyperParams(b1=0.5))
    with pytest.raises(TypeError, match="max_norm"):
        sf.sgd().update(grads, sf.sgd().init(params), params,
                        hyperparams=sf.HyperParams(max_norm=1.0))
    with pytest.raises(ValueError, match=r"labels \['lr'\].*pass sf.HyperParams"):
        tx.update(grads, tx.init(params), params, hyperparams={"lr": 0.1})
    with pytest.raises(TypeError, match="must be a sf.HyperParams"):
        sf.sgd().update(grads, sf.sgd().init(params), params, hyperparams={"lr": 0.1})


# -------------------------------------------------------------------------- partition
def test_partition_equals_each_transform_on_its_keys():
    _, layers, params, capture, batches = setup()
    singd_keys = [k for info in layers for k in info.params]
    labels = {k: ("singd" if k in singd_keys else "ln") for k in params}
    parts = {"singd": sf.singd(layers, lr=0.1), "ln": sf.adamw(lr=0.01)}
    p_map, s_map = train(sf.partition(parts, labels), capture, params, batches)
    p_call, _ = train(sf.partition(parts, lambda tree: {k: labels[k] for k in tree}),
                      capture, params, batches)
    assert set(s_map) == {"singd", "ln"} and set(s_map["ln"].mu) == set(LN)
    # the sugar: singd(fallback=) is that partition
    p_fb, _ = train(sf.singd(layers, lr=0.1, fallback=sf.adamw(lr=0.01)), capture, params,
                    batches)
    for k in params:
        assert torch.equal(p_map[k], p_call[k])
        assert torch.allclose(p_map[k], p_fb[k], rtol=1e-14, atol=0), k
        assert not torch.equal(p_map[k], params[k]), f"{k} did not move"


def test_partition_rejects_unlabelled_and_unknown():
    params = {"a": torch.zeros(2), "b": torch.zeros(2)}
    tx = sf.partition({"x": sf.sgd()}, {"a": "x"})
    with pytest.raises(ValueError, match=r"no label for \['b'\]"):
        tx.init(params)
    tx = sf.partition({"x": sf.sgd()}, {"a": "x", "b": "y"})
    with pytest.raises(ValueError, match="unknown labels"):
        tx.init(params)
    tx = sf.partition({"x": sf.sgd()}, {"a": "x", "b": "x"})
    with pytest.raises(ValueError, match="unknown labels"):
        tx.update(params, tx.init(params), params, hyperparams={"z": sf.HyperParams(lr=0.0)})


# ------------------------------------------------------- hyperparameters reach everyone
@pytest.mark.parametrize("fallback", ["none", "sgd", "adamw"])
@pytest.mark.parametrize("lr", [0.0, torch.tensor(0.0, dtype=torch.float64)], ids=["f", "t"])
def test_zero_lr_freezes_every_parameter(fallback, lr):
    _, layers, params, capture, batches = setup()
    fb = {"none": None, "sgd": sf.sgd(lr=0.1), "adamw": sf.adamw(lr=0.1)}[fallback]
    tx = sf.chain(sf.clip_by_global_norm(10.0), sf.singd(layers, lr=0.1, fallback=fb))
    frozen, _ = train(tx, capture, params, batches, sf.HyperParams(lr=lr))
    moved, _ = train(tx, capture, params, batches)
    for k in params:
        assert torch.equal(frozen[k], params[k]), k
        assert not torch.equal(moved[k], params[k]), k


def test_a_schedule_reaches_the_fallback():
    """lr(t) as 0-d tensors: the AdamW-handled parameters follow the schedule exactly as
    an AdamW given lr(t) at each step would (SINGD's parameters held by the per-label
    form, so that the LayerNorm's gradients can be recomputed without SINGD)."""
    _, layers, params, capture, batches = setup()

    def lr(t):
        return torch.tensor(0.05 / (1 + t), dtype=torch.float64)

    tx = sf.singd(layers, lr=1.0, fallback=sf.adamw(lr=1.0))
    scheduled, _ = train(tx, capture, params, batches, lambda t: sf.HyperParams(lr=lr(t)))
    unscheduled, _ = train(tx, capture, params, batches)
    for k in params:
        assert not torch.equal(scheduled[k], params[k]), k
        assert not torch.allclose(scheduled[k], unscheduled[k]), k

    def per_label(t):
        return {"singd": sf.HyperParams(lr=0.0), "fallback": sf.HyperParams(lr=lr(t))}

    got, _ = train(tx, capture, params, batches, per_label)
    p, state = dict(params), sf.adamw().init({k: params[k] for k in LN})
    for t, (x, y) in enumerate(batches):
        _, grads, _ = capture(p, x, y)
        ln = {k: p[k] for k in LN}
        u, state = sf.adamw(lr=float(lr(t))).update({k: grads[k] for k in LN}, state, ln)
        p = {**p, **sf.apply_updates(ln, u)}
    for k in params:
        assert torch.allclose(got[k], p[k], rtol=1e-13, atol=0), k


def test_a_sweep_over_lr_moves_every_parameter():
    model, layers, params, capture, batches = setup()
    tx = sf.singd(layers, lr=0.1, fallback=sf.adamw(lr=0.1))
    lrs = [0.0, 0.01, 0.05]
    sweep = sf.make_sweep(tx, capture, sf.grid(lr=lrs))
    state, _ = sweep.run(sweep.init(params), batches, T=2)
    for i, lr in enumerate(lrs):
        ref, _ = train(tx, capture, params, batches,
                       sf.HyperParams(lr=torch.tensor(lr, dtype=torch.float64)))
        for k in params:
            got = state.params[k][i]
            assert torch.allclose(got, ref[k], rtol=1e-12, atol=1e-15), (i, k)
            assert torch.equal(got, params[k]) == (lr == 0.0), (i, k)


# --------------------------------------------------------- SINGD as its primitives' chain
@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_singd_is_the_chain_of_its_primitives(kind):
    _, layers, params, capture, batches = setup()
    hp = dict(lr=0.05, momentum=0.8, weight_decay=0.01, damping=1e-2, alpha1=0.3, lr_cov=0.1)
    if kind == "tensor":
        hp = {k: torch.tensor(v, dtype=torch.float64) for k, v in hp.items()}
    chained = sf.chain(
        sf.scale_by_kronecker_factors(layers, damping=hp["damping"], alpha1=hp["alpha1"],
                                      lr_cov=hp["lr_cov"], structures=("diagonal", "dense")),
        sf.add_decayed_weights(hp["weight_decay"]),
        sf.trace(hp["momentum"]),
        sf.scale_by_learning_rate(hp["lr"]),
    )
    core = sf.singd(layers, structures=("diagonal", "dense"), **hp)
    p1, s1 = train(chained, capture, params, batches, grad_scale=4.0)
    p2, s2 = train(core, capture, params, batches, grad_scale=4.0)
    for k in params:
        assert torch.equal(p1[k], p2[k]), k
    for name, (K, C) in s2.factors.items():
        assert torch.equal(s1[0].factors[name].K.to_dense(), K.to_dense())
        assert torch.equal(s1[0].factors[name].C.to_dense(), C.to_dense())


def reference_sgd_on_identity(params, grads_of, steps, lr, momentum, weight_decay):
    """v <- m v + g + wd w; w <- w - lr v (written here; with K = C = I throughout)."""
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    p = dict(params)
    for t in range(steps):
        g = grads_of(p, t)
        v = {k: momentum * v[k] + g[k] + weight_decay * p[k] for k in p}
        p = {k: p[k] - lr * v[k] for k in p}
    return p


@pytest.mark.parametrize("where", ["built", "per_call"])
def test_singd_heavy_ball_with_tensor_hyperparameters_against_a_reference(where):
    """Without captures K = C = I, so SINGD is heavy-ball SGD: momentum as a 0-d tensor
    must be used (a core that dropped it for tensors would pass every self-comparison)."""
    _, layers, params, capture, batches = setup()
    hp = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}
    t_hp = {k: torch.tensor(v, dtype=torch.float64) for k, v in hp.items()}

    def grads_of(p, t):
        return capture(p, *batches[t])[1]

    ref = reference_sgd_on_identity(params, grads_of, len(batches), **hp)
    if where == "built":
        tx, per_call = sf.singd(layers, **t_hp), None
    else:
        tx, per_call = sf.singd(layers, lr=1.0, momentum=0.1), sf.HyperParams(**t_hp)
    state, p = tx.init(params), dict(params)
    for t in range(len(batches)):  # no captures: the factors stay I
        updates, state = tx.update(grads_of(p, t), state, p, hyperparams=per_call)
        p = sf.apply_updates(p, updates)
    for k in params:
        assert torch.allclose(p[k], ref[k], rtol=1e-13, atol=1e-15), k


# --------------------------------------------------------------------------- guards
def test_params_that_require_grad_warn_once(monkeypatch):
    model, layers, params, capture, batches = setup()
    monkeypatch.setattr(combine, "_warned_tracked", False)
    tx = sf.singd(layers)
    live = dict(model.named_parameters())
    with pytest.warns(UserWarning, match=r"\.detach\(\)"):
        state = tx.init(live)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tx.init(live)  # once only
    monkeypatch.setattr(combine, "_warned_tracked", False)
    _, grads, _ = capture(params, *batches[0])
    with pytest.warns(UserWarning, match="grad_fn"):
        tx.update(grads, tx.init(params), {k: v * 1.0 for k, v in live.items()})
    del state


def test_two_layers_sharing_a_weight_are_refused():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = shared.weight
    with pytest.raises(ValueError, match="one layer per weight"):
        sf.find_layers(model)
    # layers put together by hand reach the transforms: refused there too
    info = sf.find_layers(nn.Sequential(nn.Linear(4, 4)))[0]
    layers = (info, dataclasses.replace(info, name="again"))
    with pytest.raises(ValueError, match="share the parameter '0.weight'"):
        sf.singd(layers)
    with pytest.raises(ValueError, match="share the parameter"):
        sf.scale_by_kronecker_factors(layers)


# ---------------------------------------------------------------------------- pytrees
def test_state_flattens_in_the_package_namespace():
    _, layers, params, _, _ = setup()
    state = sf.singd(layers, structures=("diagonal", "dense")).init(params)
    leaves = optree.tree_leaves(state, namespace=sf.PYTREE_NAMESPACE)
    assert all(isinstance(x, torch.Tensor) for x in leaves)
    # not registered globally: without the namespace a structure is one opaque leaf
    plain = optree.tree_leaves(state)
    assert any(isinstance(x, sf.structures.StructuredMatrix) for x in plain)
    assert sf.PYTREE_NAMESPACE == "singd_functional"


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"lr": float("nan")}, ValueError, "lr must be finite"),
    ({"lr": "0.01"}, TypeError, "lr must be a float or a 0-d tensor, got '0.01'"),
    ({"lr": torch.tensor([0.1, 0.2])}, ValueError, "one value per member is for sf.make_sweep"),
    ({"alpha1": 1.0}, ValueError, "alpha1 must be < 1"),
    ({"momentum": 1.5}, ValueError, "momentum must be < 1"),
    ({"damping": -1.0}, ValueError, "damping must be >= 0"),
])
def test_misuse_of_numbers_is_refused_when_built(kwargs, error, match):
    _, layers, _, _, _ = setup()
    with pytest.raises(error, match=match):
        sf.singd(layers, **kwargs)


def test_misuse_of_numbers_is_refused_per_call():
    _, layers, params, capture, batches = setup()
    _, grads, _ = capture(params, *batches[0])
    tx = sf.singd(layers)
    for hp, match in [(sf.HyperParams(lr=float("nan")), "lr must be finite"),
                      (sf.HyperParams(alpha1=1.0), "alpha1 must be < 1"),
                      (sf.HyperParams(lr="0.1"), "lr must be a float")]:
        with pytest.raises((ValueError, TypeError), match=match):
            tx.update(grads, tx.init(params), params, hyperparams=hp)
    with pytest.raises(ValueError, match="b1 must be < 1"):
        sf.adamw(betas=(1.0, 0.999))


def test_a_sweep_per_label_gives_the_fallback_its_own_lr():
    _, layers, params, capture, batches = setup()
    tx = sf.singd(layers, lr=0.1, fallback=sf.adamw(lr=0.1))
    g = sf.grid(lr=[0.01, 0.05])
    hp = {"singd": g, "fallback": g._replace(lr=g.lr / 10)}
    sweep = sf.make_sweep(tx, capture, hp)
    state, _ = sweep.run(sweep.init(params), batches, T=2)
    assert set(state.hyperparams) == {"singd", "fallback"}
    for i in range(2):
        member = {label: sf.HyperParams(lr=h.lr[i]) for label, h in hp.items()}
        ref, _ = train(tx, capture, params, batches, member)
        for k in params:
            assert torch.allclose(state.params[k][i], ref[k], rtol=1e-12, atol=1e-15), (i, k)
    with pytest.raises(ValueError, match="one length N"):
        sf.make_sweep(tx, capture, {"singd": g, "fallback": sf.grid(lr=[0.1, 0.2, 0.3])})


def test_the_fallback_gets_its_own_extras_and_unscaled_gradients():
    seen = []

    def update(updates, state, params=None, *, note=None):
        seen.append((note, {k: u.clone() for k, u in updates.items()}))
        return {k: torch.zeros_like(u) for k, u in updates.items()}, state

    mine = sf.GradientTransformation(lambda params: (), update, frozenset({"note"}))
    _, layers, params, capture, batches = setup()
    tx = sf.singd(layers, fallback=mine)
    assert "note" in tx.extras
    _, grads, caps = capture(params, *batches[0])
    tx.update(grads, tx.init(params), params, captures=caps, note="x", grad_scale=4.0)
    (note, got), = seen
    assert note == "x" and set(got) == set(LN)
    for k in LN:
        assert torch.equal(got[k], grads[k] / 4.0)
    with pytest.raises(TypeError, match="did you mean `note`"):
        tx.update(grads, tx.init(params), params, nose="x")

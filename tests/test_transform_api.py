"""The transform's contract: errors, overrides, purity, fallbacks and composition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import singd_functional as sf


def setup(**hp):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).double()
    layers = sf.find_layers(model)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    capture = sf.make_capture(model, F.cross_entropy, layers)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    _, grads, caps = capture(params, x, y)
    tx = sf.singd(layers, **hp)
    return model, layers, params, grads, caps, tx


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"structures": ("dense", "toeplitz")}, "unknown structure 'toeplitz'"),
    ({"structures": "dense"}, "pair"),
    ({"kfac_approx": "mean"}, "kfac_approx"),
    ({"loss_average": "sequence"}, "loss_average"),
    ({"loss_average": 0}, "loss_average"),
    ({"lr": -1.0}, "lr must be >= 0"),
    ({"damping": -1e-3}, "damping"),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        setup(**kwargs)


def test_missing_captures_name_the_layer():
    _, _, params, grads, caps, tx = setup()
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"missing layers \['3'\]"):
        tx.update(grads, state, params, captures={"0": caps["0"]})


def test_shape_mismatch_between_state_and_params():
    _, _, params, grads, caps, tx = setup()
    state = tx.init(params)
    bad = dict(grads)
    bad["3.weight"] = torch.zeros(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="3.weight"):
        tx.update(bad, state, params)


def test_negative_override_and_alpha1_without_momenta():
    _, _, params, grads, _, tx = setup()
    state = tx.init(params)
    with pytest.raises(ValueError, match="momentum"):
        tx.update(grads, state, params, hyperparams=sf.HyperParams(momentum=-0.1))
    _, _, params, grads, _, tx0 = setup(alpha1=0.0)
    with pytest.raises(ValueError, match="alpha1"):
        tx0.update(grads, tx0.init(params), params, hyperparams=sf.HyperParams(alpha1=0.3))


def test_update_does_not_mutate_inputs():
    _, _, params, grads, caps, tx = setup()
    state = tx.init(params)
    before = [t.clone() for t in (list(params.values()) + list(grads.values()))]
    state_before = [t.clone() for t in torch.utils._pytree.tree_leaves(state)]
    tx.update(grads, state, params, captures=caps)
    after = list(params.values()) + list(grads.values())
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.equal(a, b) for a, b in zip(state_before, torch.utils._pytree.tree_leaves(state)))


def test_hyperparams_override_equals_building_with_them():
    _, layers, params, grads, caps, tx = setup()
    tx2 = sf.singd(layers, lr=0.3, damping=0.1, lr_cov=0.2, momentum=0.5, weight_decay=0.01)
    hp = sf.HyperParams(lr=torch.tensor(0.3, dtype=torch.float64), damping=0.1, lr_cov=0.2,
                        momentum=0.5, weight_decay=torch.tensor(0.01, dtype=torch.float64))
    u1, s1 = tx.update(grads, tx.init(params), params, captures=caps, hyperparams=hp)
    u2, s2 = tx2.update(grads, tx2.init(params), params, captures=caps)
    for k in u1:
        assert torch.allclose(u1[k], u2[k], rtol=1e-14, atol=0)


def test_skipping_captures_keeps_factors():
    _, _, params, grads, caps, tx = setup()
    state = tx.init(params)
    _, s1 = tx.update(grads, state, params)
    for name in state.factors:
        assert torch.equal(s1.factors[name].K.to_dense(), state.factors[name].K.to_dense())
    _, s2 = tx.update(grads, state, params, captures=caps)
    assert not torch.equal(s2.factors["0"].K.to_dense(), state.factors["0"].K.to_dense())
    assert int(s2.count) == 1


def test_default_fallback_is_heavy_ball_sgd_for_other_parameters():
    _, _, params, grads, _, tx = setup(lr=0.1, momentum=0.9, weight_decay=0.01)
    updates, _ = tx.update(grads, tx.init(params), params)
    sgd = sf.sgd(lr=0.1, momentum=0.9, weight_decay=0.01)
    ln = {k: v for k, v in params.items() if k.startswith("1.")}
    ref, _ = sgd.update({k: grads[k] for k in ln}, sgd.init(ln), ln)
    for k in ln:
        assert torch.allclose(updates[k], ref[k], rtol=1e-14)


def test_adamw_fallback_matches_torch_adamw():
    model, layers, params, grads, _, _ = setup()
    tx = sf.singd(layers, lr=0.1, fallback=sf.adamw(lr=0.01, weight_decay=0.1))
    state = tx.init(params)
    assert set(state.velocity) == {k for info in layers for k in info.params}
    ln = [p for k, p in model.named_parameters() if k.startswith("1.")]
    opt = torch.optim.AdamW(ln, lr=0.01, weight_decay=0.1)
    p = dict(params)
    for _ in range(3):
        updates, state = tx.update(grads, state, p)
        p = sf.apply_updates(p, updates)
        for k, prm in model.named_parameters():
            prm.grad = grads[k].clone()
        opt.step()
    for k, prm in model.named_parameters():
        if k.startswith("1."):
            assert torch.allclose(p[k], prm.detach(), rtol=1e-12, atol=1e-14)


def test_chain_clip_then_singd_then_schedule():
    _, layers, params, grads, caps, tx = setup(lr=0.1)
    chained = sf.chain(sf.clip_by_global_norm(1e-3), tx, sf.scale_by_schedule(lambda t: 0.5 ** (t + 1)))
    state = chained.init(params)
    updates, state = chained.update(grads, state, params, captures=caps)
    clip = sf.clip_by_global_norm(1e-3)
    clipped, _ = clip.update(grads, clip.init(params))
    ref, _ = tx.update(clipped, tx.init(params), params, captures=caps)
    for k in ref:
        assert torch.allclose(updates[k], 0.5 * ref[k], rtol=1e-13)
    updates2, _ = chained.update(grads, state, params)
    assert int(state[2].count) == 1 and updates2.keys() == updates.keys()


def test_masked_applies_only_to_chosen_keys():
    _, _, params, grads, _, _ = setup()
    tx = sf.masked(sf.sgd(lr=1.0, momentum=0.0), ["0.weight"])
    updates, _ = tx.update(grads, tx.init(params), params)
    assert torch.allclose(updates["0.weight"], -grads["0.weight"])
    assert updates["3.weight"] is grads["3.weight"]


def test_apply_updates_is_out_of_place():
    params = {"w": torch.ones(2)}
    new = sf.apply_updates(params, {"w": torch.ones(2)})
    assert torch.equal(params["w"], torch.ones(2)) and torch.equal(new["w"], 2 * torch.ones(2))


def test_preconditioner_dtype():
    _, layers, params, grads, caps, _ = setup()
    tx = sf.singd(layers, preconditioner_dtype=(torch.float32, None))
    state = tx.init(params)
    assert state.factors["0"].K.dtype == torch.float32 and state.factors["0"].C.dtype == torch.float64
    updates, state = tx.update(grads, state, params, captures=caps)
    assert updates["0.weight"].dtype == torch.float64 and state.factors["0"].K.dtype == torch.float32

"""The drop-in's argument checks and its all-or-nothing step (issue 12: half-done, misuse)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import singd_functional as sf
from tests.models import make_batch, make_loss, make_model
from tests.test_optim import BASE, assert_moved
from tests.test_optim_checkpoint import _assert_equal


def _two_groups(**hp):
    model = make_model("mlp")
    layers = [m for m in model if isinstance(m, nn.Linear)]
    groups = [{"params": list(layers[0].parameters())},
              {"params": [p for m in layers[1:] for p in m.parameters()]}]
    return model, sf.SINGD(model, groups, **{**BASE, **hp})


def _backward(model, t=0):
    x, y = make_batch("mlp", t)
    make_loss("batch")(model(x), y).backward()


def _snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("entry, value", [
    ("lr", float("nan")), ("lr", -0.1), ("momentum", 1.0), ("alpha1", 1.5),
    ("T", 0), ("structures", ("diagonal", "dense")), ("lr", "0.01"),
])
def test_a_bad_group_1_leaves_group_0_untouched(entry, value):
    """step() checks every group before it changes any: all or nothing."""
    model, opt = _two_groups()
    opt.zero_grad()
    _backward(model)
    params, state = _snapshot(model, opt)
    good = opt.param_groups[1][entry]
    opt.param_groups[1][entry] = value
    with pytest.raises((ValueError, TypeError), match="param group 1"):
        opt.step()
    opt.param_groups[1][entry] = good
    _assert_equal(model.state_dict(), params)
    _assert_equal(opt.state_dict(), state)
    assert [g["step"] for g in opt.param_groups] == [0, 0]
    # fixed, the same step (its recorded statistics kept) goes through
    opt.step()
    assert [g["step"] for g in opt.param_groups] == [1, 1]
    for t in range(1, 6):
        opt.zero_grad()
        _backward(model, t)
        opt.step()
    assert_moved("mlp", dict(model.named_parameters()))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lr=float("nan")), ValueError, r"lr \(the learning rate\) must be finite"),
    (dict(lr=-0.1), ValueError, r"lr \(the learning rate\) must be >= 0"),
    (dict(lr=torch.tensor(-0.1)), ValueError, r"lr \(the learning rate\) must be >= 0"),
    (dict(lr="0.01"), TypeError, r"got str '0.01'; write lr=0.01"),
    (dict(alpha1=1.0), ValueError, r"alpha1 .* must be < 1"),
    (dict(momentum=1.0), ValueError, r"momentum .* must be < 1"),
    (dict(momentum=float("inf")), ValueError, r"momentum .* must be finite"),
    (dict(init_grad_scale=0.0), ValueError, r"init_grad_scale must be a finite number > 0"),
    (dict(init_grad_scale=-2.0), ValueError, r"init_grad_scale must be a finite number > 0"),
    (dict(preconditioner_dtype=torch.float32), TypeError,
     r"got the single dtype torch.float32; write preconditioner_dtype=\(torch.float32, "),
    (dict(T=0), ValueError, r"T must be a positive int"),
    (dict(structures=("dense",)), TypeError, r"structures must be a pair"),
])
def test_bad_arguments_fail_at_construction_naming_the_fix(kwargs, error, match):
    with pytest.raises(error, match=match):
        sf.SINGD(make_model("mlp"), **{**BASE, **kwargs})


def test_kfac_like_ignores_alpha1():
    sf.SINGD(make_model("mlp"), **{**BASE, "alpha1": 1.0, "kfac_like": True})


def test_tensor_lr_is_a_valid_learning_rate():
    model = make_model("mlp")
    opt = sf.SINGD(model, **{**BASE, "lr": torch.tensor(0.05)})
    for t in range(3):
        opt.zero_grad()
        _backward(model, t)
        opt.step()
    assert_moved("mlp", dict(model.named_parameters()))


def test_a_bad_value_set_later_fails_at_step_before_any_change():
    model = make_model("mlp")
    opt = sf.SINGD(model, **BASE)
    opt.zero_grad()
    _backward(model)
    params, state = _snapshot(model, opt)
    opt.param_groups[0]["lr"] = torch.tensor(math.nan)
    with pytest.raises(ValueError, match=r"param group 0: lr \(the learning rate\) must be finite"):
        opt.step()
    opt.param_groups[0]["lr"] = BASE["lr"]
    _assert_equal(model.state_dict(), params)
    _assert_equal(opt.state_dict(), state)


def test_T_set_to_0_later_is_a_clear_error_in_the_forward_pass():
    """Was a ZeroDivisionError inside the forward hook."""
    model = make_model("mlp")
    opt = sf.SINGD(model, **BASE)
    opt.param_groups[0]["T"] = 0
    x, _ = make_batch("mlp", 0)
    with pytest.raises(ValueError, match=r"param group 0 \(layer '0'\): T must be a positive int"):
        model(x)
    with pytest.raises(ValueError, match="param group 0: T must be a positive int"):
        opt.step()


def test_structures_as_one_name_means_both_factors():
    model = make_model("mlp")
    opt = sf.SINGD(model, **{**BASE, "structures": "diagonal"})
    assert opt.param_groups[0]["structures"] == ("diagonal", "diagonal")
    st = opt.state[model[0].weight]
    assert type(st["K"]).__name__ == type(st["C"]).__name__ == "Diagonal" or (
        st["K"].name == st["C"].name == sf.structures.get("diagonal").name
    )
    # and in a param group
    model = make_model("mlp")
    opt = sf.SINGD(model, [{"params": list(model.parameters()), "structures": "dense"}], **BASE)
    assert opt.param_groups[0]["structures"] == ("dense", "dense")

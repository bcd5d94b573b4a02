"""state_dict / load_state_dict: weights_only checkpoints, no mutation, bit-identical resume."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import singd_functional as sf
from tests.models import make_loss, make_model
from tests.test_optim import BASE, train

STRUCTURES = [("dense", "block3diagonal"), ("hierarchical3_2", "triltoeplitz"),
              ("triutoeplitz", "trilbottomrightdiag"), ("diagonal", "triubottomrightdiag")]
PLAIN = (torch.Tensor, int, float, str, bool, type(None), torch.dtype)


def _assert_plain(obj, path="state_dict"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, (int, str)), f"{path}: key {k!r}"
            _assert_plain(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _assert_plain(v, f"{path}[{i}]")
    else:
        assert isinstance(obj, PLAIN), f"{path} holds a {type(obj).__name__}"


def _roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_equal(a, b, path="state"):
    """Recursive exact equality of nested dicts/lists/tensors."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    else:
        assert a == b, path


def _make(structures, seed=0, **hp):
    model = make_model("cnn", seed)
    opt = sf.SINGD(model, **{**BASE, "T": 3, "structures": structures, **hp})
    return model, opt


@pytest.mark.parametrize("structures", STRUCTURES, ids=lambda s: "-".join(s))
def test_state_dict_is_plain_and_loads_with_weights_only(structures):
    model, opt = _make(structures, preconditioner_dtype=(torch.float32, None))
    train(model, opt, "cnn", 4, make_loss("batch"))
    sd = opt.state_dict()
    _assert_plain(sd)
    loaded = _roundtrip(sd)
    _assert_equal(loaded, sd)
    assert sd["state"][0]["K"]["structure"] == structures[0]
    assert sd["param_groups"][0]["step"] == 4


@pytest.mark.parametrize("structures", STRUCTURES, ids=lambda s: "-".join(s))
def test_resume_is_bit_identical(structures):
    """Stop after 4 steps (mid T-cycle, with an LR scheduler), reload, run 5 more."""
    loss_fn = make_loss("batch")

    def schedule(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)

    model, opt = _make(structures)
    sched = schedule(opt)
    for t in range(9):
        train(model, opt, "cnn", 1, loss_fn, start=t)
        sched.step()

    model_a, opt_a = _make(structures)
    sched_a = schedule(opt_a)
    for t in range(4):
        train(model_a, opt_a, "cnn", 1, loss_fn, start=t)
        sched_a.step()
    ckpt = _roundtrip({"model": model_a.state_dict(), "opt": opt_a.state_dict(),
                       "sched": sched_a.state_dict()})

    model_b, opt_b = _make(structures, seed=7)  # other weights: all must come from the checkpoint
    sched_b = schedule(opt_b)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    sched_b.load_state_dict(ckpt["sched"])
    for t in range(4, 9):
        train(model_b, opt_b, "cnn", 1, loss_fn, start=t)
        sched_b.step()

    for (k, p), q in zip(model.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), k
    _assert_equal(opt_b.state_dict(), opt.state_dict())


def test_load_state_dict_does_not_mutate_its_argument():
    model, opt = _make(("dense", "hierarchical3_2"))
    train(model, opt, "cnn", 2, make_loss("batch"))
    sd = opt.state_dict()
    frozen = copy.deepcopy(sd)
    model_b, opt_b = _make(("dense", "hierarchical3_2"))
    opt_b.load_state_dict(sd)
    train(model_b, opt_b, "cnn", 3, make_loss("batch"), start=2)
    opt_b.param_groups[0]["lr"] = 123.0
    _assert_equal(sd, frozen)


def test_callable_lr_cov_is_not_saved_and_the_loading_optimizer_keeps_its_own():
    def lr_cov(t):
        return 0.1 / (1 + t)

    model, opt = _make(("dense", "dense"), lr_cov=lr_cov)
    train(model, opt, "cnn", 2, make_loss("batch"))
    sd = opt.state_dict()
    assert sd["param_groups"][0]["lr_cov"] is None
    assert opt.param_groups[0]["lr_cov"] is lr_cov, "state_dict must not touch the live group"

    def other(t):
        return 0.05

    _, opt_b = _make(("dense", "dense"), lr_cov=other)
    opt_b.load_state_dict(_roundtrip(sd))
    assert opt_b.param_groups[0]["lr_cov"] is other


def test_loading_another_structure_is_a_clear_error():
    model, opt = _make(("dense", "dense"))
    sd = opt.state_dict()
    sd["state"][0]["K"] = {"structure": "diagonal", "tensors": [torch.ones(28)]}
    _, opt_b = _make(("dense", "dense"))
    with pytest.raises(ValueError, match="no K of structure 'dense'"):
        opt_b.load_state_dict(sd)


def _mlp(widths, **hp):
    torch.manual_seed(0)
    layers = [nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    model = nn.Sequential(*layers)
    return model, sf.SINGD(model, **{**BASE, **hp})


def _steps(model, opt, n, start=0):
    for t in range(start, start + n):
        torch.manual_seed(100 + t)
        x = torch.randn(8, model[0].in_features)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_a_state_dict_of_another_model_with_equal_counts_is_refused_and_nothing_changes():
    """Issue 12: equal parameter counts, other shapes: loaded silently, crashed in backward."""
    other, opt_other = _mlp([5, 6, 7, 3])
    _steps(other, opt_other, 2)
    sd = opt_other.state_dict()
    frozen = copy.deepcopy(sd)

    model, opt = _mlp([5, 7, 6, 3])
    _steps(model, opt, 2)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"parameter '0.weight' \(shape \(7, 5\)\).*another model"):
        opt.load_state_dict(sd)
    _assert_equal(opt.state_dict(), before)
    _assert_equal(sd, frozen)
    # still working, and on the same path as an optimizer that never saw the refused load
    ref, opt_ref = _mlp([5, 7, 6, 3])
    _steps(ref, opt_ref, 2)
    _steps(model, opt, 3, start=2)
    _steps(ref, opt_ref, 3, start=2)
    for (k, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), k


def test_a_refused_load_in_group_1_leaves_group_0_as_it_was():
    """Group 1's check used to run after group 0's record had taken the saved settings
    (here: no Riemannian momenta), which made every later step fail."""
    def make(alpha1_0, structures_1):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        groups = [{"params": list(model[0].parameters()), "alpha1": alpha1_0},
                  {"params": list(model[2].parameters()), "structures": structures_1}]
        return model, sf.SINGD(model, groups, **BASE)

    saved_model, saved_opt = make(0.0, ("dense", "dense"))
    _steps(saved_model, saved_opt, 1)
    sd = saved_opt.state_dict()
    sd["state"][2]["K"] = {"structure": "diagonal", "tensors": [torch.ones(6)]}
    model, opt = make(0.5, ("dense", "dense"))
    _steps(model, opt, 1)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="param group 1, layer '2': the state dict has no K"):
        opt.load_state_dict(sd)
    _assert_equal(opt.state_dict(), before)
    _steps(model, opt, 2, start=1)
    assert [g["step"] for g in opt.param_groups] == [3, 3]


@pytest.mark.parametrize("bad", ["not a dict", "unknown param", "no step", "bad lr"])
def test_malformed_state_dicts_are_refused_with_a_message(bad):
    model, opt = _mlp([3, 4, 2])
    _steps(model, opt, 1)
    sd = copy.deepcopy(opt.state_dict())
    before = copy.deepcopy(sd)
    if bad == "not a dict":
        sd, error, match = {"state": [], "param_groups": []}, TypeError, "expects the output"
    elif bad == "unknown param":
        sd["state"][99] = {}
        error, match = ValueError, "parameter 99, which none of its param groups lists"
    elif bad == "no step":
        del sd["param_groups"][0]["step"]
        error, match = ValueError, r"lacks \['step'\]"
    else:
        sd["param_groups"][0]["lr"] = float("nan")
        error, match = ValueError, "param group 0: lr .* must be finite"
    with pytest.raises(error, match=match):
        opt.load_state_dict(sd)
    _assert_equal(opt.state_dict(), before)

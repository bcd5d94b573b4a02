"""Param groups, add_param_group, params=None, unsupported parameters, LR schedulers, lr_cov."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import singd_functional as sf
from tests.models import make_batch, make_loss, make_model
from tests.oracle import DenseOracle
from tests.test_optim import BASE, assert_moved, assert_same, train


def _layer_params(model, *names):
    mods = dict(model.named_modules())
    return [p for n in names for p in mods[n].parameters()]


def test_param_groups_per_group_everything_matches_pure_core():
    """Per-group lr/momentum/damping/alpha1 AND structures/T/kfac_approx/kfac_like/dtype."""
    groups = {
        "embed": dict(lr=0.03, damping=1e-2, alpha1=0.3, structures=("diagonal", "triltoeplitz"),
                      T=2, kfac_approx="reduce"),
        "conv": dict(momentum=0.5, structures=("hierarchical3_2", "dense"), T=3, kfac_like=True,
                     weight_decay=1e-2),
        "head": dict(lr_cov=0.1, structures=("block2diagonal", "triutopleftdiag"), T=1,
                     preconditioner_dtype=(torch.float32, torch.float32)),
    }
    loss_fn = make_loss("batch")
    model = make_model("seq")
    opt = sf.SINGD(model, [{"params": _layer_params(model, n), **hp} for n, hp in groups.items()],
                   **{k: v for k, v in BASE.items() if k != "T"})
    train(model, opt, "seq", 8, loss_fn)

    # reference: one pure transform per group, fed by the torch.func capture
    ref_model = make_model("seq")
    layers = {l.name: l for l in sf.find_layers(ref_model)}
    params = {k: v.detach().clone() for k, v in ref_model.named_parameters()}
    capture = sf.make_capture(ref_model, loss_fn, tuple(layers.values()))
    runs = []
    for name, hp in groups.items():
        cfg = {**{k: v for k, v in BASE.items() if k != "T"}, **hp}
        T = cfg.pop("T")
        tx = sf.singd((layers[name],), **cfg)
        runs.append((name, T, tx, tx.init({k: params[k] for k in layers[name].params})))
    for t in range(8):
        x, y = make_batch("seq", t)
        _, grads, captures = capture(params, x, y)
        for i, (name, T, tx, state) in enumerate(runs):
            keys = layers[name].params
            updates, state = tx.update({k: grads[k] for k in keys}, state, {k: params[k] for k in keys},
                                       captures={name: captures[name]} if t % T == 0 else None)
            params = sf.apply_updates(params, updates)
            runs[i] = (name, T, tx, state)

    got = {k: v.detach() for k, v in model.named_parameters()}
    assert_same({k: v for k, v in got.items() if not k.startswith("head")},
                {k: v for k, v in params.items() if not k.startswith("head")})
    # the float32-preconditioned group agrees to float32 accuracy
    assert_same({k: v for k, v in got.items() if k.startswith("head")},
                {k: v for k, v in params.items() if k.startswith("head")}, tol=1e-5)
    assert_moved("seq", got)
    head = opt.state[model.head.weight]
    assert head["K"].dtype == torch.float32 and head["C"].dtype == torch.float32
    assert head["momentum_buffer"].dtype == torch.float64
    assert opt.state[model.embed.weight]["K"].name == "diagonal"
    assert "m_K" not in opt.state[model.conv.weight], "IKFAC keeps no Riemannian momenta"


def test_layer_split_across_groups_is_a_clear_error():
    model = make_model("mlp")
    mods = dict(model.named_modules())
    rest = [p for n in ("0", "4") for p in mods[n].parameters()]
    with pytest.raises(ValueError, match=r"layer '2' is split across param groups.*same param group"):
        sf.SINGD(model, [{"params": rest + [mods["2"].weight]}, {"params": [mods["2"].bias]}])
    opt = sf.SINGD(model, [{"params": rest + [mods["2"].weight]}])
    with pytest.raises(ValueError, match="split across param groups"):
        opt.add_param_group({"params": [mods["2"].bias]})
    assert len(opt.param_groups) == 1, "a rejected group must not stay in param_groups"


def test_add_param_group_equals_a_second_optimizer():
    """A group added at step 3 behaves like its own optimizer created at step 3."""
    loss_fn = make_loss("batch")
    late = dict(lr=0.02, structures=("triltoeplitz", "diagonal"), T=2)

    model = make_model("mlp")
    opt = sf.SINGD(model, _layer_params(model, "0", "2"), **BASE)
    train(model, opt, "mlp", 3, loss_fn)
    opt.add_param_group({"params": _layer_params(model, "4"), **late})
    train(model, opt, "mlp", 5, loss_fn, start=3)

    ref = make_model("mlp")
    first = sf.SINGD(ref, _layer_params(ref, "0", "2"), **BASE)
    train(ref, first, "mlp", 3, loss_fn)
    second = sf.SINGD(ref, _layer_params(ref, "4"), **{**BASE, **late})

    class Both:
        def zero_grad(self):
            first.zero_grad()
            second.zero_grad()

        def step(self):
            first.step()
            second.step()

    train(ref, Both(), "mlp", 5, loss_fn, start=3)
    assert_same(dict(model.named_parameters()), dict(ref.named_parameters()), tol=0)
    assert opt.state[model[4].weight]["C"].name == "diagonal"


class WithUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.fc(x)))) * self.temperature


def test_params_none_warns_once_naming_unsupported_and_leaves_them_alone():
    model = WithUnsupported().double()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = sf.SINGD(model, **BASE)
        train(model, opt, "mlp", 3, make_loss("batch"))
    ours = [w for w in caught if "SINGD" in str(w.message)]
    assert len(ours) == 1
    msg = str(ours[0].message)
    assert all(n in msg for n in ("norm.weight", "norm.bias", "temperature")), msg
    assert "fc.weight" not in msg and "head.bias" not in msg
    for k, p in model.named_parameters():
        changed = not torch.equal(p, before[k])
        assert changed == (k.startswith(("fc", "head"))), k

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sf.SINGD(WithUnsupported().double(), warn_unsupported=False)
    assert not [w for w in caught if "SINGD" in str(w.message)]


def test_explicit_unsupported_params_get_identity_heavy_ball():
    """Passed explicitly, LayerNorm and a bare parameter get SINGD's identity-preconditioned step."""
    loss_fn = make_loss("batch")
    model = WithUnsupported().double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = sf.SINGD(model, model.parameters(), **BASE)
    # one warning, naming exactly the parameters without preconditioner
    named = [sorted(str(w.message).split("momentum): ")[1].split(". ")[0].split(", "))
             for w in caught]
    assert named == [["norm.bias", "norm.weight", "temperature"]]
    train(model, opt, "mlp", 6, loss_fn)

    ref = WithUnsupported().double()
    oracle = DenseOracle(ref, **BASE)
    for t in range(6):
        x, y = make_batch("mlp", t)
        oracle.step(lambda x=x, y=y: loss_fn(ref(x), y))
    assert_same(dict(model.named_parameters()), dict(ref.named_parameters()))
    assert not torch.equal(model.norm.weight, WithUnsupported().double().norm.weight)


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [1, 4], gamma=0.3),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.8),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6),
    "CosineAnnealingWarmRestarts":
        lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1 / (1 + t)),
    "MultiplicativeLR": lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda t: 0.9),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.2, 1.0, total_iters=4),
    "ConstantLR": lambda o: torch.optim.lr_scheduler.ConstantLR(o, 0.5, total_iters=3),
    "PolynomialLR": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=6, power=2.0),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=8),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.01, 0.1, step_size_up=2),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.ConstantLR(o, 0.1, total_iters=2),
            torch.optim.lr_scheduler.ExponentialLR(o, 0.9)], milestones=[2]),
    "ChainedScheduler": lambda o: torch.optim.lr_scheduler.ChainedScheduler(
        [torch.optim.lr_scheduler.ConstantLR(o, 0.5, total_iters=3),
         torch.optim.lr_scheduler.ExponentialLR(o, 0.9)]),
    "ReduceLROnPlateau":
        lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_schedulers(name):
    """The optimizer reads lr (and momentum, for the cycling schedulers) at every step."""
    loss_fn = make_loss("batch")
    model = make_model("mlp")
    opt = sf.SINGD(model, **{**BASE, "T": 2})
    sched = SCHEDULERS[name](opt)
    used = []
    for t in range(8):
        x, y = make_batch("mlp", t)
        used.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        sched.step(float(t)) if name == "ReduceLROnPlateau" else sched.step()  # rising metric
    assert len({lr for lr, _ in used}) > 1, "the schedule did not change lr: the test is void"

    ref = make_model("mlp")
    oracle = DenseOracle(ref, **{**BASE, "T": 2})
    for t, (lr, momentum) in enumerate(used):
        oracle.lr, oracle.mom = lr, momentum
        x, y = make_batch("mlp", t)
        oracle.step(lambda x=x, y=y: loss_fn(ref(x), y))
    assert_same(dict(model.named_parameters()), dict(ref.named_parameters()))

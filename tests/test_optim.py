"""The stateful SINGD equals the pure core and the dense oracle (float64, 1e-10 relative).

Helpers here (run_optimizer, run_core, run_oracle, assert_same) are shared by the other
tests/test_optim_*.py files.
"""

from __future__ import annotations

import pytest
import torch

import singd_functional as sf
from tests.models import make_batch, make_loss, make_model, run_core
from tests.oracle import DenseOracle

FAMILIES = [
    "dense", "diagonal", "block3diagonal", "hierarchical3_2", "triltoeplitz", "triutoeplitz",
    "triltopleftdiag", "trilbottomrightdiag", "triutopleftdiag", "triubottomrightdiag",
]
BASE = dict(lr=0.05, momentum=0.9, damping=1e-3, alpha1=0.5, lr_cov=0.05, T=1)


def train(model, opt, kind, steps, loss_fn, batch_size=8, start=0):
    """The ordinary loop: zero_grad, forward, backward, step."""
    for t in range(start, start + steps):
        x, y = make_batch(kind, t, batch_size)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


def run_optimizer(kind, steps, loss_average="batch", **hp):
    model = make_model(kind)
    opt = sf.SINGD(model, loss_average=loss_average, **hp)
    train(model, opt, kind, steps, make_loss(loss_average))
    return {k: v.detach() for k, v in model.named_parameters()}, opt


def run_oracle(kind, steps, loss_average="batch", **hp):
    model = make_model(kind)
    oracle = DenseOracle(model, loss_average=loss_average, **hp)
    loss_fn = make_loss(loss_average)
    for t in range(steps):
        x, y = make_batch(kind, t)
        oracle.step(lambda x=x, y=y: loss_fn(model(x), y))
    return {k: v.detach() for k, v in model.named_parameters()}, oracle


def assert_same(params, ref, tol=1e-10):
    assert params.keys() == ref.keys()
    for k, p in params.items():
        r = ref[k].detach()
        err = ((p - r).norm() / r.norm().clamp(min=1e-300)).item()
        assert err <= tol, f"{k}: relative error {err:.3e}"


def assert_moved(kind, params):
    """Guard: a run that does not move the parameters could not catch anything."""
    start = make_model(kind).state_dict()
    assert all((p - start[k]).abs().max() > 1e-3 for k, p in params.items()), "a parameter did not move"


def check(kind, steps=10, **hp):
    cfg = {**BASE, **hp}
    params, opt = run_optimizer(kind, steps, **cfg)
    ref, oracle = run_oracle(kind, steps, **cfg)
    assert_same(params, ref)
    assert_moved(kind, params)
    return params, opt, oracle


@pytest.mark.parametrize("structure", FAMILIES)
@pytest.mark.parametrize("kfac_like", [False, True], ids=["singd", "ikfac"])
def test_every_structure_matches_oracle(structure, kfac_like):
    hp = dict(structures=(structure, structure), kfac_like=kfac_like,
              kfac_approx="reduce" if kfac_like else "expand")
    params, opt, oracle = check("mlp", steps=8, **hp)
    model_params = dict(opt.model.named_parameters())
    for name in oracle.layers:
        st = opt.state[model_params[f"{name}.weight"]]
        for key in ("K", "C"):
            ref = oracle.state[name][key]
            assert (st[key].to_dense() - ref).norm() <= 1e-10 * ref.norm(), (name, key)
    K = opt.state[model_params["2.weight"]]["K"].to_dense()
    if structure != "diagonal":
        assert (K - K.T).abs().max() > 1e-8, "K stayed symmetric: the test misses K^T bugs"


@pytest.mark.parametrize(
    "kind,hp",
    [
        ("mlp", dict(structures=("triltoeplitz", "block3diagonal"))),
        ("seq", dict(structures=("hierarchical3_2", "triubottomrightdiag"), kfac_like=True,
                     kfac_approx="reduce", T=2, loss_average="batch+sequence")),
        ("cnn", dict(structures=("triltopleftdiag", "diagonal"), T=3, weight_decay=1e-2,
                     normalize_lr_cov=True)),
    ],
)
def test_matches_pure_core(kind, hp):
    """The adapter's hooks + statistics + transform equal the torch.func capture path."""
    cfg = {**BASE, **hp}
    params, _ = run_optimizer(kind, 9, **cfg)
    core, _ = run_core(kind, 9, **cfg)
    assert_same(params, core)
    assert_moved(kind, params)


@pytest.mark.parametrize(
    "kind,kfac_approx,loss_average,T",
    [
        ("seq", "expand", None, 1),
        ("seq", "expand", "batch", 2),
        ("seq", "expand", "batch+sequence", 1),
        ("seq", "reduce", None, 3),
        ("seq", "reduce", "batch", 1),
        ("seq", "reduce", "batch+sequence", 2),
        ("cnn", "expand", "batch", 2),
        ("cnn", "reduce", "batch", 1),
        ("twice", "expand", "batch", 1),
        ("mlp", "reduce", 13, 2),
    ],
)
def test_models_approx_loss_average_and_T(kind, kfac_approx, loss_average, T):
    structures = {"mlp": ("block3diagonal", "hierarchical3_2"), "cnn": ("dense", "triltoeplitz"),
                  "seq": ("triutoeplitz", "dense"), "twice": ("dense", "diagonal")}[kind]
    check(kind, steps=9, kfac_approx=kfac_approx, loss_average=loss_average, T=T,
          structures=structures, lr=0.01 if loss_average is None else 0.05)


@pytest.mark.parametrize("kfac_like", [False, True], ids=["singd", "ikfac"])
def test_options_with_T_and_lr_cov_schedule(kfac_like):
    """normalize_lr_cov, a callable lr_cov, weight decay, momentum and T > 1 together."""
    seen = []

    def lr_cov(t):
        seen.append(t)
        return 0.2 / (1 + t)

    check("cnn", steps=10, structures=("hierarchical3_2", "dense"), kfac_like=kfac_like,
          normalize_lr_cov=True, weight_decay=1e-2, momentum=0.5, T=3, lr_cov=lr_cov)
    assert seen and all(type(t) is int for t in seen), "lr_cov must get the step as a Python int"
    assert sorted(set(seen)) == [0, 3, 6, 9]


def test_is_a_torch_optimizer():
    model = make_model("mlp")
    opt = sf.SINGD(model)
    assert isinstance(opt, torch.optim.Optimizer)
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 6
    assert opt.defaults["structures"] == ("dense", "dense") and opt.defaults["T"] == 10


def test_statistics_step_drops_old_products_before_the_update():
    """With T > 1 the drop-in caches K K^T and C C^T per layer; on a statistics step the
    updating layers' old products are let go before the core builds the new ones (they
    are not passed to it), and the new ones are kept for the plain steps after."""
    from singd_functional import _step

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    opt = sf.SINGD(model, T=2)
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    seen = []
    original = _step._cached_products

    def spy(active, factors, updating):
        out = original(active, factors, updating)
        seen.append((set(updating), set(out), [l.products for l in active]))
        return out

    _step._cached_products = spy
    try:
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    finally:
        _step._cached_products = original
    (due0, passed0, held0), (due1, passed1, _), (due2, passed2, held2) = seen
    assert due0 == due2 == {"0", "1"} and not passed0 and not passed2
    assert held0 == [None, None] and held2 == [None, None]
    assert not due1 and passed1 == {"0", "1"}
    assert all(layer.products is not None for grp in opt._groups for layer in grp.layers)

"""torch.compile of the whole training step (capture + update + apply), on CPU.

Default suite: the fx capture equals the hook capture; a compiled step with a dense and
a structured factor is one graph per step function (fullgraph), equals eager
(float32, 1e-5) and does not recompile when hyperparameter values change; the hook
capture is a graph break; every structure family and the vmapped sweep trace in one
graph (dynamo with the "eager" backend: no inductor). Slow: every structure family,
SINGD and IKFAC, and the sweep, compiled by inductor.
"""

from __future__ import annotations

import math

import optree
import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import singd_functional as sf
from tests.models import FAMILIES, fresh_dynamo, make_batch, make_loss, make_model

# (fresh_dynamo: an autouse fixture, imported to apply to this module)
_ = fresh_dynamo


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def hyperparams(t: int, kfac_like: bool) -> sf.HyperParams:
    """New values every step, as 0-d tensors (a float would be a constant to dynamo)."""
    hp = dict(lr=0.05 + 0.01 * t, damping=1e-3 * (1 + t), momentum=0.9 - 0.05 * t,
              lr_cov=0.05 + 0.01 * t, weight_decay=1e-3 * t)
    if not kfac_like:
        hp["alpha1"] = 0.5 - 0.05 * t
    return sf.HyperParams(**{k: torch.tensor(v) for k, v in hp.items()})


def compare_compiled(model, structures, steps=6, T=2, kfac_like=False, backend="inductor"):
    """Train eagerly and compiled side by side; returns the compile counter."""
    layers = sf.find_layers(model)
    capture = sf.make_capture(model, make_loss("batch"), layers)
    tx = sf.singd(layers, structures=structures, kfac_like=kfac_like)
    eager = sf.make_step(tx, capture)
    counter = CompileCounterWithBackend(backend)
    compiled = [torch.compile(f, fullgraph=True, backend=counter) for f in eager]
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    p_e, s_e, p_c, s_c = params, tx.init(params), params, tx.init(params)
    for t in range(steps):
        x, y = make_batch("mlp", t)
        x = x.float()
        hp = hyperparams(t, kfac_like)
        i = 0 if t % T == 0 else 1
        p_e, s_e, loss_e = eager[i](p_e, s_e, x, y, hyperparams=hp)
        p_c, s_c, loss_c = compiled[i](p_c, s_c, x, y, hyperparams=hp)
        assert torch.allclose(loss_c, loss_e, rtol=1e-5, atol=0), f"step {t}: losses differ"
    for k, p in p_e.items():
        err = ((p_c[k] - p).norm() / p.norm()).item()
        assert err <= 1e-5, f"{k}: compiled differs from eager by {err:.2e}"
    moved = max(((p_e[k] - params[k]).norm() / params[k].norm()).item() for k in params)
    assert moved > 1e-2, "the parameters barely moved: the comparison would catch nothing"
    for name, (K, C) in s_e.factors.items():
        K_c, C_c = s_c.factors[name]
        assert torch.allclose(K_c.to_dense(), K.to_dense(), rtol=1e-5, atol=1e-6), name
        assert torch.allclose(C_c.to_dense(), C.to_dense(), rtol=1e-5, atol=1e-6), name
    return counter


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq", "twice"])
def test_fx_capture_equals_hook_capture(kind):
    """Same loss, gradients, layer inputs and output gradients, bit for bit (and the
    same loss and gradients without recording layers)."""
    model = make_model(kind)
    layers = sf.find_layers(model)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = make_batch(kind, 0)
    loss_fn = make_loss("batch")
    a = sf.make_capture(model, loss_fn, layers, method="hooks")(params, x, y)
    b = sf.make_capture(model, loss_fn, layers, method="fx")(params, x, y)
    c = sf.make_capture(model, loss_fn, layers)(params, x, y, record_layers=False)
    for other in (b, c):
        assert torch.equal(a[0], other[0])
        assert a[1].keys() == other[1].keys()
        assert all(torch.equal(a[1][k], other[1][k]) for k in a[1])
    assert c[2] == {} and a[2].keys() == b[2].keys() == {i.name for i in layers}
    for name, cap in a[2].items():
        assert len(cap.inputs) == len(b[2][name].inputs) >= 1
        assert all(torch.equal(u, v) for u, v in zip(cap.inputs, b[2][name].inputs))
        assert all(torch.equal(u, v) for u, v in zip(cap.output_grads, b[2][name].output_grads))


def test_fx_capture_edge_cases():
    """Uncovered layers and untraceable models: a clear error with fx, a warning and
    hooks with auto; parameters the traced forward never reads get zero gradients."""

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.spare = nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x) / len(x)  # fx cannot trace len() of a proxy

    loss_fn = make_loss("batch")
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    model = Unused()
    layers = sf.find_layers(model)
    params = dict(model.named_parameters())
    a = sf.make_capture(model, loss_fn, layers, method="hooks")(params, x, y)
    assert a[2].keys() == {"used"}
    # fx: the traced calls must cover every requested layer, and `spare` is never called
    with pytest.raises(ValueError, match=r"never calls the modules of layers \['spare'\]"):
        sf.make_capture(model, loss_fn, layers, method="fx")
    with pytest.warns(UserWarning, match=r"method='auto'.*\['spare'\].*using forward hooks"):
        assert sf.make_capture(model, loss_fn, layers).method == "hooks"
    used = [info for info in layers if info.name == "used"]
    fx = sf.make_capture(model, loss_fn, used, method="fx")
    assert fx.method == "fx"
    b = fx(params, x, y)
    assert b[2].keys() == {"used"}
    for k in params:
        assert torch.equal(a[1][k], b[1][k])
    assert not b[1]["spare.weight"].any()

    model = Untraceable()
    with pytest.raises(ValueError, match="could not trace"):
        sf.make_capture(model, loss_fn, sf.find_layers(model), method="fx")
    with pytest.warns(UserWarning, match="could not trace"):
        capture = sf.make_capture(model, loss_fn, sf.find_layers(model))  # auto: hooks
    assert capture.method == "hooks"
    assert capture(dict(model.named_parameters()), x, y)[2]["lin"].inputs[0] is x
    with pytest.raises(ValueError, match="method must be one of"):
        sf.make_capture(model, loss_fn, sf.find_layers(model), method="jit")


def test_compiled_step_fullgraph_same_numbers_no_recompile():
    """K hierarchical, C dense; T = 2; new hyperparameter values every step.

    One layer keeps the compile time (mostly C++ builds of the kernels) near 45 CPU
    seconds; the two-layer model and every structure run in the slow tests.
    """
    torch.manual_seed(0)
    counter = compare_compiled(nn.Sequential(nn.Linear(5, 3)), ("hierarchical3_2", "dense"))
    # one graph for the step with statistics, one for the plain step, nothing more
    assert counter.frame_count == 2


def test_every_step_function_has_its_own_code():
    """Dynamo caches per code object (8 graphs each): steps from different make_step /
    make_sweep calls, and a step and its plain step, must not share one."""
    model = small_model()
    layers = sf.find_layers(model)
    capture = sf.make_capture(model, make_loss("batch"), layers)
    tx = sf.singd(layers)
    a, b = sf.make_step(tx, capture), sf.make_step(tx, capture)
    s = sf.make_sweep(tx, capture, sf.grid(lr=[0.1, 0.2]))
    codes = [f.__code__ for f in (a.step, a.plain_step, b.step, b.plain_step, s.step, s.plain_step)]
    assert len({id(c) for c in codes}) == len(codes)
    assert a.step.__name__ == "step" and a.plain_step.__name__ == "plain_step"


def test_hook_capture_is_a_graph_break():
    """What the fx capture avoids: dynamo cannot trace hook registration."""
    model = small_model()
    layers = sf.find_layers(model)
    capture = sf.make_capture(model, make_loss("batch"), layers, method="hooks")
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = make_batch("mlp", 0)
    f = torch.compile(lambda p: capture(p, x.float(), y)[0], fullgraph=True, backend="eager")
    with pytest.raises(torch._dynamo.exc.Unsupported):
        f(params)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_structure_traces_in_one_graph(family):
    """Default suite: dynamo traces every family's whole step with fullgraph=True and no
    recompile (backend "eager": the traced graph runs as is, no inductor C++ builds)."""
    counter = compare_compiled(small_model(), (family, family), steps=4, backend="eager")
    assert counter.frame_count == 2


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kfac_like", [False, True], ids=["singd", "ikfac"])
def test_every_structure_compiles(family, kfac_like):
    counter = compare_compiled(small_model(), (family, family), kfac_like=kfac_like)
    assert counter.frame_count == 2


@pytest.mark.slow
def test_hook_capture_compiles_with_breaks_same_numbers():
    """Without fullgraph, the hook capture compiles in pieces and still agrees."""
    model = small_model()
    layers = sf.find_layers(model)
    capture = sf.make_capture(model, make_loss("batch"), layers, method="hooks")
    tx = sf.singd(layers, structures=("dense", "diagonal"))
    step = sf.make_step(tx, capture).step
    compiled = torch.compile(step)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    p_e, s_e, p_c, s_c = params, tx.init(params), params, tx.init(params)
    for t in range(3):
        x, y = make_batch("mlp", t)
        p_e, s_e, _ = step(p_e, s_e, x.float(), y, hyperparams=hyperparams(t, False))
        p_c, s_c, _ = compiled(p_c, s_c, x.float(), y, hyperparams=hyperparams(t, False))
    for k, p in p_e.items():
        assert ((p_c[k] - p).norm() / p.norm()).item() <= 1e-5


def test_compiled_sweep_traces_in_one_graph():
    """Default suite: the compiled sweep (mask inside vmap) traced by dynamo, backend "eager"."""
    check_compiled_sweep("eager")


@pytest.mark.slow
def test_compiled_sweep_same_numbers_no_recompile():
    """The vmapped sweep step compiles to one graph per step function (inductor)."""
    check_compiled_sweep("inductor")


def check_compiled_sweep(backend):
    models = [small_model() for _ in range(3)]
    for s, m in enumerate(models):
        torch.manual_seed(s)
        for p in m.parameters():
            p.data.normal_(0, 0.5)
    layers = sf.find_layers(models[0])
    capture = sf.make_capture(models[0], make_loss("batch"), layers)
    tx = sf.singd(layers, structures={"0": ("dense", "dense"), "2": ("block3diagonal", "diagonal")})
    # member 1 diverges at once (lr = inf: its update is +-inf or nan): the compiled
    # mask (inside vmap) must stop it as the eager one (after vmap) does
    hp = sf.HyperParams(lr=torch.tensor([0.05, math.inf, 0.08]),
                        damping=torch.tensor([1e-3, 1e-2, 3e-3]))
    sweep = sf.make_sweep(tx, capture, hp)
    counter = CompileCounterWithBackend(backend)
    compiled = sweep.compile(fullgraph=True, backend=counter)
    stacked, _ = torch.func.stack_module_state(models)
    batches = [(x.float(), y) for x, y in (make_batch("mlp", t) for t in range(6))]
    s_e, losses_e = sweep.run(sweep.init(stacked, stacked=True), batches[:3], T=2)
    s_c, losses_c = compiled.run(compiled.init(stacked, stacked=True), batches[:3], T=2)
    # new hyperparameter values: same graphs
    new_hp = {"lr": torch.tensor([0.01, math.inf, 0.04]), "damping": torch.tensor([1e-2, 1e-3, 1e-3])}
    s_e, more_e = sweep.run(s_e._replace(hyperparams=new_hp), batches[3:], T=2, start=3)
    s_c, more_c = compiled.run(s_c._replace(hyperparams=new_hp), batches[3:], T=2, start=3)
    assert counter.frame_count == 2
    assert s_e.diverged.tolist() == s_c.diverged.tolist() == [False, True, False]
    assert torch.allclose(torch.cat([losses_c, more_c]), torch.cat([losses_e, more_e]), rtol=1e-5,
                          equal_nan=True)
    assert torch.isnan(more_c[:, 1]).all() and torch.isfinite(more_c[:, [0, 2]]).all()
    for k, p in s_e.params.items():
        assert torch.equal(s_c.params[k][1], stacked[k][1]), "the diverged member moved"
        assert ((s_c.params[k] - p).norm() / p.norm()).item() <= 1e-5
    # the diverged member's optimizer state (factors, momenta, velocity, count) is kept
    # as it was before its first step, in the compiled sweep as in the eager one
    start = optree.tree_leaves(sweep.init(stacked, stacked=True).opt_state,
                               namespace=sf.PYTREE_NAMESPACE)
    for side in (s_c, s_e):
        leaves = optree.tree_leaves(side.opt_state, namespace=sf.PYTREE_NAMESPACE)
        assert len(leaves) == len(start)
        for leaf, first in zip(leaves, start):
            assert torch.equal(leaf[1], first[1]), "the diverged member's state changed"

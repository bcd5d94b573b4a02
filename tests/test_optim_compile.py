"""``sf.SINGD(..., compile=True)``: the optimizer's per-layer functions compiled.

Default suite: with inductor, a tiny float32 MLP (two layers of one shape: two graphs)
gives eager's numbers to 1e-6 over a few steps with changing hyperparameters and no
recompile; with dynamo's "eager" backend (tracing only, no C++ builds) four structure
families and the conv kind (IKFAC) trace in one graph per kernel and match eager; a
failing compile falls back to eager with one warning; the option is validated. Slow:
the other families and static options traced, and five families compiled by inductor
on an MLP of three shapes, SINGD and IKFAC.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
import torch._dynamo.utils
from torch import nn

import singd_functional as sf
from singd_functional import _compile
from tests.models import FAMILIES, fresh_dynamo, make_batch, make_loss, make_model

# (fresh_dynamo: an autouse fixture, imported to apply to this module)
_ = fresh_dynamo


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def schedule(opt, t: int) -> None:
    """New Python-float hyperparameters every step (each would be a recompile if it
    reached a compiled function as a constant); lr_cov is a schedule of the step."""
    for group in opt.param_groups:
        group.update(lr=0.05 + 0.01 * t, damping=1e-3 * (1 + t), momentum=0.9 - 0.02 * t,
                     weight_decay=1e-3 * t)
        if not group["kfac_like"] and group["alpha1"] != 0:  # (0: kept at 0)
            group["alpha1"] = 0.5 - 0.02 * t


def side_by_side(make, kind, steps, backend, **hp):
    """Train eager and compiled copies on the same batches; returns (eager, compiled)
    parameters and the compiled optimizer."""
    models = [make(), make()]
    hp = dict(dict(T=2, lr_cov=lambda t: 0.05 / (1 + t)), **hp)
    opts = [sf.SINGD(models[0], **hp), sf.SINGD(models[1], compile=True, **hp)]
    opts[1]._kernels.backend = backend  # read when a kernel is first made (first step)
    loss_fn = make_loss("batch")
    dtype = next(models[0].parameters()).dtype
    for t in range(steps):
        x, y = make_batch(kind, t)
        for model, opt in zip(models, opts):
            schedule(opt, t)
            opt.zero_grad()
            loss_fn(model(x.to(dtype)), y).backward()
            opt.step()
    eager, compiled = ({k: p.detach().clone() for k, p in m.named_parameters()} for m in models)
    return eager, compiled, opts[1]


def max_rel_diff(a, b) -> float:
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)


def assert_moved(params, make) -> None:
    start = dict(make().named_parameters())
    assert all((p - start[k]).abs().max() > 1e-3 for k, p in params.items())


def twin_mlp():
    """Two layers of one shape and kind: one signature, so two graphs in all."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5)).float()


@pytest.mark.parametrize("structures", [("dense", "diagonal")], ids=["dense-diagonal"])
def test_inductor_same_numbers_as_eager_no_recompile(structures):
    """K dense, C diagonal; T = 2 over 5 steps (3 factor updates), hyperparameters new
    at every step: the two kernels compile once each and match eager (float32)."""
    before = graphs()
    eager, compiled, opt = side_by_side(twin_mlp, "mlp", 5, "inductor", structures=structures)
    assert opt._kernels.failure is None
    assert len(opt._kernels) == 2  # factor update and direction, shared by both layers
    assert graphs() - before == 2  # no recompile for the new hyperparameter values
    assert max_rel_diff(compiled, eager) < 1e-6
    assert_moved(eager, twin_mlp)


# dynamo traces for seconds per graph: four families by default, the rest slow
DEFAULT_FAMILIES = ("dense", "block3diagonal", "hierarchical3_2", "triltoeplitz")


@pytest.mark.parametrize("family", [f if f in DEFAULT_FAMILIES else
                                    pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_every_structure_traces_in_one_graph_per_kernel(family):
    """Dynamo ("eager" backend: the traced graphs run as they are, no inductor) traces
    each kernel of every family in one graph, once, and gives eager's numbers (float64;
    two layers of one shape: two kernels)."""
    make = lambda: twin_mlp().double()  # noqa: E731
    before = graphs()
    eager, compiled, opt = side_by_side(make, "mlp", 5, "eager", structures=family)
    assert opt._kernels.failure is None
    assert len(opt._kernels) == 2
    assert graphs() - before == 2
    assert max_rel_diff(compiled, eager) < 1e-12
    assert_moved(eager, make)


@pytest.mark.parametrize("options", [
    dict(kfac_like=True),
    pytest.param(dict(normalize_lr_cov=True), marks=pytest.mark.slow),
    pytest.param(dict(T=1), marks=pytest.mark.slow),
    pytest.param(dict(alpha1=0.0), marks=pytest.mark.slow),
], ids=["ikfac", "normalize", "T1", "alpha1_0"])
def test_conv_and_options_trace_and_match(options):
    """The conv kind and the static options (IKFAC, normalize_lr_cov, no cached
    products, no momenta) trace in one graph per kernel and match eager."""
    make = lambda: make_model("cnn")  # noqa: E731
    before = graphs()
    eager, compiled, opt = side_by_side(make, "cnn", 3, "eager",
                                        structures=("hierarchical3_2", "block3diagonal"),
                                        **options)
    assert opt._kernels.failure is None
    assert graphs() - before == len(opt._kernels)
    assert max_rel_diff(compiled, eager) < 1e-12


def test_failing_compile_falls_back_to_eager_with_one_warning():
    """A backend that raises (as a missing C++ compiler would): one warning naming the
    reason, then eager, with eager's numbers bit for bit."""

    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler found (test)")

    make = lambda: make_model("mlp")  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eager, compiled, opt = side_by_side(make, "mlp", 4, broken, structures="dense")
    mine = [w for w in caught if "compile=True" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    assert "no C++ compiler found (test)" in str(mine[0].message)
    assert "runs eager" in str(mine[0].message)
    assert opt._kernels.failure is not None
    assert max_rel_diff(compiled, eager) == 0.0


def test_torch_compile_refused_falls_back(monkeypatch):
    """torch.compile itself raising (an unsupported Python, say) is a failure too."""

    def refuse(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python (test)")

    monkeypatch.setattr(_compile.torch, "compile", refuse)
    make = lambda: make_model("mlp")  # noqa: E731
    with pytest.warns(UserWarning, match=r"not supported on this Python \(test\)"):
        eager, compiled, _ = side_by_side(make, "mlp", 3, "inductor", structures="diagonal")
    assert max_rel_diff(compiled, eager) == 0.0


def test_kernels_shared_across_active_layer_sets():
    """A transform rebuilt for another set of active layers (a layer without gradient
    in a step) finds the kernels made before: no new graphs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5)).double()
    opt = sf.SINGD(model, T=1, compile=True)
    opt._kernels.backend = "eager"
    x = torch.randn(8, 5, dtype=torch.float64)
    model(x).square().sum().backward()
    opt.step()
    made, compiled = len(opt._kernels), graphs()
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    opt.zero_grad()
    model(x).square().sum().backward()
    opt.step()
    assert len(opt._kernels) == made == 2
    assert graphs() == compiled


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_compile_option_must_be_a_bool(value):
    with pytest.raises(TypeError, match="compile must be True"):
        sf.SINGD(make_model("mlp"), compile=value)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dense", "diagonal", "block3diagonal", "hierarchical3_2",
                                    "triltoeplitz"])
@pytest.mark.parametrize("kfac_like", [False, True], ids=["singd", "ikfac"])
def test_inductor_every_structure_same_numbers(family, kfac_like):
    """Inductor, MLP 5-7-6-3 in float32 (three shapes: six graphs), no recompile."""
    make = lambda: make_model("mlp").float()  # noqa: E731
    before = graphs()
    eager, compiled, opt = side_by_side(make, "mlp", 5, "inductor", structures=family,
                                        kfac_like=kfac_like)
    assert opt._kernels.failure is None
    assert graphs() - before == len(opt._kernels) == 6
    assert max_rel_diff(compiled, eager) < 1e-6

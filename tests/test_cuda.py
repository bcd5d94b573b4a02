"""The same numbers on a CUDA device as on the CPU (skipped without CUDA).

The CPU runs are the ones checked against the dense oracle (tests/test_core.py); here
every structure family, the drop-in optimizer and the vmapped sweep run on the GPU in
float64 and must match them to 1e-10 relative, and the compiled step must match eager
at float32 tolerance.
"""

from __future__ import annotations

import pytest
import torch

import singd_functional as sf
from tests.models import make_batch, make_loss, make_model, run_core
from tests.test_core import STRUCTURES, assert_same
from tests.test_sweep import assert_member_equals, member, sequential

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

HP = dict(lr=0.05, momentum=0.9, damping=1e-3, alpha1=0.5, lr_cov=0.05, weight_decay=1e-3)


def assert_close(got: dict, ref: dict, tol: float = 1e-10):
    """``got`` equals ``ref`` to ``tol`` relative, compared on the CPU (either may be on CUDA)."""
    cpu = lambda d: {k: v.detach().cpu() for k, v in d.items()}  # noqa: E731
    assert_same(cpu(got), cpu(ref), tol)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("kfac_like", [False, True], ids=["singd", "ikfac"])
def test_core_on_cuda_equals_cpu(structure, kfac_like):
    kw = dict(structures=(structure, structure), kfac_like=kfac_like)
    got, state = run_core("mlp", 12, device="cuda", **HP, **kw)
    ref, ref_state = run_core("mlp", 12, **HP, **kw)
    assert_close(got, ref)
    for name, (K, C) in state.factors.items():
        K_ref, C_ref = ref_state.factors[name]
        assert K.to_dense().device.type == "cuda"
        assert_close({"K": K.to_dense(), "C": C.to_dense()}, {"K": K_ref.to_dense(), "C": C_ref.to_dense()})


@pytest.mark.parametrize("kind", ["cnn", "seq", "twice"])
def test_other_layers_on_cuda_equal_cpu(kind):
    got, _ = run_core(kind, 8, T=3, device="cuda", cache_preconditioner=True, **HP)
    ref, _ = run_core(kind, 8, T=3, cache_preconditioner=True, **HP)
    assert_close(got, ref)


def run_adapter_on(device: str, steps: int = 10):
    model = make_model("cnn").to(device)
    opt = sf.SINGD(model, lr=0.05, damping=1e-3, alpha1=0.5, lr_cov=0.05, T=2, structures=("dense", "diagonal"))
    loss_fn = make_loss("batch")
    sched = torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)
    for t in range(steps):
        x, y = (v.to(device) for v in make_batch("cnn", t))
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        sched.step()
    return dict(model.named_parameters()), opt


def test_adapter_on_cuda_equals_cpu_and_checkpoints():
    got, opt = run_adapter_on("cuda")
    ref, _ = run_adapter_on("cpu")
    assert_close(got, ref)
    sd = opt.state_dict()
    tensors = [v for s in sd["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.device.type == "cuda" for t in tensors)


def test_sweep_on_cuda_equals_sequential_runs():
    model = make_model("mlp").cuda()
    layers = sf.find_layers(model)
    capture = sf.make_capture(model, make_loss("batch"), layers)
    tx = sf.singd(layers, structures=("dense", "hierarchical3_2"), **HP)
    hp = sf.grid(lr=[0.01, 0.05], damping=[1e-3, 1e-2])
    sweep = sf.make_sweep(tx, capture, hp)
    params0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = sweep.init(params0)
    batches = [tuple(v.cuda() for v in make_batch("mlp", t)) for t in range(20)]
    state, losses = sweep.run(state, batches, T=3)
    assert losses.shape == (20, 4) and losses.device.type == "cuda"
    assert not state.diverged.any()
    for i in range(4):
        ref = sequential(tx, capture, params0, member(hp, i), batches, T=3)
        assert_member_equals(state, losses, i, *ref, tol=1e-10)


def test_sweep_on_cuda_masks_a_diverging_member():
    model = make_model("mlp").cuda()
    layers = sf.find_layers(model)
    capture = sf.make_capture(model, make_loss("batch"), layers)
    tx = sf.singd(layers, **HP)
    sweep = sf.make_sweep(tx, capture, sf.HyperParams(lr=torch.tensor([0.01, float("inf")])))
    state = sweep.init({k: v.detach() for k, v in model.named_parameters()})
    batches = [tuple(v.cuda() for v in make_batch("mlp", t)) for t in range(4)]
    state, losses = sweep.run(state, batches)
    assert state.diverged.tolist() == [False, True]
    assert torch.isfinite(losses[:, 0]).all() and torch.isnan(losses[1:, 1]).all()
    assert all(torch.isfinite(v[0]).all() for v in state.params.values())


def test_compiled_step_on_cuda_equals_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    ).cuda()
    layers = sf.find_layers(model)
    capture = sf.make_capture(model, torch.nn.functional.cross_entropy, layers)
    tx = sf.singd(layers, lr=0.01, damping=1e-3, alpha1=0.5, lr_cov=0.05)
    eager = sf.make_step(tx, capture)
    compiled = [torch.compile(f, fullgraph=True) for f in eager]
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    runs = {"eager": [dict(params), tx.init(params)], "compiled": [dict(params), tx.init(params)]}
    g = torch.Generator().manual_seed(0)
    for t in range(6):
        x, y = torch.randn(32, 16, generator=g).cuda(), torch.randint(0, 4, (32,), generator=g).cuda()
        hp = sf.HyperParams(lr=torch.tensor(0.01 / (1 + t), device="cuda"))
        for name, fns in (("eager", eager), ("compiled", compiled)):
            p, s = runs[name]
            fn = fns[0] if t % 2 == 0 else fns[1]
            runs[name][0], runs[name][1], _ = fn(p, s, x, y, hyperparams=hp)
    assert_close(runs["compiled"][0], runs["eager"][0], tol=1e-5)


@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "grad_scaler"])
def test_drop_in_step_never_synchronises_with_the_host(scaler):
    """No host synchronisation in backward's recording hooks or in ``step()`` (statistics
    and plain steps, with and without a GradScaler): CUDA's sync debug mode raises on one.
    The first iteration runs outside it (lazy initialisation may synchronise once)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)
    ).cuda()
    opt = sf.SINGD(model, lr=1e-2, T=2, structures=("dense", "diagonal"))
    grad_scaler = torch.amp.GradScaler("cuda") if scaler else None
    x = torch.randn(64, 20, device="cuda")
    y = torch.randint(0, 5, (64,), device="cuda")

    def iteration():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if grad_scaler is None:
            loss.backward()
            opt.step()
        else:
            grad_scaler.scale(loss).backward()
            grad_scaler.step(opt)
            grad_scaler.update()

    iteration()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):  # two statistics steps (T=2) and two plain ones
            iteration()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())

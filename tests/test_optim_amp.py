"""Mixed precision: torch.amp.GradScaler (on CPU), autocast(bfloat16), bfloat16 parameters."""

from __future__ import annotations

import copy

import pytest
import torch

import singd_functional as sf
from tests.models import make_batch, make_loss, make_model
from tests.oracle import DenseOracle
from tests.test_optim import BASE, assert_moved, assert_same
from tests.test_optim_checkpoint import _assert_equal


def _scaled_run(kind, batches, clip=None, init_grad_scale=1.0, **hp):
    """Train with a GradScaler whose scale changes during the run (growth every 2 steps)."""
    model = make_model(kind)
    opt = sf.SINGD(model, **{**BASE, **hp}, init_grad_scale=init_grad_scale)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    loss_fn = make_loss("batch")
    norms, scales = [], []
    for t in batches:
        x, y = make_batch(kind, t)
        opt.zero_grad()
        scaler.scale(loss_fn(model(x), y)).backward()
        if clip is not None:
            scaler.unscale_(opt)
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
            opt.set_current_grad_scale(scaler.get_scale())
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return model, opt, norms, scales


def _plain_run(kind, batches, clip=None, **hp):
    model = make_model(kind)
    opt = sf.SINGD(model, **{**BASE, **hp})
    loss_fn = make_loss("batch")
    for t in batches:
        x, y = make_batch(kind, t)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model, opt


@pytest.mark.parametrize("clip", [None, 0.5], ids=["scaler.step", "unscale_-clip-step"])
@pytest.mark.parametrize("kfac_like", [False, True], ids=["singd", "ikfac"])
def test_grad_scaler_removes_the_scale(clip, kfac_like):
    """Scaled training equals unscaled training: G / s and H_C / s^2, also after unscale_."""
    hp = dict(T=2, kfac_like=kfac_like, structures=("dense", "triltoeplitz"))
    model, _, norms, scales = _scaled_run("cnn", range(8), clip=clip, **hp)
    ref, _ = _plain_run("cnn", range(8), clip=clip, **hp)
    assert len(set(scales)) > 2, "the scale did not change: the test misses stale scales"
    if clip is not None:
        assert max(norms) > clip, "nothing was clipped: the test is void"
    assert_same(dict(model.named_parameters()), dict(ref.named_parameters()))
    assert_moved("cnn", dict(model.named_parameters()))


def test_init_grad_scale_only_changes_rounding():
    model, opt, _, _ = _scaled_run("mlp", range(6), init_grad_scale=2.0**10)
    ref, _ = _plain_run("mlp", range(6))
    assert_same(dict(model.named_parameters()), dict(ref.named_parameters()))


@pytest.mark.parametrize("T", [1, 2])
def test_nonfinite_step_is_skipped_with_state_untouched(T):
    """A NaN batch: params and state untouched, its statistics dropped, the run goes on."""
    model = make_model("mlp")
    opt = sf.SINGD(model, **{**BASE, "T": T})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    loss_fn = make_loss("batch")
    for t in range(6):
        x, y = make_batch("mlp", t)
        if t == 2:
            x[0, 0] = float("nan")
            before_params = copy.deepcopy(model.state_dict())
            before_state = copy.deepcopy(opt.state_dict())
        model.zero_grad()  # not opt.zero_grad(): the skipped step itself must drop statistics
        scaler.scale(loss_fn(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        if t == 2:
            assert scaler.get_scale() == 2.0**9, "GradScaler did not see the non-finite step"
            _assert_equal(model.state_dict(), before_params)
            after = opt.state_dict()
            # the step counter counts the call (it schedules T on the host); nothing else moves
            assert after["param_groups"][0]["step"] == before_state["param_groups"][0]["step"] + 1
            after["param_groups"][0]["step"] -= 1
            _assert_equal(after, before_state)
    assert int(opt.skipped_steps) == 1
    # the reference: batch 2 never seen, its step call counted
    ref = make_model("mlp")
    ref_opt = sf.SINGD(ref, **{**BASE, "T": T})
    for t in range(6):
        if t == 2:
            ref_opt.param_groups[0]["step"] += 1
            continue
        x, y = make_batch("mlp", t)
        ref_opt.zero_grad()
        loss_fn(ref(x), y).backward()
        ref_opt.step()
    assert_same(dict(model.named_parameters()), dict(ref.named_parameters()))


def test_set_current_grad_scale_for_a_hand_scaled_loss():
    model = make_model("mlp")
    opt = sf.SINGD(model, **BASE)
    loss_fn = make_loss("batch")
    for t in range(5):
        x, y = make_batch("mlp", t)
        opt.zero_grad()
        (loss_fn(model(x), y) * 64.0).backward()
        opt.set_current_grad_scale(64.0)
        opt.step()
    ref, _ = _plain_run("mlp", range(5))
    assert_same(dict(model.named_parameters()), dict(ref.named_parameters()))


def _fixed_batch_losses(model, opt, kind, dtype, steps=15, autocast=False):
    x, y = make_batch(kind, 0, 16)
    x = x.to(dtype)
    loss_fn = make_loss("batch")
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        loss = loss_fn(out.float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _float64_oracle(kind, hp, steps=15):
    """The same training in float64 by the dense oracle of tests/oracle.py."""
    model = make_model(kind)
    hp = dict(hp)
    oracle = DenseOracle(model, T=hp.pop("T"), **hp)
    x, y = make_batch(kind, 0, 16)
    loss_fn = make_loss("batch")
    for _ in range(steps):
        oracle.step(lambda: loss_fn(model(x), y))
    return model


def _assert_near_oracle(model, ref, kind, tol):
    """Each parameter's displacement from the start is within ``tol`` (relative) of the
    float64 oracle's: bfloat16 rounding stays under it (measured at most 0.056 here),
    while a wrong formula does not (damping's sign flipped: 1.4 and more)."""
    for (k, p), q, q0 in zip(model.named_parameters(), ref.parameters(), make_model(kind).parameters()):
        err = ((p.detach().double() - q.detach()).norm() / (q - q0).detach().norm()).item()
        assert err <= tol, f"{k}: displacement {err:.3f} off the float64 oracle's"


# damping 0.1: large enough that the damping term shapes the 15 steps
AMP_HP = {**BASE, "lr": 0.1, "damping": 0.1}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_autocast_bfloat16_trains(kind):
    hp = {**AMP_HP, "structures": ("triltoeplitz", "dense")}
    model = make_model(kind).float()
    opt = sf.SINGD(model, **hp)
    losses = _fixed_batch_losses(model, opt, kind, torch.float32, autocast=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.8 * losses[0], losses
    assert opt.state[next(model.parameters())]["K"].dtype == torch.float32
    _assert_near_oracle(model, _float64_oracle(kind, hp), kind, tol=0.15)


def test_bfloat16_params_with_float32_preconditioners_train():
    model = make_model("mlp").to(torch.bfloat16)
    opt = sf.SINGD(model, **AMP_HP, preconditioner_dtype=(torch.float32, torch.float32))
    losses = _fixed_batch_losses(model, opt, "mlp", torch.bfloat16)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.8 * losses[0], losses
    _assert_near_oracle(model, _float64_oracle("mlp", AMP_HP), "mlp", tol=0.15)
    st = opt.state[model[0].weight]
    assert st["K"].dtype == st["C"].dtype == st["m_K"].dtype == torch.float32
    assert st["momentum_buffer"].dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_moved_after_construction_with_grad_scaler():
    """Moved to CUDA after construction; GradScaler("cuda") with unscale_ + clipping."""
    def run(device, scaled):
        model = make_model("cnn").float()
        opt = sf.SINGD(model, **BASE)
        model.to(device)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, enabled=scaled)
        for t in range(6):
            x, y = make_batch("cnn", t)
            opt.zero_grad()
            loss = make_loss("batch")(model(x.float().to(device)), y.to(device))
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.set_current_grad_scale(scaler.get_scale())
            scaler.step(opt)
            scaler.update()
        return {k: v.detach().cpu().double() for k, v in model.named_parameters()}, opt

    got, opt = run("cuda", scaled=True)
    ref, _ = run("cpu", scaled=False)
    assert_same(got, ref, tol=1e-4)
    assert opt.state[next(iter(opt.model.parameters()))]["K"].device.type == "cuda"


def test_unscale_without_the_scale_raises_naming_the_line_and_changes_nothing():
    """After scaler.unscale_(opt) the scale of dL/dz is unknown: a clear error, nothing moved."""
    model = make_model("mlp")
    opt = sf.SINGD(model, **BASE)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = make_batch("mlp", 0)
    opt.zero_grad()
    scaler.scale(make_loss("batch")(model(x), y)).backward()
    scaler.unscale_(opt)
    before_params = copy.deepcopy(model.state_dict())
    before_state = copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match=r"opt\.set_current_grad_scale\(scaler\.get_scale\(\)\)"):
        scaler.step(opt)
    _assert_equal(model.state_dict(), before_params)
    _assert_equal(opt.state_dict(), before_state)
    scaler.update()
    # the optimizer still works: the next iteration with the line goes through
    opt.zero_grad()
    scaler.scale(make_loss("batch")(model(x), y)).backward()
    scaler.unscale_(opt)
    opt.set_current_grad_scale(scaler.get_scale())
    scaler.step(opt)
    assert opt.param_groups[0]["step"] == 1
    assert_moved("mlp", dict(model.named_parameters()))


@pytest.mark.parametrize("structures", [("dense", "dense"), ("diagonal", "diagonal")])
def test_step_inside_autocast_is_as_outside(structures):
    """A step called inside an autocast region leaves it (no_autocast): it computes in
    the factors' dtypes, so the parameters are those of steps outside it, bit for bit."""
    trained = []
    for inside in (False, True):
        model = make_model("mlp").float()  # (autocast leaves float64 alone)
        opt = sf.SINGD(model, **{**BASE, "T": 2, "structures": structures})
        loss_fn = make_loss("batch")
        for t in range(4):
            x, y = make_batch("mlp", t, 16)
            opt.zero_grad()
            loss_fn(model(x.float()), y).backward()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
                opt.step()
        trained.append(dict(model.named_parameters()))
    assert_same(*trained)

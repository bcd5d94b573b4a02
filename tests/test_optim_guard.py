"""The drop-in face skips non-finite steps, without host synchronisation.

A NaN/inf in one input row, in the loss, in one micro-batch, or statistics that
overflow: parameters, K, C, m_K, m_C and momentum buffers stay bit for bit; the step is
counted in ``opt.skipped_steps`` and warned about once; the run goes on as if the bad
batch had not been seen (its ``step`` call still counts, see ``SINGD``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import singd_functional as sf
from tests._no_sync import no_host_sync
from tests.models import FAMILIES, make_batch, make_loss, make_model
from tests.test_optim import BASE, assert_same
from tests.test_optim_checkpoint import _assert_equal

HP = dict(BASE, structures=("dense", "hierarchical3_2"))


def _snapshot(model, opt):
    return copy.deepcopy((model.state_dict(), opt.state_dict()))


def _assert_unchanged(model, opt, snap, steps_called=1):
    params, state = _snapshot(model, opt)
    _assert_equal(params, snap[0])
    for g_now, g_then in zip(state["param_groups"], snap[1]["param_groups"]):
        assert g_now["step"] == g_then["step"] + steps_called
        g_now["step"] = g_then["step"]
    _assert_equal(state, snap[1])


def _bad(how, x, y, loss_fn, model):
    x = x.clone()
    if how == "nan_row":
        x[3] = float("nan")
    elif how == "inf_row":
        x[1, 2] = float("inf")
    elif how == "overflow":  # a finite gradient, a square beyond float32
        x[0, 0] = 1e25
    loss = loss_fn(model(x), y)
    return loss * float("nan") if how == "nan_loss" else loss


def _reference(kind, steps, skip, T, dtype=torch.float64, **hp):
    model = make_model(kind).to(dtype)
    opt = sf.SINGD(model, **{**HP, "T": T, **hp})
    loss_fn = make_loss("batch")
    for t in range(steps):
        if t == skip:
            for g in opt.param_groups:
                g["step"] += 1
            continue
        x, y = make_batch(kind, t)
        opt.zero_grad()
        loss_fn(model(x.to(dtype)), y).backward()
        opt.step()
    return model


@pytest.mark.parametrize("how", ["nan_row", "inf_row", "nan_loss", "overflow"])
@pytest.mark.parametrize("T", [1, 2], ids=["statistics-step", "T2"])
def test_a_bad_batch_changes_nothing_and_the_run_goes_on(how, T):
    dtype = torch.float32 if how == "overflow" else torch.float64
    model = make_model("mlp").to(dtype)
    opt = sf.SINGD(model, **{**HP, "T": T})
    loss_fn = make_loss("batch")
    bad = 2  # a statistics step for T=1 and T=2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(6):
            x, y = make_batch("mlp", t)
            x = x.to(dtype)
            opt.zero_grad()
            if t == bad:
                snap = _snapshot(model, opt)
                loss = _bad(how, x, y, loss_fn, model)
                loss.backward()
                if how == "overflow":
                    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
                opt.step()
                _assert_unchanged(model, opt, snap)
                assert int(opt.skipped_steps) == 1
            else:
                loss_fn(model(x), y).backward()
                opt.step()
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(messages) == 1 and "opt.skipped_steps" in messages[0]
    ref = _reference("mlp", 6, bad, T, dtype=dtype)
    assert_same(dict(model.named_parameters()), dict(ref.named_parameters()),
                tol=1e-10 if dtype == torch.float64 else 1e-5)


def test_a_plain_step_with_a_nan_gradient_changes_nothing():
    model = make_model("mlp")
    opt = sf.SINGD(model, **{**HP, "T": 3})
    loss_fn = make_loss("batch")
    for t in range(2):
        x, y = make_batch("mlp", t)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    x, y = make_batch("mlp", 2)
    opt.zero_grad()
    _bad("nan_row", x, y, loss_fn, model).backward()
    snap = _snapshot(model, opt)
    opt.step()  # step 2: no statistics due (T = 3)
    _assert_unchanged(model, opt, snap)


def test_one_bad_micro_batch_skips_the_accumulated_step():
    model = make_model("seq")
    opt = sf.SINGD(model, **{**HP, "structures": ("triltoeplitz", "dense")})
    loss_fn = make_loss("batch")
    x, y = make_batch("seq", 0)
    snap = _snapshot(model, opt)
    opt.zero_grad()
    for i, (xm, ym) in enumerate(zip(x.chunk(4), y.chunk(4))):
        if i == 2:
            xm = xm.clone()
            xm[0, 3, 1] = float("nan")
        (loss_fn(model(xm), ym) / 4).backward()
    opt.step()
    _assert_unchanged(model, opt, snap)
    assert int(opt.skipped_steps) == 1


def test_a_group_without_layers_gets_the_plain_heavy_ball_step():
    """A param group holding only LayerNorm parameters: SGD with momentum, no alpha1 error."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4),
                              torch.nn.Linear(4, 3)).double()
    norm = list(net[1].parameters())
    opt = sf.SINGD(net, [{"params": [*net[0].parameters(), *net[2].parameters()]},
                         {"params": norm, "lr": 0.1}], **HP)
    sgd = torch.optim.SGD([p.detach().clone().requires_grad_() for p in norm], lr=0.1,
                          momentum=0.9)
    loss_fn = make_loss("batch")
    for t in range(4):
        x, y = make_batch("mlp", t)
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        for p, q in zip(norm, sgd.param_groups[0]["params"]):
            q.grad = p.grad.clone()
        opt.step()
        sgd.step()
    for p, q in zip(norm, sgd.param_groups[0]["params"]):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)
    assert not torch.equal(norm[0], torch.ones(4, dtype=torch.float64))


def _train_no_sync(opt, model, steps, scaler=None, unscale=False, loss_fn=None):
    loss_fn = loss_fn or make_loss("batch")
    for t in range(steps):
        x, y = make_batch("mlp", t)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        if scaler is None:
            with no_host_sync():
                loss.backward()
                opt.step()
            continue
        loss = scaler.scale(loss)
        with no_host_sync():
            loss.backward()
        if unscale:
            scaler.unscale_(opt)
            opt.set_current_grad_scale(scaler.get_scale())
        # GradScaler itself reads found_inf on the host in update(), not in our step
        real_step = opt.step

        def guarded_step(*args, real_step=real_step, **kwargs):
            with no_host_sync():
                return real_step(*args, **kwargs)

        opt.step = guarded_step
        try:
            scaler.step(opt)
        finally:
            del opt.step
        scaler.update()


@pytest.mark.parametrize("scaler", [None, "scaler.step", "unscale_"])
@pytest.mark.parametrize("loss_average", ["batch", "tensor"])
def test_no_host_synchronisation_in_backward_hooks_and_step(scaler, loss_average):
    """Every .item() / float() / int() / bool() / .tolist() of a tensor raises in there."""
    model = make_model("mlp")
    la = torch.tensor(8.0, dtype=torch.float64) if loss_average == "tensor" else "batch"
    opt = sf.SINGD(model, **{**HP, "T": 2, "loss_average": la})
    grad_scaler = None if scaler is None else torch.amp.GradScaler("cpu", init_scale=2.0**8,
                                                                     growth_interval=1)
    loss_fn = make_loss(8.0 if loss_average == "tensor" else "batch")
    _train_no_sync(opt, model, 5, grad_scaler, unscale=scaler == "unscale_", loss_fn=loss_fn)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert int(opt.skipped_steps) == 0


def test_the_guard_off_is_the_unguarded_step():
    """``opt._guard = False`` (benchmarks only) takes the same numbers on finite steps."""
    a, b = make_model("cnn"), make_model("cnn")
    oa, ob = sf.SINGD(a, **{**HP, "T": 2}), sf.SINGD(b, **{**HP, "T": 2})
    ob._guard = False
    loss_fn = make_loss("batch")
    for t in range(5):
        x, y = make_batch("cnn", t)
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            loss_fn(m(x), y).backward()
            o.step()
    assert_same(dict(a.named_parameters()), dict(b.named_parameters()))


class _Net(torch.nn.Module):
    """Two layers and a LayerNorm between them (no layer: its direction is its gradient)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(5, 7)
        self.norm = torch.nn.LayerNorm(7)
        self.head = torch.nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.fc(x))))


@pytest.mark.parametrize("structure", FAMILIES)
@pytest.mark.parametrize("where", ["fc.weight", "fc.bias", "head.weight", "norm.weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")],
                         ids=["nan", "inf", "-inf"])
def test_one_nonfinite_gradient_entry_on_a_plain_step_changes_nothing(structure, where, value):
    """A plain step checks the directions, not the gradients: one bad entry shows there,
    for every structure, in a weight, a bias and a parameter outside every layer."""
    model = _Net().double()
    opt = sf.SINGD(model, model.parameters(), warn_unsupported=False,
                   **{**HP, "T": 3, "structures": (structure, structure)})
    loss_fn = make_loss("batch")
    for t in range(3):  # a statistics step, a plain step, then the bad plain step
        x, y = make_batch("mlp", t)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if t == 2:
            dict(model.named_parameters())[where].grad.view(-1)[1] = value
            snap = _snapshot(model, opt)
        opt.step()
    _assert_unchanged(model, opt, snap)
    assert int(opt.skipped_steps) == 1


@pytest.mark.filterwarnings("ignore:SINGD skipped")
@pytest.mark.parametrize("bad", ["fc", "head"], ids=["in-the-due-group", "in-the-plain-group"])
def test_one_verdict_for_a_group_with_statistics_and_one_without(bad):
    """Group fc has statistics every step, group head every other: a bad gradient in
    either skips the whole step (neither group moves); a good step moves both."""
    model = _Net().double()
    opt = sf.SINGD(model, [{"params": [*model.fc.parameters(), *model.norm.parameters()]},
                           {"params": model.head.parameters(), "T": 2}],
                   warn_unsupported=False, **{**HP, "T": 1})
    loss_fn = make_loss("batch")
    for t in range(4):
        x, y = make_batch("mlp", t)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if t == 3:  # the head group's plain step, the fc group's statistics step
            getattr(model, bad).weight.grad[0, 1] = float("nan")
        snap = _snapshot(model, opt)
        opt.step()
        if t == 3:
            _assert_unchanged(model, opt, snap)
        else:
            for k, p in snap[0].items():
                assert not torch.equal(p, model.state_dict()[k]), k
    assert int(opt.skipped_steps) == 1

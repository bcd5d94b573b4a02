"""Gradient accumulation, layers without gradients, frozen biases, moved models, closures."""

from __future__ import annotations

import copy
import gc
import io

import pytest
import torch
from torch import nn

import singd_functional as sf
from tests.models import make_batch, make_loss, make_model
from tests.oracle import DenseOracle
from tests.test_optim import BASE, assert_moved, assert_same, run_oracle, train
from tests.test_optim_checkpoint import _assert_equal


@pytest.mark.parametrize("kfac_like", [False, True], ids=["singd", "ikfac"])
@pytest.mark.parametrize("loss_average", ["batch", None], ids=["mean", "sum"])
def test_gradient_accumulation_equals_the_full_batch(kfac_like, loss_average):
    """k = 4 micro-batches (mean losses / k, sum losses as they are) == one full batch."""
    k, steps = 4, 6
    hp = dict(BASE, kfac_like=kfac_like, loss_average=loss_average,
              structures=("triltoeplitz", "dense"), lr=0.05 if loss_average else 0.01)
    loss_fn = make_loss(loss_average)

    model = make_model("seq")
    opt = sf.SINGD(model, **hp)
    for t in range(steps):
        x, y = make_batch("seq", t)
        opt.zero_grad()
        for xm, ym in zip(x.chunk(k), y.chunk(k)):
            loss = loss_fn(model(xm), ym)
            (loss / k if loss_average else loss).backward()
        opt.step()

    ref = make_model("seq")
    train(ref, sf.SINGD(ref, **hp), "seq", steps, loss_fn)
    assert_same(dict(model.named_parameters()), dict(ref.named_parameters()))
    assert_moved("seq", dict(model.named_parameters()))


class Branchy(nn.Module):
    """An MLP whose middle layer is only used when ``use_extra`` is set."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(5, 6)
        self.extra = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.use_extra = True

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        if self.use_extra:
            h = torch.tanh(self.extra(h))
        return self.head(h)


def _snapshot(opt, module):
    """Deep copy of a layer's parameters and optimizer state (factors as dense tensors)."""
    state = {k: {n: v.to_dense() if isinstance(v, sf.structures.StructuredMatrix) else v
                 for n, v in opt.state[p].items()}
             for k, p in module.named_parameters()}
    return copy.deepcopy((state, module.state_dict()))


def _assert_snapshot(opt, module, snap):
    _assert_equal(_snapshot(opt, module), snap)


def test_unused_layer_is_skipped_and_keeps_its_state():
    model = Branchy().double()
    opt = sf.SINGD(model, **BASE)
    loss_fn = make_loss("batch")
    train(model, opt, "mlp", 2, loss_fn)
    snap = _snapshot(opt, model.extra)
    fc_before = model.fc.weight.detach().clone()
    model.use_extra = False
    train(model, opt, "mlp", 2, loss_fn, start=2)
    _assert_snapshot(opt, model.extra, snap)
    assert not torch.equal(model.fc.weight, fc_before)
    model.use_extra = True
    train(model, opt, "mlp", 2, loss_fn, start=4)
    assert not torch.equal(model.extra.weight, snap[1]["weight"])


def test_layer_frozen_for_a_while():
    model = make_model("mlp")
    opt = sf.SINGD(model, **{**BASE, "T": 2})
    loss_fn = make_loss("batch")
    train(model, opt, "mlp", 2, loss_fn)
    snap = _snapshot(opt, model[2])
    model[2].requires_grad_(False)
    train(model, opt, "mlp", 3, loss_fn, start=2)
    _assert_snapshot(opt, model[2], snap)
    model[2].requires_grad_(True)
    train(model, opt, "mlp", 2, loss_fn, start=5)
    assert not torch.equal(model[2].weight, snap[1]["weight"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_frozen_bias_beside_trainable_weight_matches_oracle():
    def frozen_bias_model():
        model = make_model("mlp")
        model[2].bias.requires_grad_(False)
        return model

    loss_fn = make_loss("batch")
    model = frozen_bias_model()
    opt = sf.SINGD(model, **BASE)
    train(model, opt, "mlp", 6, loss_fn)
    ref = frozen_bias_model()
    oracle = DenseOracle(ref, **BASE)
    for t in range(6):
        x, y = make_batch("mlp", t)
        oracle.step(lambda x=x, y=y: loss_fn(ref(x), y))
    assert_same(dict(model.named_parameters()), dict(ref.named_parameters()))
    assert torch.equal(model[2].bias, make_model("mlp")[2].bias)
    assert opt.state[model[2].weight]["K"].dim == 7, "a frozen bias is not part of W~"


def test_bias_frozen_after_construction_is_left_alone():
    model = make_model("mlp")
    opt = sf.SINGD(model, **BASE)
    loss_fn = make_loss("batch")
    train(model, opt, "mlp", 2, loss_fn)
    model[2].bias.requires_grad_(False)
    bias, velocity = model[2].bias.detach().clone(), opt.state[model[2].bias]["momentum_buffer"]
    weight = model[2].weight.detach().clone()
    train(model, opt, "mlp", 3, loss_fn, start=2)
    assert torch.equal(model[2].bias, bias)
    assert opt.state[model[2].bias]["momentum_buffer"] is velocity
    assert not torch.equal(model[2].weight, weight)


def test_model_cast_after_construction_keeps_working():
    loss_fn = make_loss("batch")
    model = make_model("cnn").float()
    opt = sf.SINGD(model, **BASE, preconditioner_dtype=(None, torch.float32))
    model.double()
    train(model, opt, "cnn", 5, loss_fn)
    st = opt.state[model[0].weight]
    assert st["K"].dtype == torch.float64 and st["C"].dtype == torch.float32
    assert st["momentum_buffer"].dtype == torch.float64

    ref = make_model("cnn").float().double()
    train(ref, sf.SINGD(ref, **BASE, preconditioner_dtype=(None, torch.float32)), "cnn", 5, loss_fn)
    assert_same(dict(model.named_parameters()), dict(ref.named_parameters()), tol=0)


def test_replaced_parameter_is_a_clear_error():
    model = make_model("mlp")
    opt = sf.SINGD(model, **BASE)
    model[2].weight = nn.Parameter(model[2].weight.detach().clone())
    with pytest.raises(RuntimeError, match="build the optimizer after changing the model"):
        train(model, opt, "mlp", 1, make_loss("batch"))


def test_step_with_closure():
    loss_fn = make_loss("batch")
    model = make_model("mlp")
    opt = sf.SINGD(model, **{**BASE, "T": 2})
    for t in range(6):
        x, y = make_batch("mlp", t)

        def closure(x=x, y=y):
            assert torch.is_grad_enabled()
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        with torch.no_grad():
            loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor) and loss.requires_grad
    ref, _ = run_oracle("mlp", 6, **{**BASE, "T": 2})
    assert_same(dict(model.named_parameters()), ref)


def test_statistics_follow_gradients():
    """zero_grad drops finished passes; a forward without backward and no_grad passes add nothing."""
    loss_fn = make_loss("batch")
    model = make_model("cnn")
    opt = sf.SINGD(model, **BASE)
    for t in range(5):
        x, y = make_batch("cnn", t)
        other, other_y = make_batch("cnn", 100 + t)
        loss_fn(model(other), other_y).backward()  # discarded by zero_grad below
        opt.zero_grad()
        model(other)  # grad enabled, never backpropagated
        with torch.no_grad():
            model(other)
        loss_fn(model(x), y).backward()
        opt.step()
    ref, _ = run_oracle("cnn", 5, **BASE)
    assert_same(dict(model.named_parameters()), ref)


def test_model_copies_are_inert_and_hooks_leave_with_the_optimizer():
    loss_fn = make_loss("batch")
    model = make_model("mlp")
    opt = sf.SINGD(model, **BASE)
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)  # whole-model pickling carries the hooks along
    buf.seek(0)
    pickled = torch.load(buf, weights_only=False)
    for t in range(4):
        x, y = make_batch("mlp", t)
        opt.zero_grad()
        for copy_ in (twin, pickled):  # neither may feed the optimizer's statistics
            loss_fn(copy_(x * 3), y).backward()
        loss_fn(model(x), y).backward()
        opt.step()
    ref, _ = run_oracle("mlp", 4, **BASE)
    assert_same(dict(model.named_parameters()), ref)

    assert model[0]._forward_hooks
    del opt
    gc.collect()
    assert not model[0]._forward_hooks, "the optimizer's hooks outlived it"

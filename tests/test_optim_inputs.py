"""The drop-in face on awkward but legitimate input, against the dense oracle.

Two batch sizes through one layer in one backward, an empty batch on a statistics
step, unbatched Conv2d / 1-D Linear inputs, unequal micro-batches (10 + 6 rows), and
float16 / bfloat16 factors on realistic sizes, with and without a GradScaler.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import singd_functional as sf
from tests.models import make_batch, make_loss, make_model
from tests.test_optim import BASE, assert_same
from tests.test_statistics import (
    SemiSupervised,
    Unbatched,
    run_oracle,
    semi_batch,
    semi_loss,
    unbatched_batch,
    unbatched_loss,
)


def _train(model, batches, loss_fn, steps, **hp):
    opt = sf.SINGD(model, **hp)
    for t in range(steps):
        *inputs, y = batches(t)
        opt.zero_grad()
        loss_fn(model(*inputs), y).backward()
        opt.step()
    return dict(model.named_parameters()), opt


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_two_batch_sizes_in_one_backward_match_the_oracle(kfac_approx):
    hp = dict(BASE, kfac_approx=kfac_approx, T=2)
    params, _ = _train(SemiSupervised().double(), semi_batch, semi_loss, 5, **hp)
    ref = run_oracle(SemiSupervised().double(), semi_batch, semi_loss, 5, **hp)
    assert_same(params, ref)


def test_unbatched_conv2d_and_1d_linear_inputs_match_the_oracle():
    params, _ = _train(Unbatched().double(), unbatched_batch, unbatched_loss, 4, **BASE)
    ref = run_oracle(Unbatched().double(), unbatched_batch, unbatched_loss, 4, **BASE)
    assert_same(params, ref)


def test_an_empty_batch_on_a_statistics_step_matches_the_oracle():
    def batches(t):
        x, y = make_batch("cnn", t)
        return (x[:0], y[:0]) if t == 2 else (x, y)

    hp = dict(BASE, loss_average=None, lr=0.01)
    loss_fn = make_loss(None)
    params, opt = _train(make_model("cnn"), batches, loss_fn, 5, **hp)
    ref = run_oracle(make_model("cnn"), batches, loss_fn, 5, **hp)
    assert_same(params, ref)
    assert int(opt.skipped_steps) == 0


@pytest.mark.parametrize("loss_average", [None, "batch", "batch+sequence"])
def test_unequal_micro_batches_equal_the_full_batch(loss_average):
    """10 + 6 rows, mean losses weighted n_i / N, several backward() before step()."""
    sizes, steps = (10, 6), 4
    hp = dict(BASE, loss_average=loss_average, lr=0.05 if loss_average else 0.01,
              structures=("triltoeplitz", "dense"))
    loss_fn = make_loss(loss_average)
    model = make_model("seq")
    opt = sf.SINGD(model, **hp)
    ref = make_model("seq")
    ref_opt = sf.SINGD(ref, **hp)
    for t in range(steps):
        x, y = make_batch("seq", t, n=sum(sizes))
        opt.zero_grad()
        for xm, ym in zip(x.split(sizes), y.split(sizes)):
            weight = 1.0 if loss_average is None else len(xm) / len(x)
            (loss_fn(model(xm), ym) * weight).backward()
        opt.step()
        ref_opt.zero_grad()
        loss_fn(ref(x), y).backward()
        ref_opt.step()
    assert_same(dict(model.named_parameters()), dict(ref.named_parameters()))
    assert (model.head.weight - make_model("seq").head.weight).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "GradScaler"])
def test_low_precision_factors_on_realistic_sizes_match_float64(dtype, scaled):
    """16,384 rows of std-2 activations, factors in float16 / bfloat16, as float64 does."""
    gen = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(16384, 64, generator=gen)
    y = torch.randint(0, 32, (16384,), generator=gen)

    def factors_after_one_step(factor_dtype):
        torch.manual_seed(0)
        model = nn.Linear(64, 32)
        opt = sf.SINGD(model, **dict(BASE, lr_cov=0.5), preconditioner_dtype=(factor_dtype,) * 2,
                       init_grad_scale=2.0**16 if scaled else 1.0)
        loss = F.cross_entropy(model(x), y)
        if scaled:
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        st = opt.state[model.weight]
        assert int(opt.skipped_steps) == 0
        return [st[k].to_dense().double() for k in ("K", "C", "m_K", "m_C")], model.weight

    low, w_low = factors_after_one_step(dtype)
    ref, w_ref = factors_after_one_step(torch.float64)
    tol = 5e-3 if dtype == torch.float16 else 3e-2
    for name, a, b in zip(("K", "C", "m_K", "m_C"), low, ref):
        assert torch.isfinite(a).all(), f"{name} is not finite with {dtype} factors"
        err = (a - b).norm() / b.norm()
        assert err < tol, f"{name}: relative error {err:.2e}"
    assert ((w_low - w_ref).norm() / w_ref.norm()) < tol

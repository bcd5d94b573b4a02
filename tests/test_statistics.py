"""Statistics on legitimate but awkward input, and in low precision (pure face).

Two batch sizes through one layer in one backward, empty batches, unbatched inputs,
float16 / bfloat16 factors on realistic sizes (with and without a loss scale).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import singd_functional as sf
from singd_functional.capture import LayerCapture
from singd_functional.statistics import layer_part
from tests.models import make_loss
from tests.oracle import DenseOracle
from tests.test_core import BASE, assert_same


class SemiSupervised(nn.Module):
    """One network applied to a labelled and an unlabelled batch of another size."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))

    def forward(self, x_lab, x_unlab):
        return self.net(x_lab), self.net(x_unlab)


def semi_loss(out, y):
    """l1(model(x_lab)) + l2(model(x_unlab)): cross-entropy plus a mean entropy term."""
    out_lab, out_unlab = out
    p = out_unlab.softmax(-1)
    return F.cross_entropy(out_lab, y) - 0.1 * (p * p.clamp_min(1e-12).log()).sum(-1).mean()


def semi_batch(t):
    g = torch.Generator().manual_seed(100 + t)
    return (torch.randn(4, 5, generator=g, dtype=torch.float64),
            torch.randn(6, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (4,), generator=g))


def run_pure(model, batches, loss_fn, steps, **hp):
    layers = sf.find_layers(model)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    capture = sf.make_capture(model, loss_fn, layers)
    tx = sf.singd(layers, **{k: v for k, v in hp.items() if k != "T"})
    state = tx.init(params)
    for t in range(steps):
        *inputs, y = batches(t)
        _, grads, caps = capture(params, *inputs, y)
        updates, state = tx.update(grads, state, params, captures=caps)
        params = sf.apply_updates(params, updates)
    return params, state


def run_oracle(model, batches, loss_fn, steps, **hp):
    oracle = DenseOracle(model, **hp)
    for t in range(steps):
        *inputs, y = batches(t)
        oracle.step(lambda inputs=inputs, y=y: loss_fn(model(*inputs), y))
    return dict(model.named_parameters())


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("loss_average", ["batch", None])
def test_two_batch_sizes_in_one_backward_match_the_oracle(kfac_approx, loss_average):
    hp = dict(BASE, kfac_approx=kfac_approx, loss_average=loss_average)
    params, _ = run_pure(SemiSupervised().double(), semi_batch, semi_loss, 4, **hp)
    ref = run_oracle(SemiSupervised().double(), semi_batch, semi_loss, 4, **hp)
    assert_same(params, ref)
    assert (params["net.0.weight"] - SemiSupervised().double().net[0].weight).abs().max() > 1e-3


def test_two_batch_sizes_pool_all_rows_and_keep_each_c():
    info = sf.find_layers(nn.Linear(3, 2).double())[0]
    K, C = (sf.structures.Dense.eye(d, dtype=torch.float64) for d in (4, 2))
    x1, x2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    g1, g2 = torch.randn(4, 2, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    part = layer_part(info, K, C, LayerCapture((x1, x2), (g1, g2)))
    a = torch.cat([torch.cat([x1, x2]), torch.ones(10, 1, dtype=torch.float64)], 1)
    assert torch.allclose(part.stats.H_K.to_dense(), a.T @ a / 10)
    assert torch.allclose(part.stats.H_C.to_dense(), 4 * g1.T @ g1 + 6 * g2.T @ g2)
    assert part.rows == 10 and part.loss_terms == 10


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_unbatched_inputs_are_a_batch_of_one(kind):
    torch.manual_seed(0)
    mod = {"linear": nn.Linear(5, 3), "conv1d": nn.Conv1d(2, 3, 3, padding=1),
           "conv2d": nn.Conv2d(2, 3, 3, stride=2)}[kind].double()
    shape = {"linear": (5,), "conv1d": (2, 7), "conv2d": (2, 7, 7)}[kind]
    x = torch.randn(*shape, dtype=torch.float64)
    g = torch.randn_like(mod(x))
    info = sf.find_layers(mod)[0]
    K, C = (sf.structures.Dense.eye(d, dtype=torch.float64) for d in (info.d_K, info.d_C))
    one = layer_part(info, K, C, LayerCapture((x,), (g,)))
    batch = layer_part(info, K, C, LayerCapture((x[None],), (g[None],)))
    assert one.rows == batch.rows and one.loss_terms == batch.loss_terms == 1
    for a, b in zip(one.stats, batch.stats):
        assert torch.equal(a.to_dense(), b.to_dense())


class Unbatched(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):  # x: (C, H, W)
        return self.fc(torch.tanh(self.conv(x)).mean((1, 2)))  # a 1-D Linear input


def unbatched_batch(t):
    g = torch.Generator().manual_seed(200 + t)
    return torch.randn(3, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (), generator=g)


def unbatched_loss(out, y):
    return F.cross_entropy(out, y)


def test_unbatched_conv2d_and_1d_linear_inputs_match_the_oracle():
    params, _ = run_pure(Unbatched().double(), unbatched_batch, unbatched_loss, 4, **BASE)
    ref = run_oracle(Unbatched().double(), unbatched_batch, unbatched_loss, 4, **BASE)
    assert_same(params, ref)


def test_an_empty_batch_has_no_statistics_and_keeps_the_factors():
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    layers = sf.find_layers(model)
    tx = sf.singd(layers, **{k: v for k, v in BASE.items() if k != "T"})
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = tx.init(params)
    capture = sf.make_capture(model, make_loss(None), layers)
    _, grads, caps = capture(params, torch.zeros(0, 5, dtype=torch.float64),
                             torch.zeros(0, dtype=torch.long))
    part = layer_part(layers[0], *state.factors["0"], caps["0"])
    assert part.rows == 0 and torch.equal(part.stats.H_K.to_dense(), torch.zeros(6, 6))
    updates, new = tx.update(grads, state, params, captures=caps)
    for name, (K, C) in new.factors.items():
        assert torch.equal(K.to_dense(), state.factors[name].K.to_dense())
        assert torch.equal(C.to_dense(), state.factors[name].C.to_dense())
    assert all(torch.equal(u, torch.zeros_like(u)) for u in updates.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grad_scale", [1.0, 2.0**16], ids=["unscaled", "GradScaler"])
@pytest.mark.parametrize("structure", ["dense", "diagonal", "block8diagonal"])
def test_low_precision_factors_on_realistic_sizes_match_float64(dtype, grad_scale, structure):
    """16,384 rows of std-2 activations: their sum of squares (~65,536) overflows float16."""
    rows, d_in, d_out = 16384, 64, 32
    info = sf.find_layers(nn.Linear(d_in, d_out))[0]
    gen = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(rows, d_in, generator=gen)
    g = torch.randn(rows, d_out, generator=gen) / rows  # a mean loss: g carries 1/N
    T = sf.structures.get(structure)

    def part(factor_dtype, x, g):
        K, C = T.eye(info.d_K, dtype=factor_dtype), T.eye(info.d_C, dtype=factor_dtype)
        return layer_part(info, K, C, LayerCapture((x,), (g,)), grad_scale=grad_scale).stats

    ref = part(torch.float64, x.double(), g.double() * grad_scale)
    # as autocast gives them: activations and (scaled) output gradients in low precision
    low = part(dtype, x.to(dtype), (g * grad_scale).to(dtype))
    tol = 3e-3 if dtype == torch.float16 else 2e-2
    for name, a, b in zip(("H_K", "H_C"), low, ref):
        a, b = a.to_dense().double(), b.to_dense()
        assert torch.isfinite(a).all(), f"{name} is not finite in {dtype}"
        err = (a - b).norm() / b.norm()
        assert err < tol, f"{name}: relative error {err:.2e}"

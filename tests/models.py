"""Small float64 models and batches shared by the equivalence tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import singd_functional as sf


class Seq(nn.Module):
    """Token model: Linear on [N, S, d] inputs, a Conv1d over the sequence, Linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.conv = nn.Conv1d(6, 5, 3, padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        h = torch.relu(self.conv(h.transpose(1, 2))).transpose(1, 2)
        return self.head(h)


class Twice(nn.Module):
    """One Linear called twice per forward pass (extra weight-sharing positions)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))
    elif kind == "cnn":
        m = nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, dilation=2, padding="same", groups=2),
            nn.ReLU(),
            nn.Conv2d(4, 2, 2, padding="same", padding_mode="circular"),
            nn.Flatten(),
            nn.Linear(2 * 3 * 3, 3),
        )
    elif kind == "cnn_sym":  # symmetric paddings only (the official package needs them)
        m = nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, dilation=2, padding=2, groups=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 3 * 3, 3),
        )
    elif kind == "wide":  # layers wider than 30: hierarchical15_15 is not dense here
        m = nn.Sequential(nn.Linear(36, 40), nn.Tanh(), nn.Linear(40, 3))
    elif kind == "seq":
        m = Seq()
    elif kind == "twice":
        m = Twice()
    else:
        raise ValueError(kind)
    return m.double()


def make_batch(kind: str, step: int, n: int = 8):
    g = torch.Generator().manual_seed(1000 + step)
    if kind in ("mlp", "twice"):
        return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    if kind == "wide":
        return torch.randn(n, 36, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    if kind in ("cnn", "cnn_sym"):
        return torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    return torch.randn(n, 7, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n, 7), generator=g)


def make_loss(loss_average):
    """The loss whose reduction matches ``loss_average``."""

    def loss_fn(out, y):
        total = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")
        if loss_average is None:
            return total
        if loss_average == "batch":
            return total / y.shape[0]
        if loss_average == "batch+sequence":
            return total / y.numel()
        return total / loss_average

    return loss_fn


def run_core(kind, steps, loss_average="batch", T=1, device="cpu", **hp):
    """Train ``make_model(kind)`` with the pure core on ``device``; captures every T steps."""
    model = make_model(kind).to(device)
    layers = sf.find_layers(model)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    capture = sf.make_capture(model, make_loss(loss_average), layers)
    tx = sf.singd(layers, loss_average=loss_average, **hp)
    state = tx.init(params)
    for t in range(steps):
        x, y = (v.to(device) for v in make_batch(kind, t))
        _, grads, captures = capture(params, x, y)
        updates, state = tx.update(grads, state, params, captures=captures if t % T == 0 else None)
        params = sf.apply_updates(params, updates)
    return params, state


class LinearUsedByWeight(nn.Module):
    """Two Linear layers; ``b``'s weight is used through ``F.linear`` without calling ``b``
    (so no hook or capture of ``b`` fires)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return F.linear(torch.tanh(self.a(x)), self.b.weight, self.b.bias)


# every structure family once, small sizes (the compile tests)
FAMILIES = [
    "dense", "diagonal", "block3diagonal", "hierarchical3_2", "triltoeplitz",
    "triutoeplitz", "triltopleftdiag", "trilbottomrightdiag", "triutopleftdiag",
    "triubottomrightdiag",
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """dynamo's caches and counters reset around each test of a module that imports it."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()

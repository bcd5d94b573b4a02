"""The drop-in's plain step done in place (``_step._lean_update``) equals the pure core's.

Two optimizers on copies of one model, one of them with ``opt._lean = False`` (every
step through the pure core's ``update`` and ``_apply``, as before the in-place step),
over steps with and without statistics: weight decay, momentum, a frozen bias beside a
trained weight, parameters outside every layer (the identity-preconditioned heavy-ball
step), a skipped plain step with a NaN gradient, loss scales. Parameters and every state
tensor agree to 1e-12 (float64; the in-place heavy-ball rounds as torch.optim.SGD), and
the skipped step changes nothing, bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import singd_functional as sf
from tests.models import make_batch, make_loss
from tests.test_optim import BASE


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)  # no layer: the identity-preconditioned step
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, x):
        h = torch.tanh(self.norm(self.fc(x)))
        return self.head(torch.tanh(self.mid(h))) * self.temperature


def _run(lean: bool, structures, guard=True, bad=(4, 7), grad_scale=None, steps=9, **hp):
    """Train; steps ``bad`` are plain steps (T = 3) with an inf in one gradient entry
    (step 4: the other gradients finite) or a NaN input row (step 7: every gradient NaN)."""
    model = Net().double()
    opt = sf.SINGD(model, model.parameters(), warn_unsupported=False,
                   init_grad_scale=grad_scale or 1.0,
                   **{**BASE, "T": 3, "weight_decay": 1e-2, "structures": structures, **hp})
    opt._lean, opt._guard = lean, guard
    model.mid.bias.requires_grad_(False)  # frozen after the state was made: a zero column
    loss_fn = make_loss("batch")
    skipped = []
    for t in range(steps):
        x, y = make_batch("mlp", t)
        if t in bad[1:]:
            x = x.clone()
            x[2, 1] = float("nan")
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        if grad_scale is not None:
            opt.set_current_grad_scale(grad_scale)
            loss = loss * grad_scale
        loss.backward()
        if t in bad[:1]:
            model.fc.weight.grad[1, 2] = float("inf")
        if t in bad:
            before = copy.deepcopy((list(model.parameters()), _state_tensors(opt)))
        opt.step()
        if t in bad:
            skipped.append((before, copy.deepcopy((list(model.parameters()),
                                                   _state_tensors(opt)))))
    return model, opt, skipped


def _relative(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def _state_tensors(opt):
    out = []
    for st in opt.state.values():
        for key in sorted(st):
            value = st[key]
            out += [value] if isinstance(value, torch.Tensor) else list(value.leaves)
    return out


@pytest.mark.filterwarnings("ignore:SINGD skipped")
@pytest.mark.parametrize("structures", [("diagonal", "diagonal"), ("dense", "block3diagonal"),
                                        ("diagonal", "dense"), ("hierarchical3_2", "diagonal")])
@pytest.mark.parametrize("case", ["float", "tensor", "scaled", "unguarded"])
def test_the_plain_step_in_place_equals_the_pure_core(structures, case):
    hp: dict = dict(structures=structures)
    if case == "tensor":  # 0-d tensor numbers: the tensor forms of the helpers
        hp.update(lr=torch.tensor(0.05, dtype=torch.float64),
                  momentum=torch.tensor(0.9, dtype=torch.float64),
                  weight_decay=torch.tensor(1e-2, dtype=torch.float64))
    if case == "scaled":  # the directions divided by the loss scale
        hp.update(grad_scale=8.0)
    if case == "unguarded":  # opt._guard = False, no bad step
        hp.update(guard=False, bad=())
    (a, oa, skipped), (b, ob, _) = (_run(lean, **hp) for lean in (True, False))
    assert int(oa.skipped_steps) == int(ob.skipped_steps) == (0 if case == "unguarded" else 2)
    for before, after in skipped:
        for then, now in zip(before, after):
            for s, t in zip(then, now, strict=True):
                assert torch.equal(s, t)
    for (k, p), q in zip(a.named_parameters(), b.parameters()):
        assert _relative(p, q) < 1e-12, k
    for s, t in zip(_state_tensors(oa), _state_tensors(ob), strict=True):
        assert _relative(s, t) < 1e-12
    fresh = Net().double()
    assert torch.equal(a.mid.bias, fresh.mid.bias)  # frozen: not moved
    for k, p in fresh.named_parameters():  # everything else moved
        if k != "mid.bias":
            assert not torch.equal(p, dict(a.named_parameters())[k]), k

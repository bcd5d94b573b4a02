"""First-order transforms for parameters outside supported layers (and baselines).

Each returns final updates (to be added to the parameters), like torch.optim's rules.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .combine import GradientTransformation


class SGDState(NamedTuple):
    velocity: dict[str, Tensor]


def sgd(
    lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0
) -> GradientTransformation:
    """Heavy-ball SGD as ``torch.optim.SGD`` (no dampening, no Nesterov)::

    v <- momentum v + (g + weight_decay w);   update = -lr v
    """

    def init(params):
        return SGDState({k: torch.zeros_like(p) for k, p in params.items()})

    def update(grads, state, params, **_):
        v = {
            k: state.velocity[k] * momentum + g + (weight_decay * params[k] if weight_decay else 0)
            for k, g in grads.items()
        }
        return {k: -lr * vk for k, vk in v.items()}, SGDState(v)

    return GradientTransformation(init, update)


class AdamWState(NamedTuple):
    count: Tensor
    mu: dict[str, Tensor]
    nu: dict[str, Tensor]


def adamw(
    lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2
) -> GradientTransformation:
    """AdamW as ``torch.optim.AdamW`` (decoupled weight decay, bias correction)."""
    b1, b2 = betas

    def init(params):
        return AdamWState(
            torch.zeros((), dtype=torch.int64),
            {k: torch.zeros_like(p) for k, p in params.items()},
            {k: torch.zeros_like(p) for k, p in params.items()},
        )

    def update(grads, state, params, **_):
        t = state.count + 1
        mu = {k: state.mu[k] * b1 + g * (1 - b1) for k, g in grads.items()}
        nu = {k: state.nu[k] * b2 + g * g * (1 - b2) for k, g in grads.items()}
        # float64 powers: `0.9 ** int64 tensor` would be float32
        c1 = 1 - b1 ** t.double()
        c2 = 1 - b2 ** t.double()
        updates = {
            k: -lr * (mu[k] / c1) / ((nu[k] / c2).sqrt() + eps) - lr * weight_decay * params[k]
            for k in grads
        }
        return updates, AdamWState(t, mu, nu)

    return GradientTransformation(init, update)

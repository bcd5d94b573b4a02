"""First-order transforms: the primitives SINGD ends with, and torch.optim's rules.

Primitives (each one step of the update, composed with :func:`~singd_functional.chain`)::

    add_decayed_weights(wd)      u <- u + wd w
    trace(momentum)              v <- momentum v + u;  u <- v   (heavy-ball)
    scale_by_learning_rate(lr)   u <- -lr u
    clip_by_global_norm(c)       u <- u min(1, c / ||u||)

and the rules :func:`sgd` and :func:`adamw` (as ``torch.optim.SGD`` / ``AdamW``), for
parameters outside supported layers and as baselines. Every numeric hyperparameter
is a float or a 0-d tensor and can be given per call through ``hyperparams=``
(:class:`~singd_functional.HyperParams`). The dict helpers below (``_decayed``,
``_heavy_ball``, ``_scaled``) are the only place these formulas are written; the
SINGD transform calls them too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .combine import GradientTransformation, chain, require_params, unknown_extras
from .hyperparams import Number, reader

_HYPER = frozenset({"hyperparams"})


def _is_float(x) -> bool:
    return isinstance(x, (int, float))


def _decayed(updates: dict, params, weight_decay, keys) -> dict:
    """u + weight_decay w per key (fused when ``weight_decay`` is a float)."""
    if _is_float(weight_decay):
        if weight_decay == 0:
            return updates
        return {k: torch.add(updates[k], params[k], alpha=weight_decay) for k in keys}
    return {k: updates[k] + params[k] * weight_decay for k in keys}


def _heavy_ball(updates: dict, velocity: dict, momentum) -> dict:
    """momentum v + u per key of ``velocity`` (fused when ``momentum`` is a float)."""
    if _is_float(momentum):
        return {k: torch.add(updates[k], v, alpha=momentum) for k, v in velocity.items()}
    return {k: torch.addcmul(updates[k], v, momentum) for k, v in velocity.items()}  # one pass


def _scaled(updates: dict, lr) -> dict:
    """-lr u per key."""
    neg = -lr
    if isinstance(neg, Tensor) and neg.dtype != torch.float32:
        # a float32 product casts its 0-d operand to float32 first (a copy per call):
        # cast once, the same value (lr is a 0-d float64 tensor in sweeps and schedules)
        neg32 = neg.float()
        return {k: u * (neg32 if u.dtype == torch.float32 else neg) for k, u in updates.items()}
    return {k: u * neg for k, u in updates.items()}


# The same formulas in place, over lists, one ``torch._foreach_*`` call each for all
# parameters (as torch.optim's foreach paths do): the drop-in's plain step. The sums are
# the same; the heavy-ball rounds as torch.optim.SGD's (v <- m v, then v + u) rather than
# as the dict helper's one fused m v + u, i.e. the same numbers to a rounding per step
# (tests/test_fallbacks.py, tests/test_optim_lean.py). The descent w + v (-lr) is one
# addcmul for a float lr and for the guard's gated 0-d lr alike, so the guard changes no
# bit of a kept step (tests/test_optim_statistics_step.py). In place, the heavy-ball and
# the update allocate nothing: on the CPU fresh parameter-sized tensors cost page faults
# (a plain drop-in step of the MLP 784-512-512-10, diagonal: 180-460 before, 0 with these).


def _decayed_(updates: list[Tensor], params: list[Tensor], weight_decay) -> None:
    """:func:`_decayed` in place on ``updates``: u <- u + weight_decay w."""
    if _is_float(weight_decay):
        if weight_decay != 0:
            torch._foreach_add_(updates, params, alpha=weight_decay)
        return
    torch._foreach_add_(updates, torch._foreach_mul(params, weight_decay))


def _heavy_ball_(velocity: list[Tensor], updates: list[Tensor], momentum,
                 weight: Tensor | None = None) -> None:
    """:func:`_heavy_ball` in place on ``velocity``: v <- momentum v + u.

    ``weight`` (a 0-d tensor): v <- momentum v + weight u; ``updates`` must then be
    finite (0 times inf is NaN).
    """
    torch._foreach_mul_(velocity, momentum)
    if weight is None:
        torch._foreach_add_(velocity, updates)
    else:
        torch._foreach_addcmul_(velocity, updates, [weight] * len(updates))


def _descend_(params: list[Tensor], velocity: list[Tensor], lr) -> None:
    """:func:`_scaled` and the update in place on ``params``: w <- w - lr v.

    One rounding rule for a float and a 0-d tensor ``lr`` (``addcmul`` with -lr as a 0-d
    float64 tensor, made on the device without a host copy): the guard's gated lr
    (lr times ok) then gives a kept step the same bits as an unguarded one.
    """
    if not velocity:
        return
    if _is_float(lr):
        lr = torch.full((), lr, dtype=torch.float64, device=velocity[0].device)
    torch._foreach_addcmul_(params, velocity, [-lr] * len(velocity))


def _check_velocity(updates, velocity: dict, params=None, exact: bool = False) -> None:
    """Every buffer has its update, of its shape (``exact``: and no update is left over)."""
    if exact and len(updates) != len(velocity):
        extra = sorted(k for k in updates if k not in velocity)
        raise ValueError(
            f"updates for {extra}, which the state has no buffer for; re-run init() with "
            "every parameter, or wrap the transform in sf.masked / sf.partition"
        )
    for k, v in velocity.items():
        if k not in updates:
            raise KeyError(f"grads has no entry for parameter {k!r}")
        if updates[k].shape != v.shape or (params is not None and params[k].shape != v.shape):
            raise ValueError(
                f"parameter {k!r}: state was built for shape {tuple(v.shape)}, got grad "
                f"{tuple(updates[k].shape)}; re-run init() after changing the model"
            )


def add_decayed_weights(weight_decay: Number = 0.0) -> GradientTransformation:
    """``u <- u + weight_decay * w`` (L2 / decoupled weight decay, by its place in a chain)."""
    read, names = reader(weight_decay=weight_decay)

    def init(params):
        return ()

    def update(updates, state, params=None, *, hyperparams=None, **unexpected):
        if unexpected:
            raise unknown_extras(unexpected, _HYPER, "add_decayed_weights(...).update")
        (wd,) = read(hyperparams)
        if _is_float(wd) and wd == 0:
            return updates, state
        require_params(params, "add_decayed_weights")
        return _decayed(updates, params, wd, updates), state

    return GradientTransformation(init, update, _HYPER, names)


class TraceState(NamedTuple):
    """Heavy-ball buffer v per parameter key."""

    velocity: dict[str, Tensor]


def trace(momentum: Number = 0.9, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum: ``v <- momentum v + u``; returns ``v`` (Nesterov:
    ``u + momentum v``), as ``torch.optim.SGD``'s buffer (no dampening)."""
    read, names = reader(momentum=momentum)

    def init(params):
        return TraceState({k: torch.zeros_like(p) for k, p in params.items()})

    def update(updates, state, params=None, *, hyperparams=None, **unexpected):
        if unexpected:
            raise unknown_extras(unexpected, _HYPER, "trace(...).update")
        (m,) = read(hyperparams)
        _check_velocity(updates, state.velocity, exact=True)
        v = _heavy_ball(updates, state.velocity, m)
        if nesterov:
            return _heavy_ball(updates, v, m), TraceState(v)
        return v, TraceState(v)

    return GradientTransformation(init, update, _HYPER, names)


def scale_by_learning_rate(lr: Number = 1e-3) -> GradientTransformation:
    """``u <- -lr u`` (the sign turns a descent direction into an update)."""
    read, names = reader(lr=lr)

    def init(params):
        return ()

    def update(updates, state, params=None, *, hyperparams=None, **unexpected):
        if unexpected:
            raise unknown_extras(unexpected, _HYPER, "scale_by_learning_rate(...).update")
        (rate,) = read(hyperparams)
        return _scaled(updates, rate), state

    return GradientTransformation(init, update, _HYPER, names)


def clip_by_global_norm(max_norm: Number) -> GradientTransformation:
    """Rescale the updates so that their global L2 norm is at most ``max_norm``:
    ``u <- u * min(1, max_norm / (||u|| + 1e-12))``."""
    read, names = reader(max_norm=max_norm)

    def init(params):
        return ()

    def update(updates, state, params=None, *, hyperparams=None, **unexpected):
        if unexpected:
            raise unknown_extras(unexpected, _HYPER, "clip_by_global_norm(...).update")
        (c,) = read(hyperparams)
        norms = torch.stack([torch.linalg.vector_norm(u) for u in updates.values()])
        norm = torch.linalg.vector_norm(norms)
        factor = torch.clamp(c / (norm + 1e-12), max=1.0)
        return {k: u * factor.to(u.dtype) for k, u in updates.items()}, state

    return GradientTransformation(init, update, _HYPER, names)


def sgd(
    lr: Number = 1e-3, momentum: Number = 0.9, weight_decay: Number = 0.0, nesterov: bool = False
) -> GradientTransformation:
    """``torch.optim.SGD`` (no dampening): the chain of :func:`add_decayed_weights`,
    :func:`trace` and :func:`scale_by_learning_rate`::

        v <- momentum v + (g + weight_decay w);   update = -lr v   (Nesterov: -lr (g' + momentum v))

    The state is the chain's: ``((), TraceState(velocity), ())``.
    """
    return chain(
        add_decayed_weights(weight_decay), trace(momentum, nesterov), scale_by_learning_rate(lr)
    )


class AdamWState(NamedTuple):
    count: Tensor  # type: ignore[assignment]  # a field named like tuple.count (optax's name)
    mu: dict[str, Tensor]
    nu: dict[str, Tensor]


def adamw(
    lr: Number = 1e-3,
    betas: tuple[Number, Number] = (0.9, 0.999),
    eps: Number = 1e-8,
    weight_decay: Number = 1e-2,
) -> GradientTransformation:
    """``torch.optim.AdamW`` (decoupled weight decay, bias correction)::

        mu <- b1 mu + (1 - b1) g;   nu <- b2 nu + (1 - b2) g^2
        update = -lr (mu / (1 - b1^t)) / (sqrt(nu / (1 - b2^t)) + eps) - lr weight_decay w

    ``hyperparams=`` may set ``lr``, ``b1``, ``b2``, ``eps`` and ``weight_decay``.
    """
    b1, b2 = betas
    read, names = reader(
        frozenset({"b1", "b2"}), lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay
    )

    def init(params):
        return AdamWState(
            torch.zeros((), dtype=torch.int64),
            {k: torch.zeros_like(p) for k, p in params.items()},
            {k: torch.zeros_like(p) for k, p in params.items()},
        )

    def update(updates, state, params=None, *, hyperparams=None, **unexpected):
        if unexpected:
            raise unknown_extras(unexpected, _HYPER, "adamw(...).update")
        require_params(params, "adamw")
        rate, c_b1, c_b2, c_eps, wd = read(hyperparams)
        t = state.count + 1
        mu = {k: state.mu[k] * c_b1 + g * (1 - c_b1) for k, g in updates.items()}
        nu = {k: state.nu[k] * c_b2 + g * g * (1 - c_b2) for k, g in updates.items()}
        # float64 powers: `0.9 ** int64 tensor` would be float32
        c1 = 1 - c_b1 ** t.double()
        c2 = 1 - c_b2 ** t.double()
        out = {
            k: -rate * (mu[k] / c1) / ((nu[k] / c2).sqrt() + c_eps) - rate * wd * params[k]
            for k in updates
        }
        return out, AdamWState(t, mu, nu)

    return GradientTransformation(init, update, _HYPER, names)

"""Composing update functions, optax-style.

A :class:`GradientTransformation` is a pair of pure functions::

    state = tx.init(params)
    updates, state = tx.update(updates, state, params, **extra)

``updates`` are what :func:`apply_updates` ADDS to the parameters (so an SGD step is
``-lr * grad``). ``**extra`` (e.g. ``captures=``, ``hyperparams=``) is passed to every
transform of a :func:`chain`; a transform ignores the keywords it does not use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor


class GradientTransformation(NamedTuple):
    """``init(params) -> state`` and ``update(updates, state, params, **extra)``."""

    init: Callable[..., Any]
    update: Callable[..., tuple[Any, Any]]


def apply_updates(params, updates):
    """``params + updates`` leaf by leaf, out of place; a missing/None update keeps the leaf."""
    return {
        k: (p if updates.get(k) is None else p + updates[k].to(p.dtype)) for k, p in params.items()
    }


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` one after the other (the state is a tuple of theirs)."""

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None, **extra):
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params, **extra)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


class ScheduleState(NamedTuple):
    count: Tensor


def scale_by_schedule(schedule: Callable[[Tensor], Any]) -> GradientTransformation:
    """Multiply the updates by ``schedule(count)`` (count: 0-d int64 tensor, from 0)."""

    def init(params):
        return ScheduleState(torch.zeros((), dtype=torch.int64))

    def update(updates, state, params=None, **_):
        factor = schedule(state.count)
        return (
            optree.tree_map(lambda u: u * factor, updates),
            ScheduleState(state.count + 1),
        )

    return GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Rescale the updates so that their global L2 norm is at most ``max_norm``."""

    def init(params):
        return ()

    def update(updates, state, params=None, **_):
        leaves = optree.tree_leaves(updates)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(u) for u in leaves]))
        factor = torch.clamp(max_norm / (norm + 1e-12), max=1.0)
        return optree.tree_map(lambda u: u * factor.to(u.dtype), updates), state

    return GradientTransformation(init, update)


def masked(inner: GradientTransformation, keys) -> GradientTransformation:
    """Apply ``inner`` only to the entries whose key is in ``keys`` (others pass through)."""
    keys = frozenset(keys)

    def pick(tree):
        return {k: v for k, v in tree.items() if k in keys}

    def init(params):
        return inner.init(pick(params))

    def update(updates, state, params=None, **extra):
        sub, state = inner.update(
            pick(updates), state, None if params is None else pick(params), **extra
        )
        return {**updates, **sub}, state

    return GradientTransformation(init, update)

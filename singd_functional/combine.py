"""Composing update functions, optax-style: the contract, ``chain``, ``masked``, ``partition``.

A :class:`GradientTransformation` is a pair of pure functions plus what they declare::

    state = tx.init(params)
    updates, state = tx.update(updates, state, params=None, **extras)

``updates`` are what :func:`apply_updates` ADDS to the parameters (so an SGD step is
``-lr * grad``). ``extras`` are the keyword arguments a transform's ``update``
declares in ``tx.extras`` (e.g. ``captures``, ``statistics``, ``grad_scale``,
``hyperparams``). The combinators forward to each inner transform only the extras it
declares, and an extra that none declares is a ``TypeError`` (a typo such as
``captrues=`` never goes unnoticed). ``tx.hyperparams`` names the
:class:`~singd_functional.HyperParams` fields the transform reads from
``hyperparams=``.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .hyperparams import FIELDS, HyperParams, reject_foreign, restrict

_NONE: frozenset[str] = frozenset()


class GradientTransformation(NamedTuple):
    """``init(params) -> state`` and ``update(updates, state, params=None, **extras)``.

    Attributes:
        init: the initial state for a parameter dict.
        update: ``(updates, state, params=None, **extras) -> (updates, state)``.
        extras: the keyword names ``update`` accepts beside the three above.
        hyperparams: the :class:`~singd_functional.HyperParams` fields ``update``
            reads from its ``hyperparams=`` extra.
    """

    init: Callable[..., Any]
    update: Callable[..., tuple[Any, Any]]
    extras: frozenset[str] = _NONE
    hyperparams: frozenset[str] = _NONE


def unknown_extras(given, declared: frozenset[str], where: str) -> TypeError:
    """The error for extras that no transform declares, with a spelling suggestion."""
    lines = []
    for name in sorted(set(given) - declared):
        close = difflib.get_close_matches(name, sorted(declared), n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        lines.append(f"`{name}=`{hint}")
    return TypeError(
        f"{where}: unknown keyword argument {', '.join(lines)}; the transforms declare "
        f"{sorted(declared) or 'no extras'}"
    )


def require_params(params, where: str) -> None:
    """ValueError when a transform that reads the parameters got none."""
    if params is None:
        raise ValueError(
            f"{where} needs the parameters: call tx.update(updates, state, params, ...)"
        )


_warned_tracked = False


def warn_if_tracked(params) -> None:
    """Warn once when a parameter requires grad or carries a ``grad_fn``.

    Such parameters chain every step into one autograd graph (memory grows with the
    steps, and the state ends up requiring grad); the transforms are meant for plain
    tensors. One attribute read per parameter on the usual path.
    """
    global _warned_tracked
    if _warned_tracked:
        return
    for k, p in params.items():
        if p.requires_grad or p.grad_fn is not None:
            _warned_tracked = True
            warnings.warn(
                f"parameter {k!r} requires grad (or has a grad_fn): every update then joins "
                "one growing autograd graph. Pass detached tensors, e.g. "
                "`{k: v.detach() for k, v in model.named_parameters()}` (`.detach()`)",
                stacklevel=3,
            )
            return


def apply_updates(
    params: Mapping[str, Tensor], updates: Mapping[str, Tensor | None]
) -> dict[str, Tensor]:
    """``params + updates`` leaf by leaf, out of place; a missing/None update keeps the leaf."""
    out = {}
    for k, p in params.items():  # a loop: dynamo cannot read a comprehension's walrus cell
        u = updates.get(k)
        out[k] = p if u is None else p + (u if u.dtype == p.dtype else u.to(p.dtype))
    return out


def takes_labels(update: Callable) -> Callable:
    """Mark ``update`` as taking ``hyperparams={label: HyperParams}`` (a partition)."""
    update.takes_labels = True  # type: ignore[attr-defined]
    return update


def _forwarded(t: GradientTransformation, extras: dict[str, Any]) -> dict[str, Any]:
    """The extras ``t`` declares; a shared HyperParams cut to the fields ``t`` reads, and
    a mapping label -> HyperParams only to the partitions (the others keep theirs)."""
    kw = extras if t.extras.issuperset(extras) else {k: extras[k] for k in t.extras if k in extras}
    hp = kw.get("hyperparams")
    if hp is None:
        return kw
    if isinstance(hp, HyperParams):
        cut = restrict(hp, t.hyperparams)
        return kw if cut is hp else {**kw, "hyperparams": cut}
    if isinstance(hp, Mapping) and not getattr(t.update, "takes_labels", False):
        return {**kw, "hyperparams": None}
    return kw


def _check_hyperparams(hp: Any, names: frozenset[str], where: str) -> None:
    if isinstance(hp, HyperParams):
        reject_foreign(hp, tuple(i for i, f in enumerate(FIELDS) if f not in names), names)
    elif hp is not None:
        raise TypeError(
            f"{where}: hyperparams must be a sf.HyperParams (or, for a partition, a mapping "
            f"label -> HyperParams), got {type(hp).__name__}"
        )


def _union(transforms, field: str) -> frozenset[str]:
    return frozenset().union(*(getattr(t, field) for t in transforms))


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` one after the other (the state is a tuple of theirs).

    Each transform gets only the extras it declares; ``hyperparams=`` reaches every
    transform that reads a field of it (a mapping label -> HyperParams reaches the
    partitions in the chain; the other transforms keep their values).
    """
    declared = _union(transforms, "extras")
    names = _union(transforms, "hyperparams")
    labelled = any(getattr(t.update, "takes_labels", False) for t in transforms)

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None, **extras):
        if not declared.issuperset(extras):
            raise unknown_extras(extras, declared, "chain(...).update")
        hp = extras.get("hyperparams")
        if hp is not None and not (labelled and isinstance(hp, Mapping)):
            _check_hyperparams(hp, names, "chain(...).update")
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params, **_forwarded(t, extras))
            new_state.append(s)
        return updates, tuple(new_state)

    if labelled:
        takes_labels(update)
    return GradientTransformation(init, update, declared, names)


def masked(inner: GradientTransformation, keys: Iterable[str]) -> GradientTransformation:
    """Apply ``inner`` only to the entries whose key is in ``keys`` (others pass through)."""
    keys = frozenset(keys)

    def pick(tree):
        return {k: v for k, v in tree.items() if k in keys}

    def init(params):
        return inner.init(pick(params))

    def update(updates, state, params=None, **extras):
        if not inner.extras.issuperset(extras):
            raise unknown_extras(extras, inner.extras, "masked(...).update")
        sub, state = inner.update(
            pick(updates), state, None if params is None else pick(params),
            **_forwarded(inner, extras),
        )  # fmt: skip
        return {**updates, **sub}, state

    return GradientTransformation(init, update, inner.extras, inner.hyperparams)


def partition(
    transforms: Mapping[Hashable, GradientTransformation],
    labels: Mapping[str, Hashable] | Callable[[Mapping[str, Any]], Mapping[str, Hashable]],
) -> GradientTransformation:
    """Each parameter to the transform of its label (optax's ``partition``).

    Args:
        transforms: label -> transform.
        labels: parameter key -> label, or a callable of the parameter dict (and of
            the updates, at each ``update``) returning that mapping.

    The state is a dict label -> that transform's state (over its own keys only).
    ``hyperparams=`` may be one :class:`~singd_functional.HyperParams` (every
    transform reads the fields it declares: ``HyperParams(lr=0.0)`` freezes all) or a
    mapping label -> HyperParams (labels left out keep their values).
    """
    transforms = dict(transforms)
    declared = _union(transforms.values(), "extras")
    names = _union(transforms.values(), "hyperparams")

    def split(tree) -> dict[Hashable, list[str]]:
        table = labels(tree) if callable(labels) else labels
        missing = [k for k in tree if k not in table]
        unknown = sorted({repr(table[k]) for k in tree if k in table} - set(map(repr, transforms)))
        if missing or unknown:
            raise ValueError(
                f"partition: every parameter needs a label among {list(transforms)}; "
                + (f"no label for {missing}" if missing else f"unknown labels {unknown}")
            )
        keys: dict[Hashable, list[str]] = {label: [] for label in transforms}
        for k in tree:
            keys[table[k]].append(k)
        return keys

    def init(params):
        keys = split(params)
        return {
            label: t.init({k: params[k] for k in keys[label]}) for label, t in transforms.items()
        }

    def update(updates, state, params=None, **extras):
        if not declared.issuperset(extras):
            raise unknown_extras(extras, declared, "partition(...).update")
        hp = extras.get("hyperparams")
        if isinstance(hp, Mapping):
            bad = sorted(map(repr, set(hp) - set(transforms)))
            if bad:
                raise ValueError(
                    f"hyperparams for unknown labels {bad}; labels: {list(transforms)}"
                )
        elif hp is not None:
            _check_hyperparams(hp, names, "partition(...).update")
        keys = split(updates)
        out, new_state = dict(updates), {}
        for label, t in transforms.items():
            kw = extras
            if isinstance(hp, Mapping):
                kw = {**extras, "hyperparams": hp.get(label)}
            sub, new_state[label] = t.update(
                {k: updates[k] for k in keys[label]},
                state[label],
                None if params is None else {k: params[k] for k in keys[label]},
                **_forwarded(t, kw),
            )
            out.update(sub)
        return out, new_state

    return GradientTransformation(init, takes_labels(update), declared, names)


class ScheduleState(NamedTuple):
    count: Tensor  # type: ignore[assignment]  # a field named like tuple.count (optax's name)


def scale_by_schedule(schedule: Callable[[Tensor], Any]) -> GradientTransformation:
    """Multiply the updates by ``schedule(count)`` (count: 0-d int64 tensor, from 0)."""

    def init(params):
        return ScheduleState(torch.zeros((), dtype=torch.int64))

    def update(updates, state, params=None):
        factor = schedule(state.count)
        return {k: u * factor for k, u in updates.items()}, ScheduleState(state.count + 1)

    return GradientTransformation(init, update)

"""Numeric hyperparameters that every transform takes per call: ``sf.HyperParams``.

Each transform built with numeric hyperparameters reads the fields it declares
(``GradientTransformation.hyperparams``) from the ``hyperparams=`` extra of its
``update`` and falls back to the values it was built with for the fields left None::

    tx.update(grads, state, params, hyperparams=sf.HyperParams(lr=0.0))   # freezes all

Values are floats or 0-d tensors, so a schedule costs nothing (no rebuild, no
recompile) and ``torch.func.vmap`` sweeps them (:func:`~singd_functional.make_sweep`).
One ``HyperParams`` reaches every transform of a :func:`~singd_functional.chain` or
:func:`~singd_functional.partition` that declares the field; a partition also takes a
mapping ``label -> HyperParams`` to give each label its own values.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from torch import Tensor

Number = float | Tensor


class HyperParams(NamedTuple):
    """Numeric hyperparameters; each a float or a 0-d tensor (None: keep the transform's).

    Which transforms read a field (all that declare it, see the module docstring):
    ``lr`` (singd, sgd, adamw, scale_by_learning_rate), ``momentum`` (singd, sgd,
    trace), ``weight_decay`` (singd, sgd, adamw, add_decayed_weights), ``damping``,
    ``alpha1``, ``lr_cov`` (singd, scale_by_kronecker_factors), ``b1``, ``b2``, ``eps``
    (adamw), ``max_norm`` (clip_by_global_norm).
    """

    lr: Number | None = None
    momentum: Number | None = None
    damping: Number | None = None
    alpha1: Number | None = None
    weight_decay: Number | None = None
    lr_cov: Number | Callable | None = None
    b1: Number | None = None
    b2: Number | None = None
    eps: Number | None = None
    max_norm: Number | None = None


FIELDS: tuple[str, ...] = HyperParams._fields
_INDEX = {name: i for i, name in enumerate(FIELDS)}
_REALS = (int, float)


def check_values(values: Mapping[str, Any], below_one: frozenset[str] = frozenset()) -> None:
    """Each value a float or a 0-d tensor (``lr_cov`` also a callable); real numbers
    finite, >= 0, and < 1 for the names in ``below_one``.

    Tensor values are not read here (that would wait for the device); a sweep checks
    its per-member values once, at :func:`~singd_functional.make_sweep`.
    """
    for name, value in values.items():
        if isinstance(value, Tensor):
            if value.dim() != 0:
                raise ValueError(
                    f"{name} must be a float or a 0-d tensor, got shape {tuple(value.shape)} "
                    "(one value per member is for sf.make_sweep)"
                )
            continue
        if name == "lr_cov" and callable(value):
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a float or a 0-d tensor, got {value!r}")
        number = float(value)
        if number != number or number in (math.inf, -math.inf):
            raise ValueError(f"{name} must be finite, got {value}")
        if number < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
        if name in below_one and number >= 1:
            raise ValueError(f"{name} must be < 1, got {value}")


def reject_foreign(hp: HyperParams, foreign: tuple[int, ...], names: frozenset[str]) -> None:
    """TypeError when ``hp`` sets a field outside ``names`` (``foreign``: their positions).

    A plain loop over tuple positions: no Python calls on the usual path.
    """
    for i in foreign:
        if hp[i] is not None:
            given = sorted(FIELDS[j] for j in foreign if hp[j] is not None)
            raise TypeError(
                f"hyperparams sets {given}, which no transform here reads; they read "
                f"{sorted(names)}. Leave those fields None (or add a transform that uses them)"
            )


def restrict(hp: HyperParams, names: frozenset[str]) -> HyperParams:
    """``hp`` with the fields outside ``names`` set to None (``hp`` itself if none is set)."""
    for i, name in enumerate(FIELDS):
        if hp[i] is not None and name not in names:
            return hp._replace(**{other: None for other in FIELDS if other not in names})
    return hp


def reader(
    below_one: frozenset[str] = frozenset(), **defaults: Any
) -> tuple[Callable[[HyperParams | None], tuple | list], frozenset[str]]:
    """``(read, names)``: ``read(hp)`` gives the values of the fields named in
    ``defaults`` (in that order); ``names`` are those fields.

    The defaults are checked with :func:`check_values`. A field left None in ``hp``
    keeps its default; a field outside ``defaults`` that ``hp`` sets is a TypeError;
    a float that is negative, NaN or (for ``below_one``) >= 1 a ValueError.
    """
    check_values(defaults, below_one)
    names = frozenset(defaults)
    slots = tuple(enumerate(_INDEX[name] for name in defaults))
    foreign = tuple(i for i, name in enumerate(FIELDS) if name not in names)
    fallback = tuple(defaults.values())

    def read(hp: HyperParams | None) -> tuple | list:
        # plain loops over tuple positions: an update with hyperparameters costs a
        # handful of Python calls, not one per field
        if hp is None:
            return fallback
        if hp.__class__ is not HyperParams:
            raise TypeError(
                "hyperparams must be a sf.HyperParams (a mapping label -> HyperParams is "
                f"for sf.partition / singd(fallback=)), got {type(hp).__name__}"
            )
        reject_foreign(hp, foreign, names)
        out = list(fallback)
        for j, i in slots:
            value = hp[i]
            if value is not None:
                if value.__class__ in _REALS:
                    if not value >= 0 or (value >= 1 and FIELDS[i] in below_one):
                        check_values({FIELDS[i]: value}, below_one)  # raises, naming why
                elif value.__class__ is str:
                    check_values({FIELDS[i]: value})
                out[j] = value
        return out

    return read, names

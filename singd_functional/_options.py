"""The drop-in face's param-group entries (private): normalised and checked.

Every entry a user can set (in the constructor, in a param group, or later in
``opt.param_groups``) is checked here with an error that says what was wrong and what
to write instead. :func:`check_group` runs when a group is built and at every
``step`` before anything changes; it synchronises with no device (a tensor value on
an accelerator is checked where it is a host value: at construction, see
:func:`_number`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

# (entry, lower bound, bound included, upper bound or None, what it is)
_NUMBERS = (
    ("lr", 0.0, True, None, "the learning rate"),
    ("momentum", 0.0, True, 1.0, "the heavy-ball momentum (alpha2)"),
    ("damping", 0.0, True, None, "the damping (lambda)"),
    ("alpha1", 0.0, True, 1.0, "the Riemannian momentum of K and C"),
    ("weight_decay", 0.0, True, None, "the weight decay (gamma)"),
    ("lr_cov", 0.0, True, None, "the preconditioner learning rate (beta1)"),
)


_REALS = (float, int)  # (not bool: type(True) is bool)


def pair(value: Any, entry: str, what: str) -> tuple:
    """``structures`` / ``preconditioner_dtype`` as a (K, C) pair; one name means both."""
    if value is None and entry == "preconditioner_dtype":
        return (None, None)
    if isinstance(value, str) and entry == "structures":
        return (value, value)  # "dense" means ("dense", "dense")
    if isinstance(value, torch.dtype):
        raise TypeError(
            f"{entry} must be a pair (dtype of K and m_K, dtype of C and m_C), got the single "
            f"dtype {value}; write {entry}=({value}, {value})"
        )
    try:
        out = tuple(value)
    except TypeError:
        out = None
    if out is None or len(out) != 2:
        raise TypeError(f"{entry} must be a pair ({what} of K, {what} of C), got {value!r}")
    return out


def check_group(where: str, group: dict[str, Any], host_tensors: bool = False) -> None:
    """Raise (naming ``where``, e.g. "param group 1") if an entry of ``group`` is invalid."""
    check_T(where, group["T"])
    for entry, low, _, high, what in _NUMBERS:
        value = group[entry]
        if entry == "lr_cov" and callable(value):
            continue
        if entry == "alpha1" and group.get("kfac_like"):
            continue  # ignored with kfac_like (IKFAC keeps no Riemannian momenta)
        _number(where, entry, value, low, high, what, host_tensors)
    for entry, what in (("structures", "structure name"), ("preconditioner_dtype", "dtype")):
        value = group[entry]
        if not (isinstance(value, (tuple, list)) and len(value) == 2):
            raise TypeError(
                f"{where}: {entry} must be a pair ({what} of K, {what} of C), got {value!r}"
            )
    for dtype in group["preconditioner_dtype"]:
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(
                f"{where}: preconditioner_dtype must hold torch dtypes or None, got {dtype!r}"
            )


def check_T(where: str, T: Any) -> None:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(
            f"{where}: T must be a positive int (update the preconditioner every T steps), "
            f"got {T!r}; e.g. T=1 for every step or T=10"
        )


def _number(where, entry, value, low, high, what, host_tensors) -> None:
    if type(value) in _REALS:  # the usual case first, without the ABC check below
        number = float(value)
    elif isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(
                f"{where}: {entry} ({what}) must be a real number or a 0-d tensor, got a "
                f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        if value.device.type != "cpu" and not host_tensors:
            return  # reading it would wait for the device: checked at construction only
        number = float(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    else:
        hint = f"; write {entry}={value}" if isinstance(value, str) and _is_float(value) else ""
        raise TypeError(
            f"{where}: {entry} ({what}) must be a real number or a 0-d tensor, got "
            f"{type(value).__name__} {value!r}{hint}"
        )
    if not math.isfinite(number):
        raise ValueError(f"{where}: {entry} ({what}) must be finite, got {number}")
    if number < low:
        raise ValueError(f"{where}: {entry} ({what}) must be >= {low:g}, got {number:g}")
    if high is not None and number >= high:
        raise ValueError(
            f"{where}: {entry} ({what}) must be < {high:g} (a factor that keeps a fraction of "
            f"the past), got {number:g}; typical values are 0.9 for momentum, 0.5 for alpha1"
        )


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_init_grad_scale(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(f"init_grad_scale must be a positive number, got {value!r}")
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(
            f"init_grad_scale must be a finite number > 0 (the loss scale expected in the "
            f"first backward pass: 1.0 without GradScaler, its init_scale with one), got {number}"
        )
    return number


def check_compile(value: Any) -> bool:
    """``compile``: a bool (the drop-in's own per-layer functions compiled, or not)."""
    if not isinstance(value, bool):
        raise TypeError(
            f"compile must be True (compile SINGD's per-layer functions with torch.compile; "
            f"docs/compile.md) or False (eager, the default), got {value!r}"
        )
    return value

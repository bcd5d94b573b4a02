"""``SINGD(compile=True)``: the per-layer functions of a step, compiled (private).

The optimizer's own small functions are compiled, not the user's model (heavyball's
approach): per layer, the factor update (:func:`~singd_functional.factors.update_factors`
and the cached products) and the preconditioned direction (G = [grad W | grad b],
C C^T G K K^T, split back into W's and b's shapes). ``transform.singd`` asks its
``kernels`` argument for each of them once per layer with a key that names everything
the function depends on (the layer's shapes and kind, the structures, the static
options); :class:`Kernels` answers with one compiled function per key, so layers of
one signature share one graph, and a transform rebuilt for another set of active
layers finds the graphs compiled before.

Each key's function gets its own code object (dynamo keeps at most 8 graphs per code
object, and checks the guards of all of them on a call); hyperparameters that are
Python numbers enter as 0-d float64 tensors (a float would be a constant to dynamo,
and every new value of an ``lr_cov`` schedule a recompile). If compiling or running a
compiled function fails, this optimizer warns once with the reason and runs eager
from then on (an eager call gives the numbers the compiled one would have given).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import torch

from .sweep import _own_code

# torch.compile's settings for every kernel: one graph each, shapes fixed per key.
_OPTIONS: dict[str, Any] = dict(fullgraph=True, dynamic=False)


class Kernels:
    """One optimizer's compiled per-layer functions, one per key (see the module doc).

    Call it as ``kernels(key, fn)``: returns a callable with ``fn``'s arguments. ``fn``
    must depend on nothing outside ``key`` (the first ``fn`` given for a key is the one
    compiled). ``backend`` is torch.compile's, read when a key is first seen (the
    tests set ``"eager"``, dynamo without inductor, or a failing one).
    """

    def __init__(self, backend: Any = "inductor"):
        self.backend = backend
        self.failure: str | None = None  # why this optimizer runs eager, once it does
        self._table: dict[Hashable, _Kernel] = {}

    def __call__(self, key: Hashable, fn: Callable) -> Callable:
        kernel = self._table.get(key)
        if kernel is None:
            kernel = self._table[key] = _Kernel(self, key, fn)
        return kernel

    def __len__(self) -> int:
        return len(self._table)

    def fail(self, key: Hashable, error: BaseException) -> None:
        """Run eager from now on; warn the first time, naming the reason."""
        if self.failure is not None:
            return
        self.failure = _reason(error)
        warnings.warn(
            f"SINGD(compile=True): compiling the step's {_describe(key)} failed "
            f"({self.failure}); this optimizer runs eager from now on (same numbers, "
            "no compiled speed-up). Build it with compile=False to silence this",
            stacklevel=2,  # the frames above are the step's and dynamo's: none is the user's
        )


class _Kernel:
    """One key's function: compiled on its first call, eager once its optimizer failed."""

    def __init__(self, owner: Kernels, key: Hashable, fn: Callable):
        self.owner, self.key, self.eager = owner, key, fn
        self.compiled: Callable | None = None
        if owner.failure is not None:
            return
        name = f"singd_kernel_{len(owner)}_{getattr(fn, '__name__', 'fn')}"
        try:  # torch.compile itself refuses some platforms and Python versions
            self.compiled = torch.compile(_own_code(_copy_function(fn), name),
                                          backend=owner.backend, **_OPTIONS)
        except Exception as error:  # noqa: BLE001 (any failure: warn and run eager)
            owner.fail(key, error)

    def __call__(self, *args: Any) -> Any:
        if self.compiled is not None and self.owner.failure is None:
            try:
                return self.compiled(*(_as_tensor(a) for a in args))
            except Exception as error:  # noqa: BLE001 (any failure: warn and run eager)
                self.owner.fail(self.key, error)
        return self.eager(*args)


def _as_tensor(value: Any) -> Any:
    """A Python number as a 0-d float64 tensor (dynamo then traces it as an input)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    return value


def _copy_function(fn: Callable) -> Callable:
    """A new function object over ``fn``'s code (``_own_code`` renames it in place)."""
    import types

    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def _reason(error: BaseException) -> str:
    """The first line of ``error`` and of the errors it was raised from (dynamo wraps a
    backend's error in BackendCompilerFailed, whose own first line names only the
    backend)."""
    lines: list[str] = []
    cause: BaseException | None = error
    while cause is not None and len(lines) < 4:
        first = (str(cause).strip().splitlines() or [""])[0].strip()
        lines.append(f"{type(cause).__name__}: {first}"[:300])
        cause = cause.__cause__ or getattr(cause, "inner_exception", None)
    return " <- ".join(lines)


def _describe(key: Hashable) -> str:
    """What a kernel key names, for the warning (its first entry is the function)."""
    return str(key[0]) if isinstance(key, tuple) and key else repr(key)

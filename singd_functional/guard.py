"""A guard over any transform: a step whose numbers are not finite changes nothing.

:func:`skip_nonfinite` wraps a :class:`~singd_functional.GradientTransformation`. It
runs the wrapped update, then looks at what that update produced: the updates and
every state leaf the update changed. For SINGD those carry every input that matters,
since NaN and inf propagate through each stage: a non-finite gradient reaches the
heavy-ball buffer and the updates, a non-finite Kronecker statistic (a NaN in one
input row, an activation of 1e25 whose square overflows float32) reaches K and C.
If any of them is not finite, the old state is kept and the updates are zero.

Everything is decided on the device: one finiteness check over all those tensors
(:func:`all_finite`), and ``torch.where`` per changed leaf, which selects exactly (no
``0 * NaN``). Nothing is read back to the host, so a GPU step does not stall, and
``vmap`` / ``torch.compile`` see plain tensor ops. Leaves the wrapped update returned
unchanged (the same tensor object: K and C on a step without statistics) are neither
checked nor selected.

The step counter of the wrapped state is a changed leaf like the others, so a skipped
step does not advance it (the transform behaves as if the step never happened). The
guard's own state counts the skips.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from ._pytree import PYTREE_NAMESPACE
from .combine import GradientTransformation, unknown_extras


class SkipNonfiniteState(NamedTuple):
    """State of :func:`skip_nonfinite`.

    Attributes:
        inner: the wrapped transform's state.
        skipped: 0-d bool tensor, True when the last update was skipped.
        skipped_steps: 0-d int64 tensor, how many updates were skipped so far.
    """

    inner: Any
    skipped: Tensor
    skipped_steps: Tensor


def all_finite(tensors: Iterable[Tensor], device: torch.device | None = None) -> Tensor:
    """0-d bool tensor: every entry of every tensor is finite (no host synchronisation).

    The check is the sum of each tensor, in at least float32 (a float16 sum cannot
    overflow the check), stacked and tested once: a NaN or an inf anywhere makes its
    sum NaN or inf (inf + -inf is NaN; nothing brings a sum back to finite). The one
    false alarm is a finite tensor whose sum overflows the accumulation dtype
    (|sum| > 3e38 in float32), i.e. values no training survives anyway. Measured on
    the CPU (benchmarks/guard_bench.py): a sum costs half a multiply, where
    ``_foreach_norm`` with ord=inf or ``isfinite().all()`` cost 15-25 multiplies.
    Integer and empty tensors are finite.
    """
    sums: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        _add_sum(sums, t)
    return _all_sums_finite(sums, device)


def all_finite_cleaned_(tensors: Iterable[Tensor], device: torch.device | None = None) -> Tensor:
    """:func:`all_finite`, and then each tensor made finite in place (``nan_to_num_``).

    Tensor by tensor, so that the second pass finds the tensor in cache (measured on
    the CPU: the check of a tensor written just before costs a third of one of cold
    gradients). A finite tensor is unchanged.
    """
    sums: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        _add_sum(sums, t)
        torch.nan_to_num_(t)
    return _all_sums_finite(sums, device)


def _add_sum(sums: dict, t: Tensor) -> None:
    if t.is_floating_point() and t.numel():
        acc = torch.promote_types(t.dtype, torch.float32)
        sums.setdefault((t.device, acc), []).append(t.sum(dtype=acc))


def _all_sums_finite(sums: dict, device: torch.device | None) -> Tensor:
    flags = [_finite(torch.stack(s)) for s in sums.values()]
    if not flags:
        return torch.ones((), dtype=torch.bool, device=device)
    target = device if device is not None else flags[0].device
    ok = flags[0].to(target, non_blocking=True)
    for f in flags[1:]:
        ok = ok & f.to(target, non_blocking=True)
    return ok


def every(flags: Iterable[Tensor | None]) -> Tensor | None:
    """The 0-d bool ``flags`` and-ed, on the first one's device; a None is True (and all
    None give None: nothing to check)."""
    ok = None
    for f in flags:
        if f is not None:
            ok = f if ok is None else ok & f.to(ok.device, non_blocking=True)
    return ok


def _finite(v: Tensor) -> Tensor:
    # v - v is 0 exactly where v is finite (inf - inf and NaN are NaN): two ops where
    # isfinite() takes four
    return ((v - v) == 0).all()


def _leaves(tree: Any) -> list:
    return optree.tree_leaves(tree, namespace=PYTREE_NAMESPACE)  # through our structures


def changed_leaves(new: Any, old: Any) -> list[tuple[Tensor, Tensor]]:
    """``(new, old)`` leaf pairs of two same-shaped pytrees that are not the same object."""
    new_leaves, old_leaves = _leaves(new), _leaves(old)
    return [
        (n, o) for n, o in zip(new_leaves, old_leaves)
        if isinstance(n, Tensor) and n is not o
    ]


def select(ok: Tensor, new: Any, old: Any, into_new: bool = False) -> Any:
    """Leaf by leaf ``new`` where ``ok`` (0-d bool) else ``old``; shared leaves pass as they are.

    ``into_new``: the selection is written into ``new``'s leaves where that is exact (the
    caller owns them: e.g. the drop-in's factors made this step), which saves a second
    copy of them (for dense factors, four d x d matrices per layer at a statistics
    step's peak), and ``new`` itself is returned (no tree is rebuilt): big leaves on
    their bits (``_select_bits_``), small ones with ``torch.where(..., out=)``. Where a
    leaf shares storage with its old one, is not a contiguous float, or not of its old
    one's shape and dtype, every leaf is selected out of place.
    """
    gates: dict[torch.dtype, tuple[Tensor, Tensor]] = {}
    if into_new:
        new_leaves, new_spec = optree.tree_flatten(new, namespace=PYTREE_NAMESPACE)
        old_leaves, old_spec = optree.tree_flatten(old, namespace=PYTREE_NAMESPACE)
        pairs = [(n, o) for n, o in zip(new_leaves, old_leaves)
                 if isinstance(n, Tensor) and n is not o]
        if new_spec == old_spec and all(_writable(n, o) for n, o in pairs):
            for n, o in pairs:  # all in place: ``new`` itself is the selection
                if n.numel() >= _BITS_FROM and n.element_size() in _BITS:
                    _select_bits_(ok, n, o, gates)
                else:
                    torch.where(ok, n, o, out=n)
            return new

    def pick(n, o):
        if n is o or not isinstance(n, Tensor):
            return n
        return torch.where(ok, n, o)

    return optree.tree_map(pick, new, old, namespace=PYTREE_NAMESPACE)


def _writable(n: Tensor, o: Tensor) -> bool:
    return (isinstance(o, Tensor) and n.is_floating_point() and n.is_contiguous()
            and n.shape == o.shape and n.dtype == o.dtype
            and n.untyped_storage().data_ptr() != o.untyped_storage().data_ptr())


# same-size integer dtypes: a float's bits times 1 or 0 are its bits or +0.0, whatever it holds
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_BITS_FROM = 1 << 14  # entries; below, one torch.where costs less than the four ops


def _select_bits_(ok: Tensor, new: Tensor, old: Tensor, gates: dict) -> Tensor:
    """``new`` where ``ok`` else ``old``, written into ``new``: its bits times ok plus
    ``old``'s times not ok, in integers, so exact whatever either holds (NaN, inf, -0.0).
    Measured on the CPU: a fifth of ``torch.where(ok, new, old, out=new)``, whose kernel
    is not vectorised. ``gates`` caches ok and not ok per integer dtype."""
    bits = _BITS[new.element_size()]
    if bits not in gates:
        gates[bits] = (ok.to(bits), (~ok).to(bits))
    keep, drop = gates[bits]
    new.view(bits).mul_(keep).addcmul_(old.view(bits), drop)
    return new


def skip_nonfinite(tx: GradientTransformation) -> GradientTransformation:
    """Wrap ``tx`` so that an update with a non-finite result changes nothing.

    ``update(updates, state, params, **extras)`` runs ``tx.update`` with the same
    arguments; it declares ``tx``'s extras and hyperparameters (so it composes in
    ``chain`` and ``partition`` like ``tx``) and refuses others. When its updates or
    the state leaves it changed hold a NaN or an inf, the returned updates are zeros
    and the inner state is the old one (counter included); ``state.skipped`` says so
    and ``state.skipped_steps`` counts it.
    Decided on the device (module docstring), so no step waits for the host.
    """

    def init(params):
        inner = tx.init(params)
        leaves = [t for t in _leaves(params) if isinstance(t, Tensor)]
        device = leaves[0].device if leaves else None
        return SkipNonfiniteState(
            inner,
            torch.zeros((), dtype=torch.bool, device=device),
            torch.zeros((), dtype=torch.int64, device=device),
        )

    def update(updates, state: SkipNonfiniteState, params=None, **extras):
        if set(extras) - tx.extras:
            raise unknown_extras(extras, tx.extras, "skip_nonfinite(tx).update")
        new_updates, new_inner = tx.update(updates, state.inner, params, **extras)
        changed = changed_leaves(new_inner, state.inner)
        ok = all_finite(
            [*_leaves(new_updates), *(n for n, _ in changed)],
            device=state.skipped.device,
        )
        safe_updates = optree.tree_map(lambda u: zero_where_not(ok, u), new_updates,
                                      namespace=PYTREE_NAMESPACE)
        skipped = ~ok
        return safe_updates, SkipNonfiniteState(
            select(ok, new_inner, state.inner), skipped, state.skipped_steps + skipped
        )

    # the same extras and hyperparameters as the wrapped transform (combine.py's contract)
    return GradientTransformation(init, update, tx.extras, tx.hyperparams)


def zero_where_not(ok: Tensor, t: Tensor) -> Tensor:
    """``t`` where ``ok`` else zeros, exactly and NaN-safe, in two cheap passes.

    ``nan_to_num`` makes every entry finite (an entry of a tensor ``ok`` accepts is
    finite already, so it is unchanged) and a finite entry times 0 or 1 is exactly 0 or
    itself. On the CPU this costs about a third of ``torch.where(ok, t, 0)``.
    """
    return torch.nan_to_num(t).mul_(ok.to(t.dtype))


def zero_where_not_(ok: Tensor, t: Tensor) -> Tensor:
    """:func:`zero_where_not` in place (no allocation: a fresh tensor of a big parameter's
    size costs its page faults, about twice the two passes, measured on the CPU); a
    float's bits times ok in integers (``_select_bits_``), one pass."""
    if t.is_floating_point() and t.element_size() in _BITS and t.is_contiguous():
        bits = _BITS[t.element_size()]
        t.view(bits).mul_(ok.to(bits))
        return t
    return torch.nan_to_num_(t).mul_(ok.to(t.dtype))


class SkipCounter:
    """The drop-in face's count of skipped steps, kept on the device, warned about once.

    :meth:`add` is a device op. The count reaches the host without waiting for the
    device: on a GPU it is copied into pinned host memory behind a recorded event at
    every step, and :meth:`warn_once` (at the start of the next step) reads that copy
    only once the event has completed; on the CPU the count already is host memory.
    So the warning comes one step late, and no step ever waits for the device.
    """

    def __init__(self):
        self.count: Tensor | None = None
        self._host: Tensor | None = None
        self._event = None
        self._warned = False

    def add(self, skipped: Tensor) -> None:
        if self.count is None or self.count.device != skipped.device:
            self.count = torch.zeros((), dtype=torch.int64, device=skipped.device)
        self.count.add_(skipped)  # (bool into int64)
        if self._warned:
            return
        if self.count.device.type == "cuda":
            if self._host is None:
                self._host = torch.zeros((), dtype=torch.int64).pin_memory()
            self._host.copy_(self.count, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        elif self.count.device.type == "cpu":
            self._host, self._event = self.count, None
        # other devices: counted, read by the user through opt.skipped_steps

    def warn_once(self) -> None:
        if self._warned or self._host is None:
            return
        if self._event is not None and not self._event.query():
            return  # not there yet; look again next step
        # host memory only: numpy() refuses device tensors, so this cannot wait for one
        seen = int(self._host.numpy())
        if seen:
            self._warned = True
            warnings.warn(
                f"SINGD skipped {seen} step(s) whose gradients or Kronecker statistics were "
                "not finite (NaN or inf): parameters, factors and momenta were left as they "
                "were. opt.skipped_steps counts them (a device tensor). Shown once.",
                RuntimeWarning,
                stacklevel=5,
            )

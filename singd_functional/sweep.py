"""Hyperparameter sweeps: N configurations trained in ONE ``torch.func.vmap``-ed step.

:func:`make_step` is one run's whole training step (``capture`` + ``tx.update`` +
``apply_updates``, with and without the factor update); :func:`make_sweep` maps it over
a leading member axis of size N. Per member: the numeric hyperparameters (``lr``,
``momentum``, ``damping``, ``alpha1``, ``weight_decay``, ``lr_cov``), the parameters
(e.g. one seed each) and optionally the batch. Shared by all members (static): the
model, the structures, ``T`` and every other argument of
:func:`~singd_functional.singd`. Each member's numbers are those of its own run of
:func:`make_step`; no formula is reimplemented here.

Recipe::

    import torch, singd_functional as sf

    layers = sf.find_layers(model)
    capture = sf.make_capture(model, loss_fn, layers)
    tx = sf.singd(layers, structures=("dense", "dense"))   # defaults for what is not swept
    hp = sf.grid(lr=[1e-3, 3e-3, 1e-2, 3e-2], damping=[1e-4, 1e-3])   # N = 8 members

    sweep = sf.make_sweep(tx, capture, hp)
    # one seed per member (else init(params) copies one set of parameters N times):
    models = [make_model(seed) for seed in range(8)]
    params, _ = torch.func.stack_module_state(models)
    state = sweep.init(params, stacked=True)

    T = 10
    for t, (x, y) in enumerate(loader):
        step = sweep.step if t % T == 0 else sweep.plain_step   # with / without statistics
        state, loss = step(state, x, y)       # loss: [N], one entry per member
    state.diverged                            # [N] bool: members that were stopped
    state.params                              # every leaf [N, ...]

    # or, all at once: state, losses = sweep.run(state, batches, T=10)  # losses [steps, N]
    # compiled (one graph per step function; new hyperparameter values do not recompile):
    # sweep = sweep.compile(fullgraph=True)
    # a schedule: state = state._replace(hyperparams={"lr": new_lrs, ...})

Batches are shared by default; ``batch_axis=0`` takes every batch tensor with a leading
member axis (``x`` [N, B, ...]), and a tuple gives the axis per batch entry (e.g.
``(None, 0)``: shared inputs, per-member targets).

Divergence: after each step, a member whose loss, new parameters or changed state
hold a NaN or inf (one sum per tensor; a sum beyond the dtype's range counts too) is
stopped: ``torch.where`` on its finite flag keeps its previous parameters and state (no
Python branch on tensor values), it stays stopped, its later losses read NaN and
``state.diverged`` marks it. The others go on unchanged: a member's numbers never
depend on another's. Under ``torch.compile`` the mask sits inside the vmapped function
(inductor fuses it into the step's kernels); eagerly it is applied after ``vmap`` on
the stacked tensors, which costs a few ops per changed tensor instead of batched ops,
and on the CPU it is skipped when every member is finite and running (the flag is
read without a device sync there; on a GPU the `where` ops stay, so that the host never
waits for the device).

Cost and memory: the vmapped step runs each operation of the core once for all
members, so it saves the per-operation overhead (Python, dispatch) of N - 1 runs but
none of the arithmetic; the speed-up over N sequential runs is largest when that
overhead dominates (small layers, plain steps) and tends to sequential cost /
arithmetic cost as N grows (``benchmarks/sweep_bench.py`` measures it: on a GPU, where
sequential runs wait on kernel launches, 8 members ran 3.6x faster than 8 runs and 32
members 13.7x; on a 2-core CPU, where the matrix products dominate, 1.3x and 1.8x, against
runs whose capture differentiates with plain autograd while the vmapped one needs
``torch.func.grad``; it was 2.0x and 2.8x against runs with ``torch.func.grad``). Every member
holds its own parameters, velocity and factors (K, C, m_K, m_C per layer), and the
step holds every member's activations at once; ``chunk_size`` (passed to
``torch.func.vmap``) runs the members in groups to bound that, at some speed.
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, cast

import optree
import torch
import torch.utils._pytree as torch_pytree
from torch import Tensor

from ._pytree import PYTREE_NAMESPACE
from .combine import GradientTransformation, apply_updates
from .hyperparams import HyperParams

_FIELDS = HyperParams._fields


def _tree_leaves(tree: Any) -> list:
    # optree is C++ and several times faster eagerly; dynamo traces only
    # torch.utils._pytree. Our containers are registered with both.
    if torch.compiler.is_compiling():
        return torch_pytree.tree_leaves(tree)
    return optree.tree_leaves(tree, none_is_leaf=True, namespace=PYTREE_NAMESPACE)


def _tree_map(fn: Callable, tree: Any, *rest: Any) -> Any:
    if torch.compiler.is_compiling():
        return torch_pytree.tree_map(fn, tree, *rest)
    return optree.tree_map(fn, tree, *rest, none_is_leaf=True, namespace=PYTREE_NAMESPACE)


class SweepState(NamedTuple):
    """The state of N runs; every tensor carries the member axis first.

    Attributes:
        params: parameter dict, each leaf [N, ...].
        opt_state: the transform's state for every member, each leaf [N, ...].
        hyperparams: the per-member hyperparameters, name -> [N] tensor (per label,
            ``{label: {name: [N]}}``, when the sweep was given a mapping; values may
            be changed between steps, e.g. a schedule, with ``state._replace``).
        diverged: [N] bool; True for a member stopped after a non-finite step.
    """

    params: dict[str, Tensor]
    opt_state: Any
    hyperparams: dict[str, Any]
    diverged: Tensor


def grid(dtype: torch.dtype = torch.float64, **axes: Sequence[float] | Tensor) -> HyperParams:
    """The Cartesian product of hyperparameter values, as flat per-member tensors.

    ``grid(lr=[1e-3, 1e-2], damping=[1e-4, 1e-3, 1e-2])`` has 6 members; the last
    axis varies fastest (``itertools.product`` order), so member ``i`` has
    ``lr = lr_values[i // 3]``, ``damping = damping_values[i % 3]``.

    Args:
        dtype: dtype of the returned tensors (float64 keeps the given decimals; an
            operation with float32 tensors still computes in float32).
        **axes: hyperparameter name -> 1-D values. Names: those of
            :class:`~singd_functional.HyperParams`.

    Returns:
        :class:`~singd_functional.HyperParams` whose given fields are 1-D tensors of
        length ``prod(len(values))`` and whose other fields are None.
    """
    unknown = sorted(set(axes) - set(_FIELDS))
    if unknown:
        raise ValueError(f"grid: unknown hyperparameters {unknown}; valid names: {list(_FIELDS)}")
    if not axes:
        raise ValueError("grid: give at least one axis, e.g. grid(lr=[1e-3, 1e-2])")
    values = {}
    for name, vals in axes.items():
        t = torch.as_tensor(vals, dtype=dtype)
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(
                f"grid: {name} must be a non-empty 1-D sequence, got shape {tuple(t.shape)}"
            )
        values[name] = t
    index = list(itertools.product(*(range(len(v)) for v in values.values())))
    cols = list(zip(*index))
    return HyperParams(**{n: v[list(c)] for (n, v), c in zip(values.items(), cols)})


def _split_hyperparams(hyperparams: HyperParams | Mapping[str, HyperParams] | None):
    """(per-member name -> [N] tensor, shared name -> value, N or None).

    For a mapping label -> HyperParams (a partition, ``singd(fallback=)``): both dicts
    are per label, ``{label: {name: ...}}``.
    """
    if hyperparams is None:
        return {}, {}, None
    if isinstance(hyperparams, Mapping):
        parts = {label: _split_one(hp, f"{label}.") for label, hp in hyperparams.items()}
        member = {label: m for label, (m, _, _) in parts.items() if m}
        shared = {label: sh for label, (_, sh, _) in parts.items()}
        sizes = {label: n for label, (_, _, n) in parts.items() if n is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"per-member hyperparameters must have one length N, got {sizes}")
        return member, shared, (next(iter(sizes.values())) if sizes else None)
    return _split_one(hyperparams, "")


def _split_one(hyperparams: HyperParams, prefix: str):
    if not isinstance(hyperparams, HyperParams):
        raise TypeError(
            "hyperparams must be a sf.HyperParams (e.g. sf.grid(lr=[...])) or a mapping "
            f"label -> HyperParams, got {type(hyperparams).__name__}"
        )
    member, shared = {}, {}
    for name, value in hyperparams._asdict().items():
        if value is None:
            continue
        if isinstance(value, Tensor) and value.dim() == 1:
            if value.is_floating_point() and bool((value < 0).any()):
                raise ValueError(
                    f"{prefix}{name} must be >= 0 for every member, got {value.tolist()}"
                )
            member[name] = value
        elif isinstance(value, Tensor) and value.dim() > 1:
            raise ValueError(
                f"{prefix}{name}: give one value per member (a 1-D tensor), got shape "
                f"{tuple(value.shape)}"
            )
        else:
            shared[name] = value  # a float, a 0-d tensor or an lr_cov schedule
    sizes = {prefix + name: v.shape[0] for name, v in member.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"per-member hyperparameters must have one length N, got {sizes}")
    return member, shared, (next(iter(sizes.values())) if sizes else None)


def _changed(new: Any, old: Any) -> list[Tensor]:
    """The floating tensors of ``new`` that are not the very objects of ``old``.

    The plain step returns the factors it did not touch as they came in; they need
    neither a check nor a mask.
    """
    olds = _tree_leaves(old)
    return [
        n
        for n, o in zip(_tree_leaves(new), olds)
        if isinstance(n, Tensor) and n.is_floating_point() and n is not o
    ]


def _sum_is_finite(sums: list[Tensor], dim: int | None = None) -> Tensor:
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in sums])
    stacked = torch.stack([t.to(dtype) for t in sums])
    return torch.isfinite(stacked.sum() if dim is None else stacked.sum(dim))


def _all_finite(tensors: list[Tensor]) -> Tensor:
    """One 0-d bool: no NaN or inf in ``tensors``.

    One sum per tensor (a NaN or inf makes it non-finite) and one over those: few
    ops, no boolean temporaries. A sum beyond the dtype's range also reads as
    non-finite, so a member whose values reach ~1e38 (float32) counts as diverged.
    """
    return _sum_is_finite([t.sum() for t in tensors])


def _finite_members(tensors: list[Tensor]) -> Tensor:
    """[N] bool: member i has no NaN or inf in any ``t[i]`` (tensors [N, ...]).

    As :func:`_all_finite`, on the stacked tensors outside vmap.
    """
    sums = [t.sum(tuple(range(1, t.dim()))) if t.dim() > 1 else t for t in tensors]
    return _sum_is_finite(sums, 0)


def _where_members(ok: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new[i]`` where ``ok[i]`` else ``old[i]``, for tensors [N, ...]."""
    return torch.where(ok.view(-1, *([1] * (new.dim() - 1))), new, old)


def _contiguous(x: Any) -> Any:
    return x.contiguous() if isinstance(x, Tensor) else x


def _keep_where(ok: Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``ok`` else ``old``, leaf by leaf (leaves that are the same object,
    or not tensors, are passed through)."""
    return _tree_map(
        lambda n, o: torch.where(ok, n, o) if isinstance(n, Tensor) and n is not o else n,
        new,
        old,
    )


def _own_code(fn: Callable, name: str) -> Callable:
    """``fn`` with a code object of its own, named ``name``.

    Dynamo keys its compiled graphs on the code object and allows 8 per code object:
    closures made by one factory would share that budget (and each other's guards) and
    fall back to eager after a few instances. One code object per function avoids it.
    """
    code = fn.__code__.replace(co_name=name)
    if sys.version_info >= (3, 11):
        code = code.replace(co_qualname=name)
    fn.__code__ = code
    fn.__name__ = fn.__qualname__ = name
    return fn


class Step(NamedTuple):
    """The training step of one run, as two functions (see :func:`make_step`).

    Attributes:
        step: ``step(params, state, *inputs, targets, hyperparams=None) -> (params,
            state, loss)``: capture, factor update, preconditioned step, apply.
        plain_step: the same without the factor update (no layer data recorded).
    """

    step: Callable[..., tuple[dict[str, Tensor], Any, Tensor]]
    plain_step: Callable[..., tuple[dict[str, Tensor], Any, Tensor]]


def make_step(tx: GradientTransformation, capture: Callable[..., Any]) -> Step:
    """One run's whole training step (capture + ``tx.update`` + ``apply_updates``).

    Pure functions, ready for ``torch.compile(fullgraph=True)`` (with the traced
    capture, see :mod:`singd_functional.capture`)::

        step, plain_step = (torch.compile(f, fullgraph=True) for f in sf.make_step(tx, capture))
        for t, (x, y) in enumerate(loader):
            hp = sf.HyperParams(lr=torch.tensor(schedule(t)))   # tensors: no recompile
            f = step if t % T == 0 else plain_step
            params, state, loss = f(params, state, x, y, hyperparams=hp)

    Compiled, the returned parameters and state are contiguous, as ``tx.init`` makes
    them: dynamo guards on strides, so the two functions stay two graphs.
    :func:`make_sweep` maps these functions over the members.
    """

    def make(with_statistics: bool):
        def step(params, state, *batch, hyperparams=None):
            loss, grads, captures = capture(params, *batch, record_layers=with_statistics)
            updates, state = tx.update(
                grads,
                state,
                params,
                captures=captures if with_statistics else None,
                hyperparams=hyperparams,
            )
            params = apply_updates(params, updates)
            if torch.compiler.is_compiling():
                params, state = _tree_map(_contiguous, (params, state))
            return params, state, loss

        return _own_code(step, "step" if with_statistics else "plain_step")

    return Step(make(True), make(False))


class Sweep(NamedTuple):
    """N runs in one vmapped step; see the module docstring for the recipe.

    Attributes:
        init: ``init(params, *, stacked=False) -> SweepState``. ``params`` is one
            parameter dict (copied to every member) or, with ``stacked=True``, one
            whose leaves have a leading member axis (``torch.func.stack_module_state``).
        step: ``step(state, *inputs, targets) -> (state, loss [N])`` with the
            preconditioner (statistics) update.
        plain_step: the same without it (the steps between two of every ``T``).
    """

    init: Callable[..., SweepState]
    step: Callable[..., tuple[SweepState, Tensor]]
    plain_step: Callable[..., tuple[SweepState, Tensor]]

    def run(
        self, state: SweepState, batches: Iterable[Sequence[Any]], T: int = 1, start: int = 0
    ) -> tuple[SweepState, Tensor]:
        """Train on ``batches`` (each ``(*inputs, targets)``); statistics every ``T`` steps.

        Step ``t`` (counted from ``start``) uses :attr:`step` when ``t % T == 0`` and
        :attr:`plain_step` otherwise. Returns the final state and the loss curves
        ``[steps, N]``.
        """
        if T < 1:
            raise ValueError(f"T must be a positive integer, got {T}")
        losses = []
        for t, batch in enumerate(batches, start):
            fn = self.step if t % T == 0 else self.plain_step
            state, loss = fn(state, *batch)
            losses.append(loss)
        if not losses:
            raise ValueError("run: `batches` was empty")
        return state, torch.stack(losses)

    def compile(self, **kwargs: Any) -> Sweep:
        """This sweep with ``step`` and ``plain_step`` wrapped by ``torch.compile(**kwargs)``.

        One graph each (with a traceable model: see :mod:`singd_functional.capture`);
        hyperparameter values are tensors in the state, so changing them does not
        recompile.
        """
        return self._replace(
            step=torch.compile(self.step, **kwargs),
            plain_step=torch.compile(self.plain_step, **kwargs),
        )


def make_sweep(
    tx: GradientTransformation,
    capture: Callable[..., Any],
    hyperparams: HyperParams | Mapping[str, HyperParams] | None = None,
    *,
    num_members: int | None = None,
    batch_axis: int | None | tuple[int | None, ...] = None,
    randomness: str = "error",
    chunk_size: int | None = None,
) -> Sweep:
    """Train N configurations of ``tx`` in one ``torch.func.vmap``-ed step.

    Args:
        tx: the transform (e.g. :func:`~singd_functional.singd`); its arguments are
            shared by all members and its numeric defaults apply to every
            hyperparameter not given here.
        capture: from :func:`~singd_functional.make_capture` (the plain step calls
            it with ``record_layers=False``).
        hyperparams: per field, a 1-D tensor of N values (one per member), or a
            float / 0-d tensor / ``lr_cov`` schedule shared by all. :func:`grid`
            builds the product of value lists. One HyperParams reaches every
            transform of ``tx`` that reads the field (the ``fallback``'s too); a
            mapping label -> HyperParams (e.g. ``{"singd": g, "fallback":
            g._replace(lr=g.lr / 10)}``) gives each part of a partition its own, and
            ``state.hyperparams`` is then per label. ``alpha1`` can be swept only if ``tx``
            keeps Riemannian momenta (built with ``alpha1 > 0``, not ``kfac_like``).
        num_members: N, when no hyperparameter varies (members differ by their
            initial parameters only); else taken from ``hyperparams``.
        batch_axis: ``None``: every member sees the same batch; ``0``: every batch
            tensor has a leading member axis; or one entry per batch element
            (inputs..., targets).
        randomness: ``torch.func.vmap``'s: ``"error"`` (default), ``"different"`` or
            ``"same"``; needed for models with dropout.
        chunk_size: run the members in groups of this size (less memory, slower).

    Returns:
        A :class:`Sweep` ``(init, step, plain_step)`` (plus ``run`` and ``compile``).
    """
    member_hp, shared_hp, n_hp = _split_hyperparams(hyperparams)
    labelled = isinstance(hyperparams, Mapping)
    if n_hp is not None and num_members is not None and n_hp != num_members:
        raise ValueError(f"num_members={num_members} but the hyperparameters have {n_hp} values")
    size = n_hp if n_hp is not None else num_members

    def init(params: Mapping[str, Tensor], *, stacked: bool = False) -> SweepState:
        params = {k: v.detach() for k, v in params.items()}
        if stacked:
            sizes = {v.shape[0] if v.dim() else None for v in params.values()}
            if len(sizes) != 1 or None in sizes:
                raise ValueError(
                    "stacked=True: every parameter needs the same leading member axis, "
                    f"got leading sizes {sorted(map(str, sizes))}"
                )
            (n,) = (s for s in sizes if s is not None)
            if size is not None and n != size:
                raise ValueError(
                    f"the stacked parameters have {n} members, the hyperparameters {size}"
                )
            params = {k: v.clone() for k, v in params.items()}
        else:
            if size is None:
                raise ValueError(
                    "nothing varies across members: give per-member hyperparameters "
                    "(1-D tensors), or num_members= with stacked parameters"
                )
            n = size
            params = {k: v.unsqueeze(0).expand(n, *v.shape).clone() for k, v in params.items()}
        opt_state = optree.tree_map(
            _contiguous, torch.func.vmap(tx.init)(params), namespace=PYTREE_NAMESPACE
        )
        ref = next(iter(params.values()))
        hp = _tree_map(lambda v: v.to(ref.device), member_hp)
        diverged = torch.zeros(n, dtype=torch.bool, device=ref.device)
        return SweepState(params, opt_state, hp, diverged)

    single = make_step(tx, capture)

    def member_step(params, opt_state, hp, *batch, with_statistics: bool):
        """One member's step of the core (no masking)."""
        fn = single.step if with_statistics else single.plain_step
        given: HyperParams | dict[str, HyperParams]
        if labelled:
            given = {
                label: HyperParams(**sh, **hp.get(label, {})) for label, sh in shared_hp.items()
            }
        else:
            given = HyperParams(**shared_hp, **hp)
        return fn(params, opt_state, *batch, hyperparams=given)

    def masked_member_step(params, opt_state, hp, diverged, *batch, with_statistics: bool):
        """``member_step`` with the divergence mask, all inside vmap (for torch.compile,
        which fuses the masking into the step's kernels)."""
        new_params, new_state, loss = member_step(
            params, opt_state, hp, *batch, with_statistics=with_statistics
        )
        # the new parameters carry any non-finite update (p + inf, p + nan)
        finite = _all_finite([loss, *new_params.values(), *_changed(new_state, opt_state)])
        ok = finite & ~diverged
        new_params = _keep_where(ok, new_params, params)
        new_state = _keep_where(ok, new_state, opt_state)
        loss = torch.where(diverged, torch.full_like(loss, math.nan), loss)
        return new_params, new_state, diverged | ~finite, loss

    def build(with_statistics: bool):
        def step(state: SweepState, *batch: Any) -> tuple[SweepState, Tensor]:
            if len(batch) < 2:
                raise TypeError(
                    "step(state, *inputs, targets): give at least one input and the targets"
                )
            axes = batch_axis if isinstance(batch_axis, tuple) else (batch_axis,) * len(batch)
            if len(axes) != len(batch):
                raise ValueError(f"batch_axis has {len(axes)} entries for a batch of {len(batch)}")
            vmap = functools.partial(torch.func.vmap, randomness=randomness, chunk_size=chunk_size)
            if torch.compiler.is_compiling():
                fn = functools.partial(masked_member_step, with_statistics=with_statistics)
                params, opt_state, diverged, loss = vmap(fn, in_dims=(0, 0, 0, 0, *axes))(
                    state.params, state.opt_state, state.hyperparams, state.diverged, *batch
                )
                new = SweepState(params, opt_state, state.hyperparams, diverged)
                # compiled code may pick other strides than `init`; dynamo guards on
                # strides, so a state that keeps its layout never triggers a recompile
                return _tree_map(_contiguous, new), loss

            # Eagerly: vmap gets flat lists (optree flattens the nested state in C++,
            # several times faster than vmap's own pytree handling), returns only the
            # tensors the step changed, and the mask is applied after it, on the
            # stacked tensors (a few ops over [N, ...] instead of batched ops per leaf).
            # Tried and not kept: the members' forward vmapped and differentiated once
            # outside vmap (torch.autograd.grad of the summed losses), then the update
            # vmapped: 0.76-0.83x of vmap(capture)'s time for the gradients alone, but
            # 0.99-1.05x for the whole plain step (medians of 40 interleaved pairs, MLP
            # 64-128-128-10, N = 8); the weight gradients come out transposed in memory.
            # (typed Any: optree's PyTree type admits no plain tuples or dicts)
            trained: Any = (state.params, state.opt_state)
            everything: Any = (*trained, state.hyperparams)
            structure = optree.tree_structure(trained, namespace=PYTREE_NAMESPACE)
            leaves, spec = optree.tree_flatten(everything, namespace=PYTREE_NAMESPACE)
            n_state = structure.num_leaves
            changed: list[bool] = []

            def flat(leaves, *batch):
                params, opt_state, hp = optree.tree_unflatten(spec, leaves)
                new = member_step(params, opt_state, hp, *batch, with_statistics=with_statistics)
                new_leaves = optree.tree_leaves(new[:2], namespace=PYTREE_NAMESPACE)
                changed[:] = [n is not o for n, o in zip(new_leaves, leaves)]
                return [n for n, c in zip(new_leaves, changed) if c], new[2]

            outs, loss = vmap(flat, in_dims=(0, *axes))(leaves, *batch)
            olds = [o for o, c in zip(leaves, changed) if c]
            finite = _finite_members([loss, *(t for t in outs if t.is_floating_point())])
            ok = finite & ~state.diverged
            if ok.device.type == "cpu" and bool(ok.all()):
                # the usual case: nothing to mask; reading the flag costs no device
                # sync on the CPU and saves one `where` per changed tensor (~7% of a step)
                kept = iter(outs)
            else:
                kept = iter([_where_members(ok, n, o) for n, o in zip(outs, olds)])
            new_leaves = [next(kept) if c else o for o, c in zip(leaves[:n_state], changed)]
            params, opt_state = cast(
                "tuple[dict[str, Tensor], Any]", optree.tree_unflatten(structure, new_leaves)
            )
            loss = torch.where(state.diverged, torch.full_like(loss, math.nan), loss)
            new = SweepState(params, opt_state, state.hyperparams, state.diverged | ~finite)
            return new, loss

        return _own_code(step, "step" if with_statistics else "plain_step")

    return Sweep(init, build(True), build(False))

"""Stage 6: SINGD as a chain of primitives, ``singd(...) -> GradientTransformation``.

It strings the stages together: statistics (from captures) -> factor update ->
preconditioned step (:func:`scale_by_kronecker_factors`), then the first-order
primitives of :mod:`~singd_functional.fallbacks`::

    singd(layers, ...) == chain(scale_by_kronecker_factors(layers, ...),
                                add_decayed_weights(weight_decay),
                                trace(momentum),
                                scale_by_learning_rate(lr))

(partitioned with ``fallback`` for the parameters outside ``layers``). ``singd`` calls
the same step functions as that chain, with one flat state (:class:`SINGDState`) that
both public faces (the stateful :class:`~singd_functional.SINGD` and the vmapped
sweeps) read by name, and one Python pass per step.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _distributed
from . import structures as _structures
from ._types import LossAverage, PreconditionerDtype, ProcessGroupArg, Structures
from .combine import (
    GradientTransformation,
    require_params,
    takes_labels,
    unknown_extras,
    warn_if_tracked,
)
from .factors import Factors, update_factors
from .fallbacks import _check_velocity, _decayed, _heavy_ball, _scaled
from .hyperparams import HyperParams, Number, reader, reject_foreign, restrict
from .layers import LayerInfo, layer_kind
from .precondition import layer_directions, outer_products
from .statistics import KFAC_APPROXES, LOSS_AVERAGES, LayerStatistics, layer_part
from .structures import StructuredMatrix

__all__ = [
    "HyperParams",
    "KroneckerState",
    "SINGDState",
    "resolve_structures",
    "scale_by_kronecker_factors",
    "singd",
]

_KRON_EXTRAS = frozenset({"captures", "statistics", "grad_scale", "hyperparams"})


class KroneckerState(NamedTuple):
    """State of :func:`scale_by_kronecker_factors`.

    Attributes:
        count: step counter t (0-d int64 tensor).
        factors: per layer name, :class:`Factors` (K [d_K x d_K], C [d_C x d_C]).
        momenta: per layer name, Factors (m_K, m_C); empty when alpha1 == 0 or IKFAC.
        products: per layer name, the cached ``{"K": K K^T, "C": C C^T}`` (only the
            structures closed under that product; empty without
            ``cache_preconditioner``).
    """

    count: Tensor  # type: ignore[assignment]  # a field named like tuple.count (optax's name)
    factors: dict[str, Factors]
    momenta: dict[str, Factors]
    products: dict[str, dict[str, StructuredMatrix]] = {}  # noqa: RUF012 (never mutated)


class SINGDState(NamedTuple):
    """State of :func:`singd`: the :class:`KroneckerState` fields, the heavy-ball
    buffer and the fallback's state, flat.

    Attributes:
        count, factors, momenta, products: as in :class:`KroneckerState`.
        velocity: heavy-ball buffer per parameter key (layer parameters, and the rest
            unless a ``fallback`` transform handles them).
        fallback: the fallback transform's state, or ``()``.
    """

    count: Tensor  # type: ignore[assignment]  # a field named like tuple.count (optax's name)
    factors: dict[str, Factors]
    momenta: dict[str, Factors]
    velocity: dict[str, Tensor]
    fallback: Any
    products: dict[str, dict[str, StructuredMatrix]] = {}  # noqa: RUF012 (never mutated)


def _check_loss_average(loss_average) -> None:
    if loss_average in LOSS_AVERAGES:
        return
    if isinstance(loss_average, Tensor) and loss_average.dim() == 0:
        return
    if isinstance(loss_average, numbers.Real) and not isinstance(loss_average, bool):
        if float(loss_average) > 0:
            return
    raise ValueError(
        f"loss_average must be None, 'batch', 'batch+sequence' or a positive number of "
        f"loss terms (int or 0-d tensor), got {loss_average!r}"
    )


def resolve_structures(
    layers: tuple[LayerInfo, ...], structures: Structures
) -> dict[str, tuple[type[StructuredMatrix], type[StructuredMatrix]]]:
    """Per layer name, the structure types of (K, C).

    ``structures`` is a pair of names for every layer, or a mapping from layer name to
    such a pair (layers not in it get ``("dense", "dense")``); a side that the layer's
    kind forces (:attr:`~singd_functional.layers.LayerKind.structures`) overrides it.
    """
    out = {}
    for info in layers:
        pair = (
            structures.get(info.name, ("dense", "dense"))
            if isinstance(structures, Mapping)
            else structures
        )
        if isinstance(pair, str) or len(pair) != 2:
            raise ValueError(
                f"structures must be a pair (K structure, C structure), got {pair!r} "
                f"for layer {info.name!r}"
            )
        forced = layer_kind(info).structures  # e.g. an embedding's diagonal K
        name_K = pair[0] if forced[0] is None else forced[0]
        name_C = pair[1] if forced[1] is None else forced[1]
        out[info.name] = (_structures.get(name_K), _structures.get(name_C))
    return out


def _check_layers(layers: tuple[LayerInfo, ...]) -> None:
    """One layer per weight: K and C are a property of one weight matrix."""
    owner: dict[str, str] = {}
    for info in layers:
        for key in info.params:
            if key in owner:
                raise ValueError(
                    f"layers {owner[key]!r} and {info.name!r} share the parameter {key!r}; "
                    "SINGD needs one layer per weight: call one module several times "
                    "instead of sharing its weight, or drop one of them from `layers`"
                )
            owner[key] = info.name


# ``wrap(key, fn) -> fn'``: what ``singd(kernels=...)`` takes; ``key`` names all that
# ``fn`` depends on (the drop-in's ``compile=True`` returns one compiled ``fn`` per key).
KernelWrapper = Callable[[tuple, Callable], Callable]


def _factor_update_kernel(factors: Factors, keeps_momenta, kfac_like, normalize_lr_cov, cache,
                          wrap) -> Callable:
    """``fn(factors, momenta, stats, damping, alpha1, lr_cov) -> (factors, momenta,
    products)`` for factors like ``factors`` (the unit ``kernels`` may replace)."""
    K, C = factors
    # only the structures and sides: layers of one signature share one key (one graph)
    key = ("factor update", type(K), K.dim, type(C), C.dim, keeps_momenta, kfac_like,
           normalize_lr_cov, cache)

    def factor_update(factors, momenta, stats, damping, alpha1, lr_cov):
        new, m = update_factors(
            factors, momenta, stats, damping=damping, alpha1=alpha1, lr_cov=lr_cov,
            kfac_like=kfac_like, normalize_lr_cov=normalize_lr_cov,
        )  # fmt: skip
        return new, m, (outer_products(*new) if cache else {})

    return factor_update if wrap is None else wrap(key, factor_update)


def _direction_kernel(info: LayerInfo, types, cache, wrap) -> Callable:
    """``fn(K, C, products, grad_W, grad_b) -> (dW, db)``: C C^T G K K^T split back into
    the weight's and bias's shapes (db None without bias)."""
    # the layer's static description without its names: layers of one signature share
    # one key (and one compiled graph)
    layer = dataclasses.replace(info, name="", weight="weight", module="",
                                bias=None if info.bias is None else "bias")

    def direction(K, C, products, grad_W, grad_b):
        grads = {"weight": grad_W} if grad_b is None else {"weight": grad_W, "bias": grad_b}
        out = layer_directions(layer, K, C, grads, products)
        return out["weight"], out.get("bias")

    return direction if wrap is None else wrap(("direction", layer, *types, cache), direction)


class _Kronecker(NamedTuple):
    """The preconditioning stage as plain functions (shared by the two transforms)."""

    init: Callable[..., KroneckerState]
    step: Callable[..., tuple[dict[str, Tensor], KroneckerState]]
    update_layer: Callable[..., tuple[Factors, Factors | None, dict | None]]
    keeps_momenta: bool
    layer_params: frozenset[str]


def _kronecker(
    layers,
    alpha1,
    structures,
    kfac_approx,
    loss_average,
    kfac_like,
    normalize_lr_cov,
    preconditioner_dtype,
    cache_preconditioner,
    process_group: ProcessGroupArg = None,
    kernels: KernelWrapper | None = None,
) -> _Kronecker:
    layers = tuple(layers)
    if kfac_approx not in KFAC_APPROXES:
        raise ValueError(f"kfac_approx must be one of {KFAC_APPROXES}, got {kfac_approx!r}")
    _check_loss_average(loss_average)
    _check_layers(layers)
    struct_types = resolve_structures(layers, structures)
    keeps_momenta = not kfac_like and not (isinstance(alpha1, numbers.Real) and alpha1 == 0)
    dtype_K, dtype_C = preconditioner_dtype

    def factor_kernel(factors: Factors, momenta) -> Callable:
        return _factor_update_kernel(factors, momenta is not None, kfac_like, normalize_lr_cov,
                                     cache_preconditioner, kernels)

    directions_of = {info.name: _direction_kernel(info, struct_types[info.name],
                                                  cache_preconditioner, kernels)
                     for info in layers}

    def init(params: Mapping[str, Tensor]) -> KroneckerState:
        factors, momenta = {}, {}
        for info in layers:
            if info.weight not in params:
                raise KeyError(
                    f"layer {info.name!r}: its weight {info.weight!r} is not in params "
                    f"(keys: {sorted(params)[:8]}...)"
                )
            w = params[info.weight]
            TK, TC = struct_types[info.name]
            dK, dC = dtype_K or w.dtype, dtype_C or w.dtype
            factors[info.name] = Factors(
                TK.eye(info.d_K, dtype=dK, device=w.device),
                TC.eye(info.d_C, dtype=dC, device=w.device),
            )
            if keeps_momenta:
                momenta[info.name] = Factors(
                    TK.zeros(info.d_K, dtype=dK, device=w.device),
                    TC.zeros(info.d_C, dtype=dC, device=w.device),
                )
        device = next(iter(params.values())).device if params else torch.device("cpu")
        return KroneckerState(
            # on the parameters' device: a sweep masks it with the members' flags there
            count=torch.zeros((), dtype=torch.int64, device=device),
            factors=factors,
            momenta=momenta,
            products={n: outer_products(*f) for n, f in factors.items()}
            if cache_preconditioner
            else {},
        )

    def _statistics(factors, captures, grad_scale):
        group = _distributed.resolve_group(process_group)
        if group is not None:  # this process's captures, reduced in one collective
            return _distributed.reduced_statistics(
                layers, factors, captures, group, kfac_approx=kfac_approx,
                loss_average=loss_average, grad_scale=grad_scale,
            )
        missing = [info.name for info in layers if info.name not in captures]
        if missing:
            raise ValueError(
                f"captures are missing layers {missing}: the forward pass did not call "
                "their modules (a capture sees a layer when its module is called; a weight "
                "used directly, as in F.linear(x, m.weight), is not seen). Call the module, "
                "or leave a layer that this forward really never uses out of `layers`; "
                "captures=None skips the factor update this step"
            )
        parts = {
            info.name: layer_part(
                info,
                *factors[info.name],
                captures[info.name],
                kfac_approx=kfac_approx,
                loss_average=loss_average,
                grad_scale=grad_scale,
            )
            for info in layers
        }
        # an empty batch has no statistics: those layers keep their factors this step
        return {name: part.stats for name, part in parts.items() if part.rows}

    def update_layer(factors, momenta, stats, damping, alpha1, lr_cov):
        """One layer's new ``(factors, momenta, products)`` for the drop-in: with
        ``kernels`` their factor update; without, eagerly written over ``stats`` (the
        caller's to give up), the products (None) left to the caller."""
        if kernels is not None:
            update = factor_kernel(factors, momenta)
            return update(factors, momenta, stats, damping, alpha1, lr_cov)
        new, m = update_factors(
            factors, momenta, stats, damping=damping, alpha1=alpha1, lr_cov=lr_cov,
            kfac_like=kfac_like, normalize_lr_cov=normalize_lr_cov, overwrite_stats=True,
        )  # fmt: skip
        return new, m, None

    def step(grads, state, keys, captures, statistics, grad_scale, damping, alpha1, lr_cov):
        """Directions for ``keys`` (C C^T G K K^T on layer parameters, the gradient on
        the others; divided by ``grad_scale``) and the new KroneckerState."""
        if captures is not None:
            statistics = {**_statistics(state.factors, captures, grad_scale), **(statistics or {})}
        factors, momenta, products = state.factors, state.momenta, state.products
        if statistics:
            factors, momenta, products = dict(factors), dict(momenta), dict(products)
            # a float64 count keeps `0.2 / (1 + t)` exact; int64 would give float32
            beta = lr_cov(state.count.double()) if callable(lr_cov) else lr_cov
            for name, stats in statistics.items():
                if name not in factors:
                    raise KeyError(f"statistics for unknown layer {name!r}")
                # (a layer outside `layers` may come with statistics: split_work)
                update = factor_kernel(factors[name], momenta.get(name))
                factors[name], m, new_products = update(
                    factors[name], momenta.get(name), stats, damping, alpha1, beta
                )
                if m is not None:
                    momenta[name] = m
                if cache_preconditioner:
                    products[name] = new_products

        directions = {k: grads[k] for k in keys}
        for info in layers:
            dW, db = directions_of[info.name](
                *factors[info.name], products.get(info.name),
                grads[info.weight], None if info.bias is None else grads[info.bias],
            )  # fmt: skip
            directions[info.weight] = dW
            if info.bias is not None:
                directions[info.bias] = db
        if not (isinstance(grad_scale, (int, float)) and grad_scale == 1):
            directions = {k: d / grad_scale for k, d in directions.items()}
        return directions, KroneckerState(state.count + 1, factors, momenta, products)

    return _Kronecker(init, step, update_layer, keeps_momenta,
                      frozenset(k for i in layers for k in i.params))


def _alpha1_check(keeps_momenta: bool, default, value) -> None:
    if value is not default and not keeps_momenta:
        raise ValueError(
            "this transform keeps no Riemannian momenta (built with alpha1=0 or "
            "kfac_like=True), so alpha1 cannot be overridden; build it with alpha1 > 0"
        )


def scale_by_kronecker_factors(
    layers: tuple[LayerInfo, ...],
    damping: Number = 1e-3,
    alpha1: Number = 0.5,
    lr_cov: Number | Callable = 1e-2,
    structures: Structures = ("dense", "dense"),
    kfac_approx: str = "expand",
    loss_average: LossAverage = "batch",
    kfac_like: bool = False,
    normalize_lr_cov: bool = False,
    preconditioner_dtype: PreconditionerDtype = (None, None),
    cache_preconditioner: bool = False,
    process_group: ProcessGroupArg = None,
) -> GradientTransformation:
    """SINGD's preconditioning stage: ``u <- C C^T G K K^T / grad_scale`` per layer.

    On steps that come with ``captures`` (or ``statistics``), first H_K, H_C from the
    captures, then the factor update of K, C, m_K, m_C (``docs/algorithm.md#factor-update``). The
    entries of parameters outside ``layers`` pass through (divided by
    ``grad_scale``). Arguments as in :func:`singd`.

    Returns:
        ``GradientTransformation`` with ``update(updates, state, params=None, *,
        captures=None, statistics=None, grad_scale=1.0, hyperparams=None)`` (reads
        ``damping``, ``alpha1``, ``lr_cov``) and a :class:`KroneckerState`.
    """
    alpha1 = 0.0 if kfac_like else alpha1
    kron = _kronecker(
        layers, alpha1, structures, kfac_approx, loss_average, kfac_like,
        normalize_lr_cov, preconditioner_dtype, cache_preconditioner, process_group,
    )  # fmt: skip
    read, names = reader(frozenset({"alpha1"}), damping=damping, alpha1=alpha1, lr_cov=lr_cov)

    def update(
        updates,
        state: KroneckerState,
        params=None,
        *,
        captures=None,
        statistics: Mapping[str, LayerStatistics] | None = None,
        grad_scale: Number = 1.0,
        hyperparams: HyperParams | None = None,
        **unexpected: Any,
    ):
        if unexpected:
            raise unknown_extras(unexpected, _KRON_EXTRAS, "scale_by_kronecker_factors(...).update")
        lam, a1, beta = read(hyperparams)
        _alpha1_check(kron.keeps_momenta, alpha1, a1)
        return kron.step(updates, state, updates, captures, statistics, grad_scale, lam, a1, beta)

    return GradientTransformation(kron.init, update, _KRON_EXTRAS, names)


def singd(
    layers: tuple[LayerInfo, ...],
    lr: Number = 1e-3,
    momentum: Number = 0.9,
    damping: Number = 1e-3,
    alpha1: Number = 0.5,
    weight_decay: Number = 0.0,
    lr_cov: Number | Callable = 1e-2,
    structures: Structures = ("dense", "dense"),
    kfac_approx: str = "expand",
    loss_average: LossAverage = "batch",
    kfac_like: bool = False,
    normalize_lr_cov: bool = False,
    preconditioner_dtype: PreconditionerDtype = (None, None),
    fallback: GradientTransformation | None = None,
    cache_preconditioner: bool = False,
    process_group: ProcessGroupArg = None,
    kernels: KernelWrapper | None = None,
) -> GradientTransformation:
    """SINGD (Lin et al., ICML 2024) as a pure transform over parameter dicts.

    Per supported layer (W~ = [W | b], G its gradient), on steps that come with
    captures::

        H_K, H_C from the captures           (statistics)
        K, C, m_K, m_C updated               (docs/algorithm.md#factor-update)

    and on every step::

        D = C C^T G K K^T;  step = D + weight_decay W;  v <- momentum v + step
        update = -lr v

    i.e. the chain of :func:`scale_by_kronecker_factors`,
    :func:`~singd_functional.add_decayed_weights`, :func:`~singd_functional.trace` and
    :func:`~singd_functional.scale_by_learning_rate`; with ``fallback``, the
    partition ``{"singd": that chain, "fallback": fallback}`` over layer parameters
    and the others.

    Args:
        layers: from :func:`~singd_functional.find_layers` (one layer per weight).
        lr, momentum, damping, alpha1, weight_decay: as in the paper (beta2, alpha2,
            lambda, alpha1, gamma); floats or 0-d tensors.
        lr_cov: beta1, a float, 0-d tensor, or a callable of the step counter t (a 0-d
            float64 tensor holding an integer; use tensor ops such as ``torch.where``
            in it, not Python ``if``, to stay vmappable / compilable).
        structures: (K, C) structure names for all layers, or a dict per layer name.
        kfac_approx: ``"expand"`` or ``"reduce"``.
        loss_average: ``None`` (sum loss), ``"batch"``, ``"batch+sequence"`` or a
            positive number of loss terms (e.g. labelled nodes of a graph).
        kfac_like: IKFAC instead of SINGD (alpha1 is then forced to 0).
        normalize_lr_cov: rho = (1 - alpha1)/2 and beta / max(1, max|m|).
        preconditioner_dtype: dtypes of (K and m_K, C and m_C); None = weight dtype.
        fallback: transform for parameters outside ``layers``; None: the same
            heavy-ball step with an identity preconditioner (SGD with momentum). It
            gets the gradients divided by ``grad_scale``, the ``hyperparams`` (see
            below) and the other extras it declares.
        cache_preconditioner: keep K K^T and C C^T between factor updates for the
            structures closed under that product (dense, diagonal, block-diagonal):
            a plain step then costs two structured products per layer instead of
            four. Costs the memory of K and C once more; worth it when captures come
            every T > 1 steps.
        process_group: None, or the group of data-parallel processes (a
            ``torch.distributed`` process group, or ``"world"``): the statistics of
            ``captures`` are then reduced over it inside ``update``, in one
            ``all_reduce``; with ``grads`` averaged over the processes (as DDP
            averages them) W processes step like one on the concatenated batch
            (docs/distributed.md). A layer some process did not capture gets the
            others' statistics. Not for vmap / compile (a collective, one host sync).
        kernels: None, or ``wrap(key, fn) -> fn'``, called once per layer for each of
            its two per-step functions (the factor update with its cached products,
            and the preconditioned direction); ``key`` is a hashable tuple naming
            everything ``fn`` depends on (equal for layers of one shape, kind and
            structure), ``fn'`` must compute what ``fn`` does. The drop-in's
            ``SINGD(compile=True)`` passes one that compiles each key once.

    Returns:
        ``GradientTransformation`` with
        ``update(grads, state, params, *, captures=None, statistics=None,
        grad_scale=1.0, hyperparams=None)`` and a :class:`SINGDState`.
        ``captures=None`` (and no ``statistics``) skips the factor update.
        ``statistics`` maps layer names to precomputed
        :class:`~singd_functional.statistics.LayerStatistics` (layers absent from it
        keep their factors), e.g. accumulated over micro-batches. ``hyperparams`` is
        one :class:`~singd_functional.HyperParams` for SINGD and the fallback alike
        (``HyperParams(lr=0.0)`` freezes every parameter; each reads the fields it
        declares), or ``{"singd": HyperParams(...), "fallback": HyperParams(...)}``.
    """
    alpha1 = 0.0 if kfac_like else alpha1
    read, own_names = reader(
        frozenset({"momentum", "alpha1"}), lr=lr, momentum=momentum, weight_decay=weight_decay,
        damping=damping, alpha1=alpha1, lr_cov=lr_cov,
    )  # fmt: skip
    kron = _kronecker(
        layers, alpha1, structures, kfac_approx, loss_average, kfac_like,
        normalize_lr_cov, preconditioner_dtype, cache_preconditioner, process_group,
        kernels,
    )  # fmt: skip
    layer_params = kron.layer_params
    extras = _KRON_EXTRAS | (fallback.extras if fallback is not None else frozenset())
    names = own_names | (fallback.hyperparams if fallback is not None else frozenset())
    foreign = tuple(i for i, f in enumerate(HyperParams._fields) if f not in names)

    def init(params: Mapping[str, Tensor]) -> SINGDState:
        warn_if_tracked(params)
        k = kron.init(params)
        others = {key: p for key, p in params.items() if key not in layer_params}
        owned = params
        if fallback is not None:
            owned = {key: p for key, p in params.items() if key in layer_params}
        return SINGDState(
            count=k.count,
            factors=k.factors,
            momenta=k.momenta,
            velocity={key: torch.zeros_like(p) for key, p in owned.items()},
            fallback=() if fallback is None else fallback.init(others),
            products=k.products,
        )

    def _split_hyperparams(hyperparams):
        """(SINGD's HyperParams, the fallback's)."""
        if isinstance(hyperparams, Mapping):
            bad = sorted(set(hyperparams) - {"singd", "fallback"})
            if bad or (fallback is None and "fallback" in hyperparams):
                raise ValueError(
                    f"hyperparams labels {sorted(hyperparams)}: the per-label form takes "
                    "'singd' and, with a fallback, 'fallback'; for one set of values pass "
                    "sf.HyperParams(...)"
                )
            return hyperparams.get("singd"), hyperparams.get("fallback")
        if fallback is None or hyperparams is None:
            return hyperparams, None
        if not isinstance(hyperparams, HyperParams):
            return hyperparams, None  # the reader names the expected type
        reject_foreign(hyperparams, foreign, names)
        return restrict(hyperparams, own_names), restrict(hyperparams, fallback.hyperparams)

    def _update_fallback(grads, fb_state, params, grad_scale, kw):
        """The fallback's step on the other parameters, with the gradients unscaled."""
        others = [key for key in grads if key not in layer_params]
        scaled = not (isinstance(grad_scale, (int, float)) and grad_scale == 1)
        sub = {key: grads[key] / grad_scale if scaled else grads[key] for key in others}
        kw = {n: v for n, v in kw.items() if n in fallback.extras}
        return fallback.update(sub, fb_state, {key: params[key] for key in others}, **kw)

    def update(
        grads: Mapping[str, Tensor],
        state: SINGDState,
        params: Mapping[str, Tensor] | None = None,
        *,
        captures=None,
        statistics: Mapping[str, LayerStatistics] | None = None,
        grad_scale: Number = 1.0,
        hyperparams: HyperParams | Mapping[str, HyperParams] | None = None,
        **unexpected: Any,
    ):
        # `unexpected` holds the fallback's own extras, or typos
        if unexpected and (fallback is None or not fallback.extras.issuperset(unexpected)):
            raise unknown_extras(unexpected, extras, "singd(...).update")
        require_params(params, "singd")
        warn_if_tracked(params)
        hp: HyperParams | None
        if fallback is not None or isinstance(hyperparams, Mapping):
            hp, hp_fallback = _split_hyperparams(hyperparams)
        else:
            hp, hp_fallback = hyperparams, None
        rate, mom, wd, lam, a1, beta = read(hp)
        _alpha1_check(kron.keeps_momenta, alpha1, a1)
        velocity = state.velocity
        _check_velocity(grads, velocity, params)
        d, k = kron.step(grads, state, velocity, captures, statistics, grad_scale, lam, a1, beta)
        velocity = _heavy_ball(_decayed(d, params, wd, velocity), velocity, mom)
        updates = _scaled(velocity, rate)
        fb_state = state.fallback
        if fallback is not None:
            kw = {"captures": captures, "statistics": statistics, "hyperparams": hp_fallback}
            fb_updates, fb_state = _update_fallback(
                grads, fb_state, params, grad_scale, {**kw, **unexpected}
            )
            updates.update(fb_updates)
        return updates, SINGDState(k.count, k.factors, k.momenta, velocity, fb_state, k.products)

    if fallback is not None:
        takes_labels(update)
    return GradientTransformation(init, update, extras, names)

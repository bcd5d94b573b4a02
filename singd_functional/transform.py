"""Stage 6: the pure SINGD transform, ``singd(...) -> GradientTransformation``.

It strings the stages together: statistics (from captures) -> factor update ->
preconditioned step -> heavy-ball updates. Both public faces (the stateful
:class:`~singd_functional.SINGD` and the vmapped sweeps) call this one function.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import structures as _structures
from .combine import GradientTransformation
from .factors import Factors, update_factors
from .layers import LayerInfo, layer_kind
from .precondition import (
    layer_gradient_matrix,
    natural_gradient,
    outer_products,
    split_layer_update,
)
from .statistics import KFAC_APPROXES, LOSS_AVERAGES, LayerStatistics, layer_part
from .structures import StructuredMatrix

Number = float | Tensor


class HyperParams(NamedTuple):
    """Numeric hyperparameters; each a float or a 0-d tensor (None: keep the default).

    Pass to ``tx.update(..., hyperparams=HyperParams(lr=...))`` to override per call:
    schedules cost nothing and ``torch.func.vmap`` can sweep them.
    """

    lr: Number | None = None
    momentum: Number | None = None
    damping: Number | None = None
    alpha1: Number | None = None
    weight_decay: Number | None = None
    lr_cov: Number | Callable | None = None


class SINGDState(NamedTuple):
    """State of :func:`singd`.

    Attributes:
        count: step counter t (0-d int64 tensor).
        factors: per layer name, :class:`Factors` (K [d_K x d_K], C [d_C x d_C]).
        momenta: per layer name, Factors (m_K, m_C); empty when alpha1 == 0 or IKFAC.
        velocity: heavy-ball buffer per parameter key (layer parameters, and the rest
            unless a ``fallback`` transform handles them).
        fallback: the fallback transform's state, or ``()``.
        products: per layer name, the cached ``{"K": K K^T, "C": C C^T}`` (only the
            structures closed under that product; empty without
            ``cache_preconditioner``).
    """

    count: Tensor
    factors: dict[str, Factors]
    momenta: dict[str, Factors]
    velocity: dict[str, Tensor]
    fallback: Any
    products: dict[str, dict[str, StructuredMatrix]] = {}  # noqa: RUF012 (never mutated)


def _check_nonnegative(hp: Mapping[str, Any]) -> None:
    for name, value in hp.items():
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def _check_loss_average(loss_average) -> None:
    if loss_average in LOSS_AVERAGES:
        return
    if isinstance(loss_average, Tensor) and loss_average.dim() == 0:
        return
    if isinstance(loss_average, numbers.Real) and not isinstance(loss_average, bool):
        if loss_average > 0:
            return
    raise ValueError(
        f"loss_average must be None, 'batch', 'batch+sequence' or a positive number of "
        f"loss terms (int or 0-d tensor), got {loss_average!r}"
    )


def _heavy_ball(v: Tensor, d: Tensor, p: Tensor, momentum, weight_decay) -> Tensor:
    """v <- momentum v + d + weight_decay p, with fused ops when hyperparameters are floats."""
    if isinstance(weight_decay, (int, float)):
        step = d if weight_decay == 0 else torch.add(d, p, alpha=weight_decay)
    else:
        step = d + p * weight_decay
    if isinstance(momentum, (int, float)):
        return torch.add(step, v, alpha=momentum)
    return torch.addcmul(step, v, momentum)  # one pass, as with a float momentum


def resolve_structures(layers, structures) -> dict[str, tuple[type, type]]:
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
        pair = tuple(f if f is not None else p for f, p in zip(forced, pair))
        out[info.name] = (_structures.get(pair[0]), _structures.get(pair[1]))
    return out


def singd(
    layers: tuple[LayerInfo, ...],
    lr: Number = 1e-3,
    momentum: Number = 0.9,
    damping: Number = 1e-3,
    alpha1: Number = 0.5,
    weight_decay: Number = 0.0,
    lr_cov: Number | Callable = 1e-2,
    structures=("dense", "dense"),
    kfac_approx: str = "expand",
    loss_average="batch",
    kfac_like: bool = False,
    normalize_lr_cov: bool = False,
    preconditioner_dtype=(None, None),
    fallback: GradientTransformation | None = None,
    cache_preconditioner: bool = False,
) -> GradientTransformation:
    """SINGD (Lin et al., ICML 2024) as a pure transform over parameter dicts.

    Per supported layer (W~ = [W | b], G its gradient), on steps that come with
    captures::

        H_K, H_C from the captures           (statistics)
        K, C, m_K, m_C updated               (factors; ALGORITHM.md)

    and on every step::

        D = C C^T G K K^T;  step = D + weight_decay W;  v <- momentum v + step
        update = -lr v

    Args:
        layers: from :func:`~singd_functional.find_layers`.
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
            heavy-ball step with an identity preconditioner (SGD with momentum).
        cache_preconditioner: keep K K^T and C C^T between factor updates for the
            structures closed under that product (dense, diagonal, block-diagonal):
            a plain step then costs two structured products per layer instead of
            four. Costs the memory of K and C once more; worth it when captures come
            every T > 1 steps.

    Returns:
        ``GradientTransformation(init, update)`` with
        ``update(grads, state, params, *, captures=None, hyperparams=None,
        statistics=None, grad_scale=1.0)``. ``captures=None`` (and no
        ``statistics``) skips the factor update. ``statistics`` maps layer names to
        precomputed :class:`~singd_functional.statistics.LayerStatistics` (layers
        absent from it keep their factors), e.g. accumulated over micro-batches.
    """
    layers = tuple(layers)
    if kfac_approx not in KFAC_APPROXES:
        raise ValueError(f"kfac_approx must be one of {KFAC_APPROXES}, got {kfac_approx!r}")
    _check_loss_average(loss_average)
    defaults = HyperParams(
        lr, momentum, damping, 0.0 if kfac_like else alpha1, weight_decay, lr_cov
    )
    _check_nonnegative({k: v for k, v in defaults._asdict().items() if not callable(v)})
    struct_types = resolve_structures(layers, structures)
    keeps_momenta = not kfac_like and not (isinstance(alpha1, numbers.Real) and alpha1 == 0)
    dtype_K, dtype_C = preconditioner_dtype
    layer_params = {k for info in layers for k in info.params}

    def _device(params: Mapping[str, Tensor]) -> torch.device:
        return next(iter(params.values())).device if params else torch.device("cpu")

    def init(params: Mapping[str, Tensor]) -> SINGDState:
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
        others = {k: p for k, p in params.items() if k not in layer_params}
        owned = params if fallback is None else {k: params[k] for k in params if k in layer_params}
        return SINGDState(
            # on the parameters' device: a sweep masks it with the members' flags there
            count=torch.zeros((), dtype=torch.int64, device=_device(params)),
            factors=factors,
            momenta=momenta,
            velocity={k: torch.zeros_like(p) for k, p in owned.items()},
            fallback=() if fallback is None else fallback.init(others),
            products={n: outer_products(*f) for n, f in factors.items()}
            if cache_preconditioner
            else {},
        )

    def _hyperparams(override: HyperParams | None) -> HyperParams:
        if override is None:
            return defaults
        given = {k: v for k, v in override._asdict().items() if v is not None}
        _check_nonnegative({k: v for k, v in given.items() if not callable(v)})
        if "alpha1" in given and not keeps_momenta:
            raise ValueError(
                "this transform keeps no Riemannian momenta (built with alpha1=0 or "
                "kfac_like=True), so alpha1 cannot be overridden; build it with alpha1 > 0"
            )
        return defaults._replace(**given)

    def _statistics(state, captures, grad_scale):
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
                *state.factors[info.name],
                captures[info.name],
                kfac_approx=kfac_approx,
                loss_average=loss_average,
                grad_scale=grad_scale,
            )
            for info in layers
        }
        # an empty batch has no statistics: those layers keep their factors this step
        return {name: part.stats for name, part in parts.items() if part.rows}

    def _check_shapes(grads, state, params):
        for k, v in state.velocity.items():
            if k not in grads:
                raise KeyError(f"grads has no entry for parameter {k!r}")
            if grads[k].shape != v.shape or (params is not None and params[k].shape != v.shape):
                raise ValueError(
                    f"parameter {k!r}: state was built for shape {tuple(v.shape)}, got grad "
                    f"{tuple(grads[k].shape)}; re-run init() after changing the model"
                )

    def update(
        grads: Mapping[str, Tensor],
        state: SINGDState,
        params: Mapping[str, Tensor],
        *,
        captures=None,
        hyperparams: HyperParams | None = None,
        statistics: Mapping[str, LayerStatistics] | None = None,
        grad_scale: Number = 1.0,
        **_: Any,
    ):
        hp = _hyperparams(hyperparams)
        _check_shapes(grads, state, params)
        if captures is not None:
            statistics = {**_statistics(state, captures, grad_scale), **(statistics or {})}
        factors, momenta = dict(state.factors), dict(state.momenta)
        products = dict(state.products)
        if statistics:
            # a float64 count keeps `0.2 / (1 + t)` exact; int64 would give float32
            beta = hp.lr_cov(state.count.double()) if callable(hp.lr_cov) else hp.lr_cov
            for name, stats in statistics.items():
                if name not in factors:
                    raise KeyError(f"statistics for unknown layer {name!r}")
                factors[name], m = update_factors(
                    factors[name],
                    momenta.get(name),
                    stats,
                    damping=hp.damping,
                    alpha1=hp.alpha1,
                    lr_cov=beta,
                    kfac_like=kfac_like,
                    normalize_lr_cov=normalize_lr_cov,
                )
                if m is not None:
                    momenta[name] = m
                if cache_preconditioner:
                    products[name] = outer_products(*factors[name])

        unscaled = isinstance(grad_scale, (int, float)) and grad_scale == 1
        directions = {}
        for info in layers:
            G = layer_gradient_matrix(info, grads)
            D = natural_gradient(*factors[info.name], G, products.get(info.name))
            directions.update(split_layer_update(info, D, params))
        updates, velocity = {}, {}
        for k, v in state.velocity.items():
            d = directions.get(k, grads[k])
            if not unscaled:
                d = d / grad_scale
            velocity[k] = _heavy_ball(v, d, params[k], hp.momentum, hp.weight_decay)
            updates[k] = velocity[k] * (-hp.lr)
        fb_state = state.fallback
        if fallback is not None:
            others = [k for k in grads if k not in layer_params]
            fb_updates, fb_state = fallback.update(
                {k: grads[k] for k in others}, fb_state, {k: params[k] for k in others}
            )
            updates.update(fb_updates)
        new_state = SINGDState(state.count + 1, factors, momenta, velocity, fb_state, products)
        return updates, new_state

    return GradientTransformation(init, update)

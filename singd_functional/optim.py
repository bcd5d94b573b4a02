"""The drop-in face: :class:`SINGD`, a ``torch.optim.Optimizer`` over the pure core.

It computes nothing itself. Per step::

    forward hooks (steps with t % T == 0, grad enabled)  layer inputs x
    tensor hooks on the layer outputs                     dL/dz
    end of every backward pass                            statistics.layer_statistics  (one part)
    step: statistics.accumulate over the parts, [_distributed.all_reduce_statistics],
          transform.singd(...).update  ->  p.add_(update)

Statistics are reduced to H_K, H_C as each backward pass ends, so accumulating k
micro-batches holds no activations beyond the pass that is running.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import _distributed
from . import structures as _structures
from ._official_compat import OfficialNames
from .capture import LayerCapture
from .combine import GradientTransformation
from .factors import Factors
from .layers import SUPPORTED, LayerInfo, describe
from .precondition import outer_products
from .statistics import LayerStatistics, accumulate, layer_statistics
from .transform import HyperParams, SINGDState, singd

# Group entries fixed when the group's state is created (its layout depends on them).
_LOCKED = ("structures", "kfac_like")
# Group entries the pure transform is built from (rebuilt when one changes).
_STATIC = ("structures", "kfac_approx", "loss_average", "kfac_like", "normalize_lr_cov",
           "preconditioner_dtype", "T")


class _Part(NamedTuple):
    """One backward pass's contribution to one layer's statistics."""

    stats: LayerStatistics
    rows: float
    loss_terms: Any


@dataclasses.dataclass
class _Group:
    """What the optimizer derived from one param group (same index as ``param_groups``)."""

    layers: tuple[LayerInfo, ...]
    params: dict[str, Tensor]  # key (the name in model.named_parameters()) -> parameter
    locked: tuple
    keeps_momenta: bool
    transforms: dict = dataclasses.field(default_factory=dict)


class _CaptureHook:
    """Forward hook of one layer.

    It holds the optimizer and its module weakly and only acts for that very module, so
    a deep copy or a pickle of the model (which copy the hook) never feeds statistics
    into the optimizer; copies are inert.
    """

    def __init__(self, optimizer: SINGD, name: str, module: nn.Module):
        self.optimizer = weakref.ref(optimizer)
        self.module = weakref.ref(module)
        self.name = name

    def __call__(self, module, args, output):
        opt = self.optimizer()
        if opt is not None and module is self.module():
            opt._record(self.name, args, output)

    def __getstate__(self):
        return {"name": self.name}

    def __setstate__(self, state):
        self.name = state["name"]
        self.optimizer = self.module = _dead


def _dead():
    return None


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()


class SINGD(OfficialNames, torch.optim.Optimizer):
    r"""SINGD / IKFAC (Lin et al., ICML 2024) as a ``torch.optim.Optimizer``.

    Same constructor and numbers as the official package's ``singd.optim.optimizer.SINGD``
    (ALGORITHM.md); a one-line import change switches. Use it like any optimizer::

        opt = SINGD(model, lr=1e-3, T=10)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

    On steps with ``t % T == 0`` it records, with module hooks, the inputs and output
    gradients of every supported layer (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``)
    during ``backward`` and updates the preconditioner factors K, C; every step it
    moves the parameters along the preconditioned heavy-ball direction. All arithmetic
    is the pure core's (:func:`singd_functional.singd`).

    Args:
        model: the model whose supported layers are preconditioned (may be wrapped in
            ``DistributedDataParallel``).
        params: None (all parameters of supported layers that require grad; other
            trainable parameters are NOT trained and, with ``warn_unsupported``, named
            in one warning), or parameters / param groups as for any optimizer. A
            group may set any hyperparameter below, including ``structures``, ``T``,
            ``kfac_approx``, ``loss_average``, ``preconditioner_dtype``, ``kfac_like``,
            ``normalize_lr_cov``. A layer's weight and bias must be in the same group.
            Parameters outside supported layers that you pass explicitly get SINGD's
            heavy-ball step with an identity preconditioner (SGD with momentum and
            coupled weight decay, same ``lr``, ``momentum``, ``weight_decay``).
        lr, momentum, damping, alpha1, weight_decay: beta2, alpha2, lambda, alpha1,
            gamma of the paper; read from ``param_groups`` at every step, so every
            ``torch.optim.lr_scheduler`` works.
        T: update the preconditioner every T steps (statistics are only captured then).
        loss_average: None (sum loss), ``"batch"``, ``"batch+sequence"`` or a count:
            what the differentiated loss averages over.
        lr_cov: beta1, a float or a callable of the step t (a Python int from 0). A
            callable is not saved by :meth:`state_dict`; the optimizer you load into
            keeps its own.
        structures: (K, C) structure names (``singd_functional.structures``).
        kfac_approx: ``"expand"`` or ``"reduce"``.
        warn_unsupported: see ``params``.
        kfac_like: IKFAC instead of SINGD (alpha1 is then 0).
        preconditioner_dtype: dtypes of (K and m_K, C and m_C); None = the weight's.
        init_grad_scale: the loss scale expected in the first backward pass when a
            ``torch.amp.GradScaler`` is used (statistics are stored divided by the
            expected scale, which keeps low-precision factors finite; the exact scale
            of each step is removed at ``step``).
        normalize_lr_cov: rho = (1 - alpha1)/2 and beta1 / max(1, max|m|).

    GradScaler: use it as with any optimizer, ``scaler.step(opt)``, with or without
    ``scaler.unscale_(opt)`` before (e.g. to clip gradients). Steps with non-finite
    gradients are skipped with state and parameters untouched, and the statistics of
    that backward pass are dropped. The scale is removed from the gradients and from
    H_C (divided by s^2). After ``scaler.unscale_(opt)`` the optimizer reads the scale
    of the ``GradScaler`` that calls ``step``; :meth:`set_current_grad_scale` gives it
    explicitly instead.

    Statistics follow gradients: they accumulate over all backward passes since the
    last :meth:`step` or :meth:`zero_grad` (gradient accumulation, ALGORITHM.md).

    Multi-process: when ``torch.distributed`` is initialised with more than one
    process, the statistics are all-reduced (one flat buffer per step) over
    ``opt.process_group`` (default: the world group; set it to None to train each
    process on its own). Gradients are never touched: wrap the model in
    ``DistributedDataParallel``, or average ``p.grad`` over the processes before
    ``step`` yourself.

    A layer without gradient in a step (unused, frozen) is skipped; its state is kept.
    Moving or casting the model after construction (``model.to(...)``) is fine: the
    state follows the parameters' device and dtype (and ``preconditioner_dtype``).
    """

    _step_supports_amp_scaling = True  # GradScaler passes grad_scale / found_inf to step

    def __init__(
        self,
        model: nn.Module,
        params=None,
        lr: float = 1e-3,
        momentum: float = 0.9,
        damping: float = 1e-3,
        alpha1: float = 0.5,
        weight_decay: float = 0.0,
        T: int = 10,
        loss_average: str | None = "batch",
        lr_cov: float | Callable[[int], float] = 1e-2,
        structures: tuple[str, str] = ("dense", "dense"),
        kfac_approx: str = "expand",
        warn_unsupported: bool = True,
        kfac_like: bool = False,
        preconditioner_dtype: tuple[torch.dtype | None, torch.dtype | None] = (None, None),
        init_grad_scale: float = 1.0,
        normalize_lr_cov: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"SINGD(model, ...): model must be an nn.Module, got {type(model)}")
        if isinstance(model, nn.DataParallel) and len(model.device_ids or ()) > 1:
            raise TypeError(
                "nn.DataParallel runs copies of the layers, which SINGD's hooks cannot see; "
                "use DistributedDataParallel (one process per device) instead"
            )
        self.model = model
        self.warn_unsupported = warn_unsupported
        self.init_grad_scale = float(init_grad_scale)
        self.process_group: Any = _distributed.WORLD
        self._groups: list[_Group] = []
        self._layer_group: dict[str, int] = {}
        self._layer_info: dict[str, LayerInfo] = {}
        self._layer_module: dict[str, nn.Module] = {}
        self._hooks: list = []
        # K K^T and C C^T per layer between factor updates (T > 1); derived from K and C,
        # so not checkpointed (recomputed, bit-identically, after a load)
        self._products: dict[str, dict[str, Any]] = {}
        weakref.finalize(self, _remove_hooks, self._hooks)  # no hooks outlive the optimizer
        self._reached: dict[str, list[tuple[Tensor, Tensor]]] = {}  # (x, dL/dz) per call
        self._parts: dict[str, list[_Part]] = {}
        self._backward_callback_queued = False
        # the scale the stored statistics are divided by; the exact one is applied at step
        self._statistics_scale = self.init_grad_scale
        self._explicit_grad_scale: float | Tensor | None = None
        if params is None:
            params = _default_parameters(model, warn_unsupported)
            if not params:
                raise ValueError(
                    f"{type(model).__name__} has no supported layer (nn.Linear, nn.Conv1d, "
                    "nn.Conv2d) with a weight that requires grad; nothing for SINGD to train"
                )
        defaults = dict(
            lr=lr, momentum=momentum, damping=damping, alpha1=alpha1,
            weight_decay=weight_decay, T=T, loss_average=loss_average, lr_cov=lr_cov,
            structures=tuple(structures), kfac_approx=kfac_approx, kfac_like=kfac_like,
            preconditioner_dtype=(None, None) if preconditioner_dtype is None
            else tuple(preconditioner_dtype),
            normalize_lr_cov=normalize_lr_cov,
        )
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (torch.optim semantics); its layers get state and hooks."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        try:
            self._groups.append(self._build_group(index, self.param_groups[index]))
        except Exception:
            self.param_groups.pop()
            raise

    def _build_group(self, index: int, group: dict[str, Any]) -> _Group:
        T = group["T"]
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"param group {index}: T must be a positive int, got {T!r}")
        for entry in ("structures", "preconditioner_dtype"):
            group[entry] = tuple(group[entry]) if group[entry] is not None else (None, None)
        names = {id(p): k for k, p in self.model.named_parameters()}
        owner = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        keys = {id(p): names.get(id(p), f"param_groups[{index}][{i}]")
                for i, p in enumerate(group["params"])}

        layers = []
        for name, mod in _supported_modules(self.model):
            w_group = owner.get(id(mod.weight))
            b_group = None if mod.bias is None else owner.get(id(mod.bias))
            if index not in (w_group, b_group):
                continue
            if w_group is not None and b_group is not None and w_group != b_group:
                raise ValueError(
                    f"layer {name!r} is split across param groups (weight in group {w_group}, "
                    f"bias in group {b_group}); SINGD preconditions [W | b] jointly, so put "
                    "a layer's weight and bias in the same param group"
                )
            if w_group != index:
                continue  # a bias whose weight this optimizer does not train: no layer
            if any(l.weight == keys[id(mod.weight)] for l in layers):
                raise ValueError(
                    f"layer {name!r}: its weight is shared with another supported layer; "
                    "SINGD needs one layer per weight (call one module several times instead)"
                )
            layers.append(describe(name, mod, keys))
        layers = tuple(layers)

        params = {keys[id(p)]: p for p in group["params"]}
        tx = self._transform(group, layers, group["alpha1"])
        state = tx.init({k: p.detach() for k, p in params.items()})
        for k, p in params.items():
            self.state[p]["momentum_buffer"] = state.velocity[k]
        for info in layers:
            self._store_factors(self.state[params[info.weight]], state.factors[info.name],
                                state.momenta.get(info.name))
        group.setdefault("step", 0)

        modules = dict(self.model.named_modules())
        for info in layers:
            self._layer_group[info.name] = index
            self._layer_info[info.name] = info
            self._layer_module[info.name] = modules[info.name]
            hook = _CaptureHook(self, info.name, modules[info.name])
            self._hooks.append(modules[info.name].register_forward_hook(hook))
        return _Group(layers, params, _locked(group), bool(state.momenta))

    @staticmethod
    def _transform(group: dict[str, Any], layers: tuple[LayerInfo, ...], alpha1
                   ) -> GradientTransformation:
        """The pure core for ``layers`` with the group's static entries.

        The numbers are passed again at every step (HyperParams); ``alpha1`` here only
        decides whether the transform keeps Riemannian momenta (alpha1 != 0).
        """
        return singd(
            layers,
            lr=group["lr"], momentum=group["momentum"], damping=group["damping"],
            alpha1=alpha1, weight_decay=group["weight_decay"], lr_cov=group["lr_cov"],
            structures=group["structures"], kfac_approx=group["kfac_approx"],
            loss_average=group["loss_average"], kfac_like=group["kfac_like"],
            normalize_lr_cov=group["normalize_lr_cov"],
            preconditioner_dtype=group["preconditioner_dtype"],
            cache_preconditioner=group["T"] > 1,
        )

    @staticmethod
    def _store_factors(state: dict, factors: Factors, momenta: Factors | None) -> None:
        state["K"], state["C"] = factors
        if momenta is not None:
            state["m_K"], state["m_C"] = momenta

    # ----------------------------------------------------------------- capture
    def _record(self, name: str, args, output) -> None:
        """Forward hook body: keep the input, and ask for dL/dz, when statistics are due."""
        if not torch.is_grad_enabled() or not args or not isinstance(output, Tensor):
            return
        if not output.requires_grad:
            return
        group = self.param_groups[self._layer_group[name]]
        if group["step"] % group["T"] != 0:
            return
        # x is held by the hook, which lives in the autograd graph: a forward pass that is
        # never backpropagated keeps nothing alive here
        x = args[0].detach()
        output.register_hook(lambda g: self._on_output_grad(name, x, g))

    def _on_output_grad(self, name: str, x: Tensor, g: Tensor) -> None:
        self._reached.setdefault(name, []).append((x, g.detach()))
        if not self._backward_callback_queued:
            self._backward_callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        """Reduce each layer's calls reached by this backward pass to one part."""
        self._backward_callback_queued = False
        reached, self._reached = self._reached, {}
        with torch.no_grad(), _no_autocast():
            for name, calls in reached.items():
                self._parts.setdefault(name, []).append(self._part(name, calls))

    def _part(self, name: str, calls: list[tuple[Tensor, Tensor]]) -> _Part:
        index = self._layer_group[name]
        group, info = self.param_groups[index], self._layer_info[name]
        state = self._follow_params(index, info)
        capture = LayerCapture(tuple(x for x, _ in calls), tuple(g for _, g in calls))
        stats = layer_statistics(
            info, state["K"], state["C"], capture, kfac_approx=group["kfac_approx"],
            loss_average=group["loss_average"], grad_scale=self._statistics_scale,
        )
        rows, terms = _distributed.counts(
            info, capture, group["kfac_approx"], group["loss_average"]
        )
        return _Part(stats, rows, terms)

    def _follow_params(self, index: int, info: LayerInfo) -> dict:
        """The layer's state, re-cast if the model was moved or cast since it was made."""
        group, grp = self.param_groups[index], self._groups[index]
        w = grp.params[info.weight]
        if self._layer_module[info.name].weight is not w:
            raise RuntimeError(
                f"the weight of layer {info.name!r} is no longer the parameter this optimizer "
                "was built with (a new nn.Parameter was assigned, or the model was converted "
                "with torch.__future__.set_overwrite_module_params_on_conversion(True)); "
                "build the optimizer after changing the model, or change it in place "
                "(model.to(...) with the default settings keeps the parameters)"
            )
        state = self.state[w]
        dtype_K, dtype_C = group["preconditioner_dtype"]
        for key, dtype in (("K", dtype_K), ("m_K", dtype_K), ("C", dtype_C), ("m_C", dtype_C)):
            M = state.get(key)
            dtype = dtype or w.dtype
            if M is not None and (M.dtype != dtype or M.device != w.device):
                state[key] = M.to(dtype=dtype, device=w.device)
        return state

    # -------------------------------------------------------------------- step
    def set_current_grad_scale(self, grad_scale: float | Tensor) -> None:
        """Give the loss scale of the coming :meth:`step` (as the official package).

        Not needed with ``scaler.step(opt)``. Use it when you scale the loss yourself
        (then gradients and statistics are divided by it), or when a GradScaler that
        has unscaled the gradients calls ``step`` from code this optimizer cannot see.
        """
        self._check_first_grad_scale(grad_scale)
        self._explicit_grad_scale = grad_scale

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``Optimizer.zero_grad``; also drops the statistics of finished backward passes."""
        super().zero_grad(set_to_none)
        self._parts = {}

    def step(self, closure: Callable[[], Any] | None = None):
        """One SINGD step; ``closure`` (optional) re-evaluates the loss with grad enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)  # set by GradScaler.step
        if found_inf is not None and float(found_inf) > 0:
            self._drop_statistics()  # GradScaler skips this step; so do the statistics
            self._explicit_grad_scale = None
            return loss
        with torch.no_grad(), _no_autocast():
            for index, grp in enumerate(self._groups):
                for info in grp.layers:
                    self._follow_params(index, info)
            grad_scale, statistics_scale = self._scales(found_inf is not None)
            statistics = self._step_statistics(statistics_scale)
            for index, group in enumerate(self.param_groups):
                self._update_group(index, group, statistics.get(index, {}), grad_scale)
        self._explicit_grad_scale = None
        return loss

    def _scales(self, via_grad_scaler: bool):
        """(scale the gradients carry, scale the captured output gradients carry).

        The second is a callable: it is only looked up when statistics are due.
        """
        explicit = self._explicit_grad_scale
        if not via_grad_scaler:
            s = 1.0 if explicit is None else explicit
            return s, lambda: s
        scale = getattr(self, "grad_scale", None)
        if scale is not None:  # GradScaler did not unscale: both carry its scale
            return scale, lambda: scale
        # scaler.unscale_(opt) divided p.grad in place; dL/dz still carries the scale
        return 1.0, lambda: explicit if explicit is not None else _calling_grad_scaler_scale()

    def _drop_statistics(self) -> None:
        self._parts, self._reached = {}, {}
        self._backward_callback_queued = False

    def _step_statistics(self, statistics_scale) -> dict[int, dict[str, LayerStatistics]]:
        """Per due group, per layer with a gradient: its accumulated (and reduced) statistics."""
        parts = self._parts
        self._drop_statistics()
        ratio = None
        if any(parts.values()):
            scale = statistics_scale()
            if scale is None:
                raise RuntimeError(
                    "SINGD.step: the gradients were unscaled (scaler.unscale_(opt)) but the "
                    "loss scale is unknown: call opt.set_current_grad_scale(scaler.get_scale()) "
                    "before scaler.step(opt)"
                )
            scale = float(scale)
            if scale != self._statistics_scale:
                ratio = (self._statistics_scale / scale) ** 2
            self._statistics_scale = scale

        entries, where = [], []
        for index, group in enumerate(self.param_groups):
            if group["step"] % group["T"] != 0:
                continue
            grp = self._groups[index]
            for info in grp.layers:
                layer_parts = parts.get(info.name)
                stats = None
                if layer_parts and grp.params[info.weight].grad is not None:
                    stats = accumulate([p.stats for p in layer_parts], group["loss_average"])
                    if ratio is not None:  # H_C was divided by the expected scale squared
                        stats = LayerStatistics(stats.H_K, stats.H_C * ratio)
                local = _distributed.LocalStatistics(
                    stats,
                    sum(p.rows for p in layer_parts or ()),
                    sum(p.loss_terms for p in layer_parts or ()),
                )
                entries.append((info, local, group["loss_average"]))
                where.append(index)

        process_group = _distributed.resolve_group(self.process_group)
        if process_group is None:
            reduced = [local.stats for _, local, _ in entries]
        else:
            templates = []
            for (info, local, loss_average), index in zip(entries, where):
                state = self.state[self._groups[index].params[info.weight]]
                zeros = LayerStatistics(state["K"].map(torch.zeros_like),
                                        state["C"].map(torch.zeros_like))
                templates.append((zeros, local, loss_average))
            reduced = _distributed.all_reduce_statistics(templates, process_group)

        out: dict[int, dict[str, LayerStatistics]] = {}
        for (info, _, _), index, stats in zip(entries, where, reduced):
            if stats is not None:
                out.setdefault(index, {})[info.name] = stats
        return out

    def _update_group(self, index: int, group: dict, statistics: dict, grad_scale) -> None:
        grp = self._groups[index]
        locked = _locked(group)
        if locked != grp.locked:
            raise ValueError(
                f"param group {index}: {dict(zip(_LOCKED, locked))} changed after the "
                f"optimizer was built (was {dict(zip(_LOCKED, grp.locked))}); the factors "
                "cannot change structure: build a new optimizer instead"
            )
        active = tuple(l for l in grp.layers if grp.params[l.weight].grad is not None)
        layer_keys = {k for l in grp.layers for k in l.params}
        keys = [k for l in active for k in l.params]
        keys += [k for k, p in grp.params.items() if k not in layer_keys and p.grad is not None]
        if not keys:
            group["step"] += 1
            return
        for k in keys:
            p, st = grp.params[k], self.state[grp.params[k]]
            v = st["momentum_buffer"]
            if v.dtype != p.dtype or v.device != p.device:
                st["momentum_buffer"] = v.to(dtype=p.dtype, device=p.device)

        # a frozen bias beside a trained weight: a zero column in G, and no update
        no_grad = {k for k in keys if grp.params[k].grad is None}
        grads = {k: torch.zeros_like(grp.params[k]) if k in no_grad else grp.params[k].grad
                 for k in keys}
        params = {k: grp.params[k].detach() for k in keys}
        layer_state = {l.name: self.state[grp.params[l.weight]] for l in active}
        factors = {n: Factors(s["K"], s["C"]) for n, s in layer_state.items()}
        state = SINGDState(
            count=torch.tensor(group["step"]),
            factors=factors,
            momenta={n: Factors(s["m_K"], s["m_C"]) for n, s in layer_state.items() if "m_K" in s},
            velocity={k: self.state[grp.params[k]]["momentum_buffer"] for k in keys},
            fallback=(),
            products=self._cached_products(factors) if group["T"] > 1 else {},
        )
        statistics = {n: s for n, s in statistics.items() if n in layer_state}
        updates, new = self._group_transform(grp, group, active).update(
            grads, state, params,
            statistics=statistics or None,
            hyperparams=self._hyperparams(index, group, grp, due=bool(statistics)),
            grad_scale=grad_scale,
        )
        for k in keys:
            if k in no_grad:
                continue
            p = grp.params[k]
            p.add_(updates[k].to(p.dtype))
            self.state[p]["momentum_buffer"] = new.velocity[k]
        for name, st in layer_state.items():
            self._store_factors(st, new.factors[name], new.momenta.get(name))
        self._products.update(new.products)
        group["step"] += 1

    def _cached_products(self, factors: dict[str, Factors]) -> dict[str, dict[str, Any]]:
        """K K^T and C C^T of each layer, recomputed where missing or out of date."""
        out = {}
        for name, (K, C) in factors.items():
            cached = self._products.get(name)
            fresh = cached is not None and all(
                cached[k].dtype == M.dtype and cached[k].device == M.device
                for k, M in (("K", K), ("C", C)) if k in cached
            )
            out[name] = cached if fresh else outer_products(K, C)
        return out

    def _group_transform(self, grp: _Group, group: dict, active: tuple[LayerInfo, ...]):
        key = (tuple(l.name for l in active), tuple(repr(group[e]) for e in _STATIC))
        tx = grp.transforms.get(key)
        if tx is None:
            alpha1 = 0.5 if grp.keeps_momenta else 0.0
            tx = grp.transforms[key] = self._transform(group, active, alpha1)
        return tx

    @staticmethod
    def _hyperparams(index: int, group: dict, grp: _Group, due: bool) -> HyperParams:
        """The group's numbers now (lr_cov is only evaluated when the factors update)."""
        lr_cov = group["lr_cov"]
        alpha1 = None
        if grp.keeps_momenta:
            alpha1 = group["alpha1"]
        elif not group["kfac_like"] and group["alpha1"] != 0:
            raise ValueError(
                f"param group {index} was built with alpha1=0 (no Riemannian momenta kept); "
                "it cannot be raised later: build the optimizer with alpha1 > 0"
            )
        return HyperParams(
            lr=group["lr"], momentum=group["momentum"], damping=group["damping"],
            alpha1=alpha1, weight_decay=group["weight_decay"],
            lr_cov=(lr_cov(group["step"]) if callable(lr_cov) else lr_cov) if due else None,
        )

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's format, holding only tensors and plain Python values.

        Structured factors are saved as ``{"structure": name, "tensors": [...]}``, so
        ``torch.load(..., weights_only=True)`` reads the checkpoint. A callable
        ``lr_cov`` is saved as None (the optimizer you load into keeps its own).
        """
        packed = super().state_dict()
        groups = []
        for g in packed["param_groups"]:
            g = dict(g)
            if callable(g["lr_cov"]):
                g["lr_cov"] = None
            groups.append(g)
        state = {
            i: {k: _pack(v) for k, v in st.items()} for i, st in packed["state"].items()
        }
        return {"state": state, "param_groups": groups,
                "singd": {"statistics_scale": self._statistics_scale}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict` output; the argument is not modified (tensors are copied)."""
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            raise ValueError(
                "the loaded state dict has different param groups (number or sizes) than this "
                "optimizer; build the optimizer with the same model and params as the saved one"
            )
        id_map = {i: p for s, g in zip(saved_groups, self.param_groups)
                  for i, p in zip(s["params"], g["params"])}
        state: defaultdict[Tensor, dict] = defaultdict(dict)
        for i, st in state_dict["state"].items():
            p = id_map[i]
            state[p] = {k: _unpack(v, p.device) for k, v in st.items()}
        groups = []
        for saved, current in zip(saved_groups, self.param_groups):
            if saved.get("lr_cov") is None and current["lr_cov"] is not None:
                saved["lr_cov"] = current["lr_cov"]  # a callable is not saved
            saved["params"] = current["params"]
            groups.append(saved)

        for index, (grp, group) in enumerate(zip(self._groups, groups)):
            for info in grp.layers:
                st = state[grp.params[info.weight]]
                for key, name in (("K", group["structures"][0]), ("C", group["structures"][1])):
                    M = st.get(key)
                    if M is None or M.name != _structures.get(name).name:
                        raise ValueError(
                            f"param group {index}, layer {info.name!r}: the state dict has no "
                            f"{key} of structure {name!r}; it was saved from another model or "
                            "optimizer configuration"
                        )
            grp.locked = _locked(group)
            grp.keeps_momenta = all("m_K" in state[grp.params[l.weight]] for l in grp.layers) \
                and bool(grp.layers)
            grp.transforms.clear()
        self._products = {}
        self.__setstate__({"state": state, "param_groups": groups})
        self._statistics_scale = float(
            state_dict.get("singd", {}).get("statistics_scale", self.init_grad_scale)
        )
        self._drop_statistics()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


# ---------------------------------------------------------------------- helpers
def _locked(group: dict) -> tuple:
    return tuple(tuple(v) if isinstance(v, list) else v for v in (group[e] for e in _LOCKED))


def _supported_modules(model: nn.Module):
    """(name, module) of every module the core supports (layers.find_layers' rule)."""
    for name, mod in model.named_modules():
        if type(mod) in SUPPORTED and isinstance(mod.weight, Tensor):
            yield name, mod


def _default_parameters(model: nn.Module, warn_unsupported: bool) -> list[Tensor]:
    """``params=None``: the trainable parameters of supported layers; warn about the rest."""
    chosen: dict[int, Tensor] = {}
    for _, mod in _supported_modules(model):
        if not mod.weight.requires_grad:
            continue
        for p in (mod.weight, mod.bias):
            if p is not None and p.requires_grad:
                chosen.setdefault(id(p), p)
    left_out = [k for k, p in model.named_parameters() if p.requires_grad and id(p) not in chosen]
    if left_out and warn_unsupported:
        warnings.warn(
            f"SINGD(params=None) trains only the parameters of supported layers (nn.Linear, "
            f"nn.Conv1d, nn.Conv2d); these trainable parameters will NOT be trained: "
            f"{', '.join(left_out)}. Pass them explicitly in `params` (they then get SINGD's "
            "heavy-ball step without preconditioner), train them with another optimizer, or "
            "silence this with warn_unsupported=False",
            stacklevel=3,
        )
    return list(chosen.values())


def _pack(value):
    """A state value with structured matrices as plain ``{"structure", "tensors"}`` dicts."""
    if isinstance(value, _structures.StructuredMatrix):
        return {"structure": value.name, "tensors": list(value.leaves)}
    return value


def _unpack(value, device):
    """Inverse of :func:`_pack`, copying every tensor onto ``device``."""
    if isinstance(value, dict) and set(value) == {"structure", "tensors"}:
        leaves = (t.to(device, copy=True) for t in value["tensors"])
        return _structures.get(value["structure"])(*leaves)
    if isinstance(value, Tensor):
        return value.to(device, copy=True)
    return copy.deepcopy(value)


def _no_autocast() -> contextlib.ExitStack:
    """Statistics and updates run in the factors' dtypes, whatever autocast region is open."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", enabled=False))
    if torch.cuda.is_available():
        stack.enter_context(torch.autocast("cuda", enabled=False))
    return stack


def _calling_grad_scaler_scale() -> Tensor | None:
    """The scale of the ``torch.amp.GradScaler`` whose ``step`` is calling ours, if any.

    After ``scaler.unscale_(opt)`` a GradScaler hands ``grad_scale=None`` to optimizers
    that handle scaling themselves, because their gradients are unscaled already. Our
    captured output gradients are not, so we read the scale (``update()`` has not run
    yet, so it is the one the backward pass used) from the calling GradScaler.
    """
    frame = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            return None
        scaler = frame.f_locals.get("self")
        if isinstance(scaler, torch.amp.GradScaler) and frame.f_code.co_name == "step":
            return scaler._get_scale_async()
        frame = frame.f_back
    return None


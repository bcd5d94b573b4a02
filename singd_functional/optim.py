"""The drop-in face: :class:`SINGD`, a ``torch.optim.Optimizer`` over the pure core.

It computes nothing itself. Per step::

    forward hooks (steps with t % T == 0, grad enabled)  layer inputs x         _recording
    tensor hooks on the layer outputs                     dL/dz                 _recording
    end of every backward pass                            statistics.layer_statistics (one part)
    step: statistics.accumulate over the parts, [_distributed.all_reduce_statistics],
          transform.singd(...).update  ->  p.add_(update)                       _step

The group/layer mapping is held by one record per param group and per layer
(``_groups``); loss scales by ``_amp``; checkpoints by ``_checkpoint``.
Statistics are reduced to H_K, H_C as each backward pass ends, so accumulating k
micro-batches holds no activations beyond the pass that is running.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from . import _checkpoint, _compile, _distributed, _fsdp, _options, _recording, _step
from ._groups import (
    Group,
    all_layers,
    build_group,
    default_parameters,
    not_preconditioned,
    remove_hooks,
)
from ._official_compat import OfficialNames
from ._types import LossAverage, Params, PreconditionerDtype, Structures
from .guard import SkipCounter
from .layers import LayerInfo, describe, summary

_log = logging.getLogger("singd_functional")


class SINGD(OfficialNames, torch.optim.Optimizer):
    r"""SINGD / IKFAC (Lin et al., ICML 2024) as a ``torch.optim.Optimizer``.

    Same constructor and numbers as the official package's ``singd.optim.optimizer.SINGD``
    (docs/algorithm.md); a one-line import change switches. Use it like any optimizer::

        opt = SINGD(model, lr=1e-3, T=10)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

    On steps with ``t % T == 0`` it records, with module hooks, the inputs and output
    gradients of every layer of the layer rule (:mod:`singd_functional.layers`:
    ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, their subclasses and registered kinds;
    the same rule as :func:`~singd_functional.find_layers`) during ``backward`` and
    updates the preconditioner factors K, C; every step it moves the parameters along
    the preconditioned heavy-ball direction. All arithmetic is the pure core's
    (:func:`singd_functional.singd`). ``opt.layers`` and ``opt.describe()`` say what is
    preconditioned; a one-line summary is logged at INFO to the ``"singd_functional"``
    logger when it is built.

    Args:
        model: the model whose supported layers are preconditioned (may be wrapped in
            ``DistributedDataParallel``).
        params: None (all parameters of the layers that require grad; other
            trainable parameters are NOT trained and, with ``warn_unsupported``, named
            in one warning), or parameters / param groups as for any optimizer. A
            group may set any hyperparameter below, including ``structures``, ``T``,
            ``kfac_approx``, ``loss_average``, ``preconditioner_dtype``, ``kfac_like``,
            ``normalize_lr_cov``. A layer's weight and bias must be in the same group.
            Parameters outside the layers that you pass explicitly get SINGD's
            heavy-ball step with an identity preconditioner (SGD with momentum and
            coupled weight decay, same ``lr``, ``momentum``, ``weight_decay``); with
            ``warn_unsupported`` they are named in one warning.
        lr, momentum, damping, alpha1, weight_decay: beta2, alpha2, lambda, alpha1,
            gamma of the paper; read from ``param_groups`` at every step, so every
            ``torch.optim.lr_scheduler`` works.
        T: update the preconditioner every T steps (statistics are only captured then).
        loss_average: None (sum loss), ``"batch"``, ``"batch+sequence"`` or a count:
            what the differentiated loss averages over.
        lr_cov: beta1, a float or a callable of the step t (a Python int from 0). A
            callable is not saved by :meth:`state_dict`; the optimizer you load into
            keeps its own.
        structures: (K, C) structure names (``singd_functional.structures``); one name
            (``"dense"``) means both.
        kfac_approx: ``"expand"`` or ``"reduce"``.
        warn_unsupported: see ``params``.
        kfac_like: IKFAC instead of SINGD (alpha1 is then 0).
        preconditioner_dtype: dtypes of (K and m_K, C and m_C); None = the weight's.
        init_grad_scale: the loss scale expected in the first backward pass when a
            ``torch.amp.GradScaler`` is used (statistics are stored divided by the
            expected scale, which keeps low-precision factors finite; the exact scale
            of each step is removed at ``step``).
        normalize_lr_cov: rho = (1 - alpha1)/2 and beta1 / max(1, max|m|).
        split_work: under replicated data parallelism (DDP or an unwrapped model), do
            each layer's factor update and preconditioning on one process only (chosen
            by a cost model) and exchange the results in one ``all_gather`` per step
            (per param group); every process still ends each step with the same
            parameters and state.
            Pays for wide dense layers and small T (docs/distributed.md).
        compile: compile SINGD's own per-layer functions (the factor update and the
            preconditioned direction, one graph per layer shape and structure) with
            ``torch.compile(fullgraph=True, dynamic=False)``; the model is not
            compiled. The first step of each kind compiles (seconds to minutes on a
            CPU, docs/compile.md: when it pays); changing hyperparameters do not
            recompile. If compiling fails, one warning names the reason and the
            optimizer runs eager, with the same numbers.

    Non-finite steps: a step whose gradients or Kronecker statistics hold a NaN or an
    inf (one bad input row, a NaN loss, one bad micro-batch, an activation whose square
    overflows) changes nothing: parameters, K, C, m_K, m_C and momentum buffers stay
    as they were, with or without a GradScaler. The decision is taken on the device
    (no host synchronisation; under DDP it is the same on every process);
    ``opt.skipped_steps`` counts such steps and the first one is warned about (at the
    next step). ``param_groups[i]["step"]`` counts every call of :meth:`step`, skipped
    ones included: it schedules T and ``lr_cov(t)``, so a skipped statistics step is
    not redone at the next step. The ``p.grad`` of a skipped step reads 0 after it (the
    step zeroes non-finite gradients in place rather than copying every gradient).

    GradScaler: use it as with any optimizer, ``scaler.step(opt)``, with or without
    ``scaler.unscale_(opt)`` before (e.g. to clip gradients). Steps it finds non-finite
    are skipped as above, and the statistics of that backward pass are dropped. The
    scale is removed from the gradients and from H_C (divided by s^2). After
    ``scaler.unscale_(opt)`` the scale of the recorded output gradients is no longer
    known to the optimizer: add ``opt.set_current_grad_scale(scaler.get_scale())``
    before ``scaler.step(opt)`` (the official package requires the same line); a step
    that needs it and lacks it raises before changing anything.

    Statistics follow gradients: they accumulate over all backward passes since the
    last :meth:`step` or :meth:`zero_grad` (docs/algorithm.md#gradient-accumulation).

    Multi-process: when ``torch.distributed`` is initialised with more than one
    process, the statistics are all-reduced (one flat buffer per step) over
    ``opt.process_group`` (default: the world group; set it to None to train each
    process on its own). A model wrapped in ``DistributedDataParallel`` or sharded with
    ``fully_shard`` (FSDP2, HSDP) comes with averaged gradients. For an unwrapped model
    the step reduces ``p.grad`` itself, in the same collective, as the official package
    does: averaged for a mean loss, summed for a sum loss (``loss_average=None``); the
    processes then train as one on the concatenated batch. Set
    ``opt.reduce_gradients = False`` when something else reduces them (e.g. a DDP
    wrapper you did not pass to SINGD), True to force it. docs/distributed.md says what
    travels in each mode.

    A layer without gradient in a step (unused, frozen) is skipped; its state is kept.
    Moving or casting the model after construction (``model.to(...)``) is fine: the
    state follows the parameters' device and dtype (and ``preconditioner_dtype``).
    """

    _step_supports_amp_scaling = True  # GradScaler passes grad_scale / found_inf to step

    def __init__(
        self,
        model: nn.Module,
        params: Params | None = None,
        lr: float = 1e-3,
        momentum: float = 0.9,
        damping: float = 1e-3,
        alpha1: float = 0.5,
        weight_decay: float = 0.0,
        T: int = 10,
        loss_average: LossAverage = "batch",
        lr_cov: float | Callable[[int], float] = 1e-2,
        structures: str | Structures = ("dense", "dense"),
        kfac_approx: str = "expand",
        warn_unsupported: bool = True,
        kfac_like: bool = False,
        preconditioner_dtype: PreconditionerDtype = (None, None),
        init_grad_scale: float = 1.0,
        normalize_lr_cov: bool = False,
        split_work: bool = False,
        compile: bool = False,
    ):
        # the compiled per-layer functions, shared by all param groups (None: eager)
        self._kernels = _compile.Kernels() if _options.check_compile(compile) else None
        if not isinstance(model, nn.Module):
            raise TypeError(f"SINGD(model, ...): model must be an nn.Module, got {type(model)}")
        if isinstance(model, nn.DataParallel) and len(model.device_ids or ()) > 1:
            raise TypeError(
                "nn.DataParallel runs copies of the layers, which SINGD's hooks cannot see; "
                "use DistributedDataParallel (one process per device) instead"
            )
        self.model = model
        self.warn_unsupported = warn_unsupported
        self.init_grad_scale = _options.check_init_grad_scale(init_grad_scale)
        self.process_group: Any = _distributed.WORLD
        self.reduce_gradients: bool | None = None  # None: when the model is unwrapped
        self.split_work = bool(split_work)
        self._split_owners: tuple[int, dict[str, int]] | None = None  # (world, owners)
        # one record per param group (same index), holding its layers: the single source
        # of the group/layer mapping and of what the hooks recorded
        self._groups: list[Group] = []
        self._kind_hooks: dict[int, Any] = {}  # id(module) -> its KindHook (kinds with forward)
        self._unrecorded: set[str] = set()  # layers warned about: gradients, no statistics
        weakref.finalize(self, remove_hooks, self._groups)  # no hooks outlive the optimizer
        self._backward_callback_queued = False
        # the scale the stored statistics are divided by; the exact one is applied at step
        self._statistics_scale = self.init_grad_scale
        self._explicit_grad_scale: float | Tensor | None = None
        # skipping non-finite steps (guard.py); False only to measure what it costs
        self._guard = True
        self._skips = SkipCounter()
        explicit = params is not None
        if params is None:
            params = default_parameters(model, warn_unsupported)
            if not params:
                raise ValueError(
                    f"{type(model).__name__} has no layer SINGD preconditions (nn.Linear, "
                    "nn.Conv1d, nn.Conv2d, their subclasses or a registered kind) with a "
                    "weight that requires grad; nothing for SINGD to train"
                )
        defaults = dict(
            lr=lr, momentum=momentum, damping=damping, alpha1=alpha1,
            weight_decay=weight_decay, T=T, loss_average=loss_average, lr_cov=lr_cov,
            structures=_options.pair(structures, "structures", "structure name"),
            kfac_approx=kfac_approx, kfac_like=kfac_like,
            preconditioner_dtype=_options.pair(preconditioner_dtype, "preconditioner_dtype",
                                               "dtype"),
            normalize_lr_cov=normalize_lr_cov,
        )
        super().__init__(params, defaults)
        if self.split_work and any(_fsdp.is_sharded(p) for g in self.param_groups
                                   for p in g["params"]):
            raise ValueError(
                "split_work=True is for replicated data parallelism (DDP or an unwrapped "
                "model); a fully_shard model already shares the step by row shards: "
                "drop split_work"
            )
        for layer in all_layers(self._groups):
            named = self._groups[layer.group].params  # not `params`: the argument above
            _fsdp.check_shardable(layer.info, named, self.state[named[layer.info.weight]]["K"])
        plain = not_preconditioned(self)
        if explicit and plain and warn_unsupported:
            warnings.warn(
                f"SINGD: these parameters are not in a preconditioned layer and get SINGD's "
                f"heavy-ball step with an identity preconditioner (SGD with momentum): "
                f"{', '.join(plain)}. opt.describe() lists the preconditioned layers; "
                "silence this with warn_unsupported=False",
                stacklevel=2,
            )
        _log.info("SINGD: %s; %d parameter tensors without preconditioner",
                  summary(self.layers), len(plain))

    @property
    def layers(self) -> tuple[LayerInfo, ...]:
        """The preconditioned layers of every param group (the rule of ``find_layers``)."""
        return tuple(layer.info for layer in all_layers(self._groups))

    def describe(self) -> str:
        """A table of the preconditioned layers with their group's structures, and the rest."""
        structures = {layer.name: self.param_groups[layer.group]["structures"]
                      for layer in all_layers(self._groups)}
        table = describe(self.layers, structures)
        plain = not_preconditioned(self)
        if plain:
            table += "\nnot preconditioned (SGD with momentum): " + ", ".join(plain)
        return table

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (torch.optim semantics); its layers get state and hooks."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        try:
            self._groups.append(build_group(self, index, self.param_groups[index]))
        except Exception:
            self.param_groups.pop()
            raise

    @property
    def skipped_steps(self) -> Tensor:
        """How many steps were skipped for non-finite gradients or statistics (0-d int64
        tensor on the parameters' device; reading its value waits for the device)."""
        count = self._skips.count
        return torch.zeros((), dtype=torch.int64) if count is None else count

    def set_current_grad_scale(self, grad_scale: float | Tensor) -> None:
        """Give the loss scale of the coming :meth:`step` (as the official package).

        Needed after ``scaler.unscale_(opt)``: add
        ``opt.set_current_grad_scale(scaler.get_scale())`` before ``scaler.step(opt)``.
        Also for a loss you scale yourself (gradients and statistics are then divided
        by it). Not needed with a plain ``scaler.step(opt)``. It holds for one step.
        """
        self._check_first_grad_scale(grad_scale)
        self._explicit_grad_scale = grad_scale

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``Optimizer.zero_grad``; also drops the statistics of finished backward passes."""
        super().zero_grad(set_to_none)
        _recording.drop_parts(self)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SINGD step; ``closure`` (optional) re-evaluates the loss with grad enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _step.step(self)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's format, holding only tensors and plain Python values.

        Structured factors are saved as ``{"structure": name, "tensors": [...]}``, so
        ``torch.load(..., weights_only=True)`` reads the checkpoint. A callable
        ``lr_cov`` is saved as None (the optimizer you load into keeps its own).
        """
        return _checkpoint.pack(self, super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict` output; the argument is not modified (tensors are copied)."""
        _checkpoint.load(self, state_dict)

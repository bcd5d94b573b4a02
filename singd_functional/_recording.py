"""The drop-in face's recording of layer inputs and output gradients (private).

On steps with ``t % T == 0`` (grad enabled) a forward hook keeps each preconditioned
layer's input x and registers a tensor hook on its output that receives dL/dz. When a
backward pass ends, every layer it reached is reduced to one :class:`Part`
(``statistics.layer_part``: the statistics with their row / loss-term counts), so accumulating k
micro-batches holds no activations beyond the pass that is running. ``step`` takes the
parts of all passes since the last step (``_step.py``).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import Tensor

from ._groups import Layer, all_layers, follow_params
from ._options import check_T
from .capture import LayerCapture
from .layers import layer_kind
from .statistics import LayerStatistics, StatisticsPart, accumulate, layer_part

Part = StatisticsPart  # one backward pass's contribution to one layer's statistics


class CaptureHook:
    """Forward hook of one layer.

    It holds the optimizer and its layer record weakly and only acts for that very
    module, so a deep copy or a pickle of the model (which copy the hook) never feeds
    statistics into the optimizer; copies are inert.
    """

    def __init__(self, optimizer, layer: Layer):
        self.optimizer = weakref.ref(optimizer)
        self.layer = weakref.ref(layer)
        self.name = layer.name

    def __call__(self, module, args, output):
        opt, layer = self.optimizer(), self.layer()
        if opt is not None and layer is not None and module is layer.module:
            record(opt, layer, args, output)

    def __getstate__(self):
        return {"name": self.name}

    def __setstate__(self, state):
        self.name = state["name"]
        self.optimizer = self.layer = _dead


def _dead():
    return None


def record(optimizer, layer: Layer, args, output) -> None:
    """Forward hook body: keep the input, and ask for dL/dz, when statistics are due."""
    if not torch.is_grad_enabled() or not args or not isinstance(output, Tensor):
        return
    if not output.requires_grad:
        return
    group = optimizer.param_groups[layer.group]
    check_T(f"param group {layer.group} (layer {layer.name!r})", group["T"])
    if group["step"] % group["T"] != 0:
        return
    # x is held by the hook, which lives in the autograd graph: a forward pass that is
    # never backpropagated keeps nothing alive here
    x = args[0].detach()
    ref = weakref.ref(optimizer)
    output.register_hook(lambda g: _on_output_grad(ref, layer, x, g))


class KindHook:
    """Forward hook (with kwargs) of a module whose kind taps its layers itself.

    On steps that record, it runs the kind's ``forward`` again with taps that keep each
    due layer's input and ask for its output gradient, and returns that output in place
    of the module's (same values; the module's own output is dropped, so such a module
    computes its forward twice on recording steps only). Copies are inert, as with
    :class:`CaptureHook`.
    """

    def __init__(self, optimizer, module):
        self.optimizer = weakref.ref(optimizer)
        self.module = weakref.ref(module)
        self.layers: list = []

    def add(self, layer: Layer) -> None:
        self.layers.append(weakref.ref(layer))

    def __call__(self, module, args, kwargs, output):
        opt = self.optimizer()
        if opt is None or module is not self.module() or not torch.is_grad_enabled():
            return None
        due = [layer for layer in (r() for r in self.layers) if layer is not None
               and opt.param_groups[layer.group]["step"] % opt.param_groups[layer.group]["T"] == 0]
        if not due:
            return None
        by_name = {layer.name: layer for layer in due}
        ref = weakref.ref(opt)

        def tap(name, a, z):
            layer = by_name.get(name)
            if layer is not None and isinstance(z, Tensor) and z.requires_grad:
                x = a.detach()
                z.register_hook(lambda g: _on_output_grad(ref, layer, x, g))
            return z

        forward = layer_kind(due[0].info).forward
        return forward(module, tuple(layer.info for layer in due), tap, args, kwargs)

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.optimizer = self.module = _dead
        self.layers = []


def _on_output_grad(ref, layer: Layer, x: Tensor, g: Tensor) -> None:
    optimizer = ref()
    if optimizer is None:
        return
    layer.reached.append((x, g.detach()))
    if not optimizer._backward_callback_queued:
        optimizer._backward_callback_queued = True
        torch.autograd.Variable._execution_engine.queue_callback(
            lambda: end_of_backward(optimizer)
        )


def end_of_backward(optimizer) -> None:
    """Reduce each layer's calls reached by this backward pass to one part."""
    optimizer._backward_callback_queued = False
    with torch.no_grad(), no_autocast():
        for layer in all_layers(optimizer._groups):
            if layer.reached:
                calls, layer.reached = layer.reached, []
                layer.parts.append(_part(optimizer, layer, calls))


def _part(optimizer, layer: Layer, calls: list[tuple[Tensor, Tensor]]) -> Part:
    group, info = optimizer.param_groups[layer.group], layer.info
    state = follow_params(optimizer, layer)
    capture = LayerCapture(tuple(x for x, _ in calls), tuple(g for _, g in calls))
    return layer_part(
        info, state["K"], state["C"], capture, kfac_approx=group["kfac_approx"],
        loss_average=group["loss_average"], grad_scale=optimizer._statistics_scale,
    )


def combine(parts: list[Part], loss_average) -> LayerStatistics | None:
    """One layer's statistics of the backward passes ``parts`` (gradient accumulation,
    weighted by their counts; None when every part is empty): what ``step`` uses and
    what ``opt.H_Ks`` / ``opt.H_Cs`` show before it."""
    return accumulate(parts, loss_average)


def has_parts(optimizer) -> bool:
    return any(layer.parts for layer in all_layers(optimizer._groups))


def drop_parts(optimizer) -> None:
    """Forget the statistics of finished backward passes (``zero_grad``)."""
    for layer in all_layers(optimizer._groups):
        layer.parts = []


def drop(optimizer) -> None:
    """Forget everything recorded, including a backward pass that is running."""
    for layer in all_layers(optimizer._groups):
        layer.parts, layer.reached = [], []
    optimizer._backward_callback_queued = False


def take(optimizer) -> dict[str, list[Part]]:
    """The parts per layer name, dropping everything recorded."""
    parts = {layer.name: layer.parts for layer in all_layers(optimizer._groups)}
    drop(optimizer)
    return parts


def no_autocast() -> contextlib.AbstractContextManager:
    """Statistics and updates run in the factors' dtypes, whatever autocast region is open.

    Only an open region is left (entering ``torch.autocast`` costs about as much as a
    small layer's preconditioning op: every step enters this, and most outside autocast).
    """
    cuda = torch.cuda.is_available() and torch.is_autocast_enabled("cuda")
    if not (cuda or torch.is_autocast_enabled("cpu")):
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", enabled=False))
    if cuda:
        stack.enter_context(torch.autocast("cuda", enabled=False))
    return stack

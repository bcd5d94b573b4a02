"""Stage 2 of the data path: capture layer inputs and output gradients with torch.func.

:func:`make_capture` turns ``(model, loss_fn, layers)`` into a PURE function::

    loss, grads, captures = capture(params, *inputs, targets)

One ``torch.func.grad`` call gives the loss, the gradient of every entry of
``params`` and, per supported layer, its input activations and the gradient of the
loss w.r.t. its output. The output gradients come from differentiating w.r.t. zero
perturbations added to each layer output; the hooks that add them exist only during
the call (no hook is left behind), so the function composes with ``torch.func.vmap``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .layers import LayerInfo


class LayerCapture(NamedTuple):
    """What one layer saw in one forward/backward pass.

    Attributes:
        inputs: the layer's input per call (a layer called several times in one
            forward pass has several entries), each as the module received it.
        output_grads: dL/dz per call, z the layer output, L the differentiated loss.
    """

    inputs: tuple[Tensor, ...]
    output_grads: tuple[Tensor, ...]


Captures = dict[str, LayerCapture]


@contextmanager
def _perturbing_hooks(model: nn.Module, layers, perturbations, record):
    """Forward hooks that add a perturbation to each layer output and record inputs."""
    handles = []
    modules = dict(model.named_modules())
    try:
        for info in layers:
            calls = []
            record[info.name] = calls

            def hook(mod, args, out, _name=info.name, _calls=calls):
                i = len(_calls)
                _calls.append(args[0])
                if perturbations is None:
                    return None
                return out + perturbations[_name][i]

            handles.append(modules[info.name].register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _output_shapes(model, layers, params, buffers, inputs):
    """Shapes and dtypes of every layer output, per call, from a forward on 'meta'."""

    def meta(t):
        if isinstance(t, Tensor):
            return torch.empty(t.shape, dtype=t.dtype, device="meta")
        return t

    state = {k: meta(v) for k, v in {**dict(model.named_buffers()), **buffers}.items()}
    state.update({k: meta(v) for k, v in params.items()})
    shapes: dict[str, list] = {}
    out_record: dict[str, list] = {info.name: [] for info in layers}

    handles = []
    modules = dict(model.named_modules())
    try:
        for info in layers:

            def hook(mod, args, out, _name=info.name):
                out_record[_name].append((tuple(out.shape), out.dtype))

            handles.append(modules[info.name].register_forward_hook(hook))
        with torch.no_grad():
            functional_call(model, state, tuple(meta(x) for x in inputs))
    finally:
        for h in handles:
            h.remove()
    shapes.update(out_record)
    return shapes


def make_capture(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    layers: tuple[LayerInfo, ...],
) -> Callable[..., tuple[Tensor, dict[str, Tensor], Captures]]:
    """Build the pure capture function for ``model``.

    Args:
        model: the model; only its structure (and, for entries missing from
            ``params``/``buffers``, its tensors) is used. It is not modified.
        loss_fn: ``loss_fn(model_output, targets) -> 0-d tensor``: the loss that is
            differentiated (its reduction decides ``loss_average``).
        layers: from :func:`~singd_functional.find_layers`.

    Returns:
        ``capture(params, *inputs, targets, buffers=None) -> (loss, grads, captures)``:
        ``grads`` maps every key of ``params`` to its gradient, ``captures`` maps
        every layer name to a :class:`LayerCapture`. Works eagerly and under
        ``torch.func.vmap``. A layer that the forward pass never calls is missing
        from ``captures``.
    """
    shape_cache: dict[Any, dict[str, list]] = {}

    def capture(params: Mapping[str, Tensor], *args: Any, buffers=None):
        if len(args) < 2:
            raise TypeError("capture(params, *inputs, targets): give at least one input and the targets")
        *inputs, targets = args
        buffers = {} if buffers is None else dict(buffers)
        params = dict(params)
        key = tuple(
            (tuple(x.shape), x.dtype) if isinstance(x, Tensor) else type(x) for x in inputs
        ) + tuple((k, tuple(v.shape), v.dtype) for k, v in params.items())
        if key not in shape_cache:
            shape_cache[key] = _output_shapes(model, layers, params, buffers, inputs)
        shapes = shape_cache[key]
        anchor = next(iter(params.values()))
        perturbations = {
            name: [torch.zeros(s, dtype=dt, device=anchor.device) for s, dt in calls]
            for name, calls in shapes.items()
        }

        def loss_of(params, perturbations):
            record: dict[str, list] = {}
            with _perturbing_hooks(model, layers, perturbations, record):
                out = functional_call(model, {**buffers, **params}, tuple(inputs))
            loss = loss_fn(out, targets)
            return loss, (loss.detach(), record)

        grads, out_grads, (loss, record) = _grad_and_aux(loss_of, params, perturbations)
        captures = {
            info.name: LayerCapture(tuple(record[info.name]), tuple(out_grads[info.name]))
            for info in layers
            if record.get(info.name)
        }
        return loss, grads, captures

    return capture


def _grad_and_aux(loss_of, params, perturbations):
    (g_params, g_pert), aux = torch.func.grad(loss_of, argnums=(0, 1), has_aux=True)(
        params, perturbations
    )
    return g_params, g_pert, aux

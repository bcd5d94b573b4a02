"""Stage 2 of the data path: capture layer inputs and output gradients with torch.func.

:func:`make_capture` turns ``(model, loss_fn, layers)`` into a PURE function::

    loss, grads, captures = capture(params, *inputs, targets)

One ``torch.func.grad`` call gives the loss, the gradient of every entry of
``params`` and, per supported layer, its input activations and the gradient of the
loss w.r.t. its output. The output gradients come from differentiating w.r.t. zero
perturbations added to each layer output; the hooks that add them exist only during
the call (no hook is left behind), so the function composes with ``torch.func.vmap``.

Two ways to add the perturbations (``method=`` of :func:`make_capture`):

* ``"hooks"``: temporary forward hooks. Works for any model, eagerly and under
  ``vmap``. Under ``torch.compile`` registering a hook is a graph break (dynamo
  cannot trace ``register_forward_hook``), so a compiled step splits there.
* ``"fx"``: the model is traced once with ``torch.fx.symbolic_trace`` and rewritten
  so that the perturbations are an input (added right after each layer call) and the
  layer inputs an extra output. No hooks, no module mutation: the whole step compiles
  with ``fullgraph=True``. The model must be fx-traceable, and Python control flow
  in its ``forward`` (e.g. ``if self.training``) is fixed when it is traced.
* ``"auto"`` (default): ``"hooks"`` eagerly (exactly the behaviour of a plain
  forward), ``"fx"`` while ``torch.compile`` traces the call if the model could be
  traced when :func:`make_capture` was called, else ``"hooks"`` (with the break).

Perturbation shapes come from a forward on the ``'meta'`` device, cached per input
shape; under ``torch.compile`` they come from a forward on the real inputs whose
values are never used (it exists only in the traced program, where it is dead code).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.fx
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

    # every tensor of the model goes to 'meta', also those that `params` leaves out
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    state = {k: meta(v) for k, v in {**own, **buffers, **params}.items()}
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
    return out_record


class _FxProgram(NamedTuple):
    """The model rewritten by :func:`_trace` (see the module docstring).

    Attributes:
        perturbed: ``forward(*inputs, _singd_perturbations=[...]) -> (output,
            layer_inputs)``: each supported layer call's output plus its perturbation,
            and the tuple of the layers' inputs, one per call.
        probe: ``forward(*inputs) -> layer_outputs``: the outputs alone (for shapes).
        calls: the layer name of each call, in execution order.
        keys: names of the parameters and buffers ``perturbed`` holds.
        probe_keys: the same for ``probe`` (a subset).
    """

    perturbed: torch.fx.GraphModule
    probe: torch.fx.GraphModule
    calls: tuple[str, ...]
    keys: frozenset[str]
    probe_keys: frozenset[str]


_PERTURBATIONS = "_singd_perturbations"


def _trace(model: nn.Module, layers: tuple[LayerInfo, ...]) -> _FxProgram:
    """Trace ``model`` with torch.fx and insert the perturbations (no hooks)."""
    names = {info.name for info in layers}

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname in names or super().is_leaf_module(m, qualname)

    source = Tracer().trace(model)
    layer_calls = [n for n in source.nodes if n.op == "call_module" and n.target in names]
    index = {n: i for i, n in enumerate(layer_calls)}

    def rewrite(perturb: bool) -> torch.fx.GraphModule:
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        nodes = list(source.nodes)
        for node in nodes:
            if node.op == "placeholder":
                env[node] = graph.node_copy(node, env.__getitem__)
        # a keyword with a default, so it fits after any signature (defaults, *args)
        pert = graph.placeholder(_PERTURBATIONS, default_value=None) if perturb else None
        recorded, outputs = [], []
        for node in nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                out = torch.fx.map_arg(node.args[0], env.__getitem__)
                graph.output((out, tuple(recorded)) if perturb else tuple(outputs))
                continue
            new = graph.node_copy(node, env.__getitem__)
            if node in index:
                recorded.append(new.args[0])
                outputs.append(new)
                if perturb:
                    p = graph.call_function(operator.getitem, (pert, index[node]))
                    new = graph.call_function(operator.add, (new, p))
            env[node] = new
        graph.lint()
        return torch.fx.GraphModule(model, graph)

    perturbed = rewrite(True)
    probe = rewrite(False)
    probe.graph.eliminate_dead_code()  # the probe stops at the last layer call
    probe.recompile()
    calls = tuple(n.target for n in layer_calls)
    return _FxProgram(perturbed, probe, calls, _state_keys(perturbed), _state_keys(probe))


def _state_keys(module: nn.Module) -> frozenset[str]:
    keys = [k for k, _ in module.named_parameters(remove_duplicate=False)]
    keys += [k for k, _ in module.named_buffers(remove_duplicate=False)]
    return frozenset(keys)


def _fx_output_shapes(program: _FxProgram, state, inputs) -> list:
    """(shape, dtype) of every layer call's output, from the probe on 'meta'."""

    def meta(t):
        if isinstance(t, Tensor):
            return torch.empty(t.shape, dtype=t.dtype, device="meta")
        return t

    full = dict(program.probe.named_parameters())
    full.update(program.probe.named_buffers())
    full.update({k: v for k, v in state.items() if k in program.probe_keys})
    with torch.no_grad():
        outs = functional_call(
            program.probe, {k: meta(v) for k, v in full.items()}, tuple(meta(x) for x in inputs)
        )
    return [(tuple(o.shape), o.dtype) for o in outs]


METHODS = ("auto", "hooks", "fx")


def make_capture(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    layers: tuple[LayerInfo, ...],
    *,
    method: str = "auto",
) -> Callable[..., tuple[Tensor, dict[str, Tensor], Captures]]:
    """Build the pure capture function for ``model``.

    Args:
        model: the model; only its structure (and, for entries missing from
            ``params``/``buffers``, its tensors) is used. It is not modified.
        loss_fn: ``loss_fn(model_output, targets) -> 0-d tensor``: the loss that is
            differentiated (its reduction decides ``loss_average``).
        layers: from :func:`~singd_functional.find_layers`.
        method: ``"auto"``, ``"hooks"`` or ``"fx"``: how the layer outputs are
            perturbed (see the module docstring). ``"fx"`` raises if the model cannot
            be traced with ``torch.fx``; ``"auto"`` then falls back to hooks.

    Returns:
        ``capture(params, *inputs, targets, buffers=None, record_layers=True) ->
        (loss, grads, captures)``: ``grads`` maps every key of ``params`` to its
        gradient, ``captures`` maps every layer name to a :class:`LayerCapture`. Works
        eagerly, under ``torch.func.vmap`` and under ``torch.compile``
        (``fullgraph=True`` with the traced program). A layer that the forward pass
        never calls is missing from ``captures``. ``record_layers=False`` (for steps
        that skip the factor update) is a plain ``torch.func.grad`` of the loss: the
        same loss and gradients, ``captures == {}``, no perturbations or hooks.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    layers = tuple(layers)
    program = None
    if method != "hooks":
        try:
            program = _trace(model, layers)
        except Exception as err:  # fx cannot trace data-dependent control flow etc.
            if method == "fx":
                raise ValueError(
                    f"method='fx': torch.fx could not trace {type(model).__name__} "
                    f"({type(err).__name__}: {err}). Use method='hooks' (or 'auto'), or "
                    "make the model traceable (no Python branches on tensor values)"
                ) from err
    cache: dict[Any, Any] = {}  # perturbation shapes per input / parameter shapes

    def capture(params: Mapping[str, Tensor], *args: Any, buffers=None, record_layers=True):
        if len(args) < 2:
            raise TypeError(
                "capture(params, *inputs, targets): give at least one input and the targets"
            )
        *inputs, targets = args
        buffers = {} if buffers is None else dict(buffers)
        params = dict(params)
        if not record_layers:
            return _loss_and_grads(model, loss_fn, params, buffers, inputs, targets)
        if program is not None and (method == "fx" or torch.compiler.is_compiling()):
            state = {k: v for k, v in buffers.items() if k in program.keys}
            return _capture_fx(program, loss_fn, layers, params, state, inputs, targets, cache)
        key = _shape_key(inputs, params)
        if key not in cache:
            cache[key] = _output_shapes(model, layers, params, buffers, inputs)
        perturbations = _zeros(cache[key], params)

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


def _shape_key(inputs, params):
    return tuple(
        (tuple(x.shape), x.dtype) if isinstance(x, Tensor) else type(x) for x in inputs
    ) + tuple((k, tuple(v.shape), v.dtype) for k, v in params.items())


def _zeros(shapes: dict[str, list], params) -> dict[str, list[Tensor]]:
    anchor = next(iter(params.values()))
    return {
        name: [torch.zeros(s, dtype=dt, device=anchor.device) for s, dt in calls]
        for name, calls in shapes.items()
    }


def _capture_fx(program, loss_fn, layers, params, state, inputs, targets, cache):
    """The body of ``capture`` with the traced program instead of hooks."""
    used = {k: v for k, v in params.items() if k in program.keys}
    if torch.compiler.is_compiling():
        # shapes from a forward on the real inputs; only `.shape` is read, so the
        # compiled program drops that forward as dead code
        probe_state = {k: v for k, v in {**state, **used}.items() if k in program.probe_keys}
        with torch.no_grad():
            outs = functional_call(program.probe, probe_state, tuple(inputs))
        shapes = [(o.shape, o.dtype) for o in outs]
    else:
        key = ("fx", *_shape_key(inputs, params))
        if key not in cache:
            cache[key] = _fx_output_shapes(program, {**state, **used}, inputs)
        shapes = cache[key]
    device = next(iter(params.values())).device
    zeros = [torch.zeros(s, dtype=dt, device=device) for s, dt in shapes]

    def loss_of(used, zeros):
        out, recorded = functional_call(
            program.perturbed, {**state, **used}, tuple(inputs), {_PERTURBATIONS: zeros}
        )
        loss = loss_fn(out, targets)
        return loss, (loss.detach(), recorded)

    g_used, g_zeros, (loss, recorded) = _grad_and_aux(loss_of, used, zeros)
    # a parameter the traced forward never reads has gradient zero (as with hooks)
    grads = {k: g_used[k] if k in g_used else torch.zeros_like(v) for k, v in params.items()}
    per_layer: dict[str, tuple[list, list]] = {}
    for name, x, g in zip(program.calls, recorded, g_zeros):
        xs, gs = per_layer.setdefault(name, ([], []))
        xs.append(x)
        gs.append(g)
    captures = {
        info.name: LayerCapture(tuple(per_layer[info.name][0]), tuple(per_layer[info.name][1]))
        for info in layers
        if info.name in per_layer
    }
    return loss, grads, captures


def _loss_and_grads(model, loss_fn, params, buffers, inputs, targets):
    """``(loss, grads, {})`` with a plain ``torch.func.grad`` (no layer data)."""

    def loss_of(params):
        loss = loss_fn(functional_call(model, {**buffers, **params}, tuple(inputs)), targets)
        return loss, loss.detach()

    grads, loss = torch.func.grad(loss_of, has_aux=True)(params)
    return loss, grads, {}


def _grad_and_aux(loss_of, params, perturbations):
    (g_params, g_pert), aux = torch.func.grad(loss_of, argnums=(0, 1), has_aux=True)(
        params, perturbations
    )
    return g_params, g_pert, aux

"""Stage 2 of the data path: capture layer inputs and output gradients with torch.func.

:func:`make_capture` turns ``(model, loss_fn, layers)`` into a PURE function::

    loss, grads, captures = capture(params, *inputs, targets)

One gradient call gives the loss, the gradient of every entry of ``params`` and,
per supported layer, its input activations and the gradient of the loss w.r.t. its
output: ``torch.func.grad`` under ``vmap`` and ``torch.compile``, plain
``torch.autograd.grad`` on detached copies eagerly (the same numbers, without
functorch's per-tensor wrapping; see ``_differentiate``). The output gradients
come from differentiating w.r.t. zero perturbations added to each layer output;
the hooks that add them exist only during the call (no hook is left behind), so the
function composes with ``torch.func.vmap``.

Two ways to add the perturbations (``method=`` of :func:`make_capture`):

* ``"hooks"``: temporary forward hooks. Works for any model, eagerly and under
  ``vmap``. Under ``torch.compile`` registering a hook is a graph break (dynamo
  cannot trace ``register_forward_hook``), so a compiled step splits there.
* ``"fx"``: the model is traced once with ``torch.fx`` and rewritten so that the
  perturbations are an input (added right after each layer call) and the layer
  inputs an extra output. No hooks, no module mutation: the whole step compiles with
  ``fullgraph=True``. The tracer sees through containers: a module is a leaf only if
  it carries a requested layer or has no requested layer below it (so the
  ``linear1``/``linear2`` of an ``nn.TransformerEncoderLayer`` are traced calls).
  The model must be fx-traceable, Python control flow in its ``forward`` (e.g.
  ``if self.training``) is fixed when it is traced, and the traced calls must cover
  every requested layer.
* ``"auto"`` (default): ``"hooks"`` eagerly (exactly the behaviour of a plain
  forward), ``"fx"`` while ``torch.compile`` traces the call if the model could be
  traced, covering every layer, when :func:`make_capture` was called; else it warns
  once and uses ``"hooks"`` (with the breaks). ``capture.method`` says which.

A layer whose kind has a ``forward`` (:class:`~singd_functional.layers.LayerKind`)
is captured through that function's taps in both methods: with hooks the module's
``forward`` is shadowed for the duration of the call; in the traced program the
module call is replaced by a call of the kind's ``forward``.

Perturbation shapes come from a forward on the ``'meta'`` device, cached per input
shape; under ``torch.compile`` they come from a forward on the real inputs whose
values are never used (it exists only in the traced program, where it is dead code).
"""

from __future__ import annotations

import functools
import operator
import warnings
import weakref
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from .layers import LayerInfo, layer_kind
from .structures._base import _under_transform


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


class _SwapPlan(NamedTuple):
    """Where each tensor of a state goes in a model: ``slots`` are
    ``(store, attribute, state key, original)`` with ``store`` a module's
    ``_parameters`` or ``_buffers``; ``stores`` and ``snapshot`` (every value of every
    module's ``_parameters``, ``_buffers`` and ``_modules``) tell whether the model
    still has the structure the plan was built for."""

    slots: tuple[tuple[dict, str, str, Any], ...]
    stores: tuple[dict, ...]
    snapshot: tuple


# model -> key set -> plan, or None where only functional_call is exact; weak so that
# a plan (which holds no module, only its dicts) never keeps a model alive
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _snapshot(stores) -> tuple:
    return tuple(v for store in stores for v in store.values())


def _swap_plan(model: nn.Module, keys: frozenset[str]) -> _SwapPlan | None:
    """The slots of ``keys`` in ``model``, every alias of a tied tensor included (as
    ``functional_call(..., tie_weights=True)`` fills them), or None where the swap
    would not be exact: a parametrized module, a key that names no tensor of the
    model, or two keys of one tied tensor (functional_call decides those)."""
    modules = list(model.modules())
    if any(parametrize.is_parametrized(m) for m in modules):
        return None
    named: dict[str, Tensor] = {}
    owners: dict[int, dict[tuple[int, str], tuple[dict, str]]] = {}
    for prefix, mod in model.named_modules(remove_duplicate=False):
        for store in (mod._parameters, mod._buffers):
            for attr, t in store.items():
                if t is not None:
                    named[f"{prefix}.{attr}" if prefix else attr] = t
                    owners.setdefault(id(t), {})[(id(store), attr)] = (store, attr)
    given: dict[int, str] = {}
    for key in keys:
        if key not in named or id(named[key]) in given:
            return None
        given[id(named[key])] = key
    slots = tuple(
        (store, attr, key, store[attr])
        for tid, key in given.items()
        for store, attr in owners[tid].values()
    )
    stores = tuple(d for m in modules for d in (m._parameters, m._buffers, m._modules))
    return _SwapPlan(slots, stores, _snapshot(stores))


def _current_plan(model: nn.Module, keys: frozenset[str]) -> _SwapPlan | None:
    plans = _PLANS.setdefault(model, {})
    if keys in plans:
        plan = plans[keys]
        if plan is None:
            return None
        now = _snapshot(plan.stores)
        if len(now) == len(plan.snapshot) and all(
            a is b for a, b in zip(now, plan.snapshot)
        ):
            return plan
    plan = plans[keys] = _swap_plan(model, keys)
    return plan


def _call(model: nn.Module, state: dict[str, Tensor], args: tuple, kwargs=None):
    """``functional_call(model, state, args, kwargs)``.

    Eagerly, the tensors of ``state`` are put straight into the modules'
    ``_parameters``/``_buffers`` slots (found once per model and key set) for the call
    and put back after it, also when it raises: functional_call looks up every name of
    the model on each call, 138 us against 60 us for the forward itself of an MLP
    64-128-128-10 (batch 64). Under a torch.func transform or ``torch.compile``, or
    where the swap would not be exact (see ``_swap_plan``), functional_call itself.
    """
    kwargs = {} if kwargs is None else kwargs
    plan = None if _under_transform() else _current_plan(model, frozenset(state))
    if plan is None:
        return functional_call(model, state, args, kwargs)
    for store, attr, key, _ in plan.slots:
        store[attr] = state[key]
    try:
        return model(*args, **kwargs)
    finally:
        for store, attr, _, original in plan.slots:
            store[attr] = original


def _sites(layers) -> dict[str, tuple[LayerInfo, ...]]:
    """The layers grouped by the module whose call carries them, in ``layers`` order."""
    sites: dict[str, list[LayerInfo]] = {}
    for info in layers:
        sites.setdefault(info.site, []).append(info)
    out = {}
    for site, infos in sites.items():
        if layer_kind(infos[0]).forward is None and len(infos) > 1:
            raise ValueError(
                f"layers {[i.name for i in infos]} share the module {site!r}, but their kind "
                f"{infos[0].kind!r} has no `forward` that taps each of them"
            )
        out[site] = tuple(infos)
    return out


Tap = Callable[[str, Tensor, Tensor], Tensor]


@contextmanager
def _tapped(model: nn.Module, layers, tap: Tap):
    """Route every layer call of ``model`` through ``tap(layer_name, input, output) -> output``.

    A layer of a kind without ``forward``: a temporary forward hook on its module (the
    input is the module's first argument, the output the module's output). A kind with
    ``forward``: the module's ``forward`` is shadowed, for the duration, by the kind's,
    which taps each of the module's layers itself. Everything is undone on exit.
    """
    modules = dict(model.named_modules())
    undo: list[Callable[[], None]] = []
    try:
        for site, infos in _sites(layers).items():
            mod, kind = modules[site], layer_kind(infos[0])
            if kind.forward is None:

                def hook(m, args, out, _name=infos[0].name):
                    return tap(_name, args[0], out)

                undo.append(mod.register_forward_hook(hook).remove)
                continue

            def forward(*args, _m=mod, _f=kind.forward, _infos=infos, **kwargs):
                return _f(_m, _infos, tap, args, kwargs)

            undo.append(_restore_forward(mod))
            mod.forward = forward  # an instance attribute shadows the class's forward
        yield
    finally:
        for step in reversed(undo):
            step()


def _restore_forward(mod: nn.Module) -> Callable[[], None]:
    """Undo a later ``mod.forward = ...`` (keeping a forward the user set on the instance)."""
    own = mod.__dict__.get("forward")

    def restore():
        if own is None:
            mod.__dict__.pop("forward", None)
        else:
            mod.__dict__["forward"] = own

    return restore


def _perturbing_hooks(model: nn.Module, layers, perturbations, record):
    """Add a perturbation to each layer output and record each layer input, per call."""
    for info in layers:
        record[info.name] = []

    def tap(name, a, z):
        calls = record.get(name)
        if calls is None:  # a layer of the module that is not captured
            return z
        i = len(calls)
        calls.append(a)
        return z if perturbations is None else z + perturbations[name][i]

    return _tapped(model, layers, tap)


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

    def tap(name, a, z):
        if name in out_record:
            out_record[name].append((tuple(z.shape), z.dtype))
        return z

    with torch.no_grad(), _tapped(model, layers, tap):
        _call(model, state, tuple(meta(x) for x in inputs))
    return out_record


class _FxProgram(NamedTuple):
    """The model rewritten by :func:`_trace` (see the module docstring).

    Attributes:
        perturbed: ``forward(*inputs, _singd_perturbations=[...]) -> (output,
            layer_inputs)``: each layer call's output plus its perturbation, and the
            tuple of the layers' inputs, one per layer call.
        probe: ``forward(*inputs) -> layer_outputs``: the outputs alone (for shapes).
        calls: the layer name of each layer call, in execution order.
        keys: names of the parameters and buffers ``perturbed`` holds.
        probe_keys: the same for ``probe`` (a subset).
    """

    perturbed: torch.fx.GraphModule
    probe: torch.fx.GraphModule
    calls: tuple[str, ...]
    keys: frozenset[str]
    probe_keys: frozenset[str]


_PERTURBATIONS = "_singd_perturbations"


class _Tracer(torch.fx.Tracer):
    """fx's tracer with our leaf rule: a module is a leaf only if it carries requested
    layers or has none below it (fx's default would stop at every ``torch.nn`` module,
    e.g. ``nn.TransformerEncoderLayer``, hiding its ``linear1``/``linear2``)."""

    def __init__(self, sites):
        super().__init__()
        self.sites = frozenset(sites)
        self.above = frozenset(
            ".".join(parts[:i]) for s in self.sites for parts in [s.split(".")]
            for i in range(len(parts))
        )

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.sites:
            return True
        if qualname in self.above:
            return False
        return super().is_leaf_module(m, qualname)


def _proxy_leaf(fn):
    """``fn`` as one call node when it is called on fx proxies (else ``fn`` itself)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.fx.Proxy):
                return a.tracer.create_proxy("call_function", fn, args, kwargs)
        return fn(*args, **kwargs)

    return wrapped


@contextmanager
def _traceable_torch_nn():
    """What lets fx trace through the stock transformer modules, for the trace only.

    The one place with private torch names. ``nn.TransformerEncoder``/``Decoder`` and
    their layers canonicalise masks with ``F._canonical_mask`` / ``F._none_or_dtype``
    (which check ``isinstance(mask, Tensor)``, false for a proxy) and read the sequence
    length and causality with ``_get_seq_len`` / ``_detect_is_causal_mask`` (which
    branch on tensor properties): each becomes one call node of the traced program,
    run on the real tensors. The MHA fast path is switched off while tracing: its
    eligibility test branches on tensor properties, and training with gradients never
    takes it, so the traced program is the path training runs.
    """
    from torch.nn.modules import transformer

    patched = [(F, "_canonical_mask"), (F, "_none_or_dtype"),
               (transformer, "_get_seq_len"), (transformer, "_detect_is_causal_mask")]
    originals = [(m, n, getattr(m, n)) for m, n in patched if hasattr(m, n)]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        for m, n, fn in originals:
            setattr(m, n, _proxy_leaf(fn))
        torch.backends.mha.set_fastpath_enabled(False)
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, n, fn in originals:
            setattr(m, n, fn)


def _kind_call(infos: tuple[LayerInfo, ...]):
    """A graph function running a ``forward`` kind's module with its taps.

    ``call(module, perturbations | None, *args, **kwargs) -> (output, layer inputs,
    layer outputs)``, one entry per layer of ``infos`` (each tapped once per call).
    """
    forward = layer_kind(infos[0]).forward
    position = {info.name: j for j, info in enumerate(infos)}

    def call(module, perturbations, *args, **kwargs):
        inputs: list[Any] = [None] * len(infos)
        outputs: list[Any] = [None] * len(infos)

        def tap(name, a, z):
            j = position.get(name)
            if j is None:  # a layer of the module that is not captured
                return z
            inputs[j], outputs[j] = a, z
            return z if perturbations is None else z + perturbations[j]

        out = forward(module, infos, tap, args, kwargs)
        untapped = [info.name for info, a in zip(infos, inputs) if a is None]
        if untapped:
            raise RuntimeError(
                f"the {infos[0].kind!r} kind's forward did not tap layers {untapped}; a "
                "kind's forward must call tap(name, input, output) once per layer per call"
            )
        return out, tuple(inputs), tuple(outputs)

    call.__name__ = f"singd_{infos[0].kind}_forward"
    return call


def _trace(model: nn.Module, layers: tuple[LayerInfo, ...]) -> _FxProgram:
    """Trace ``model`` with torch.fx and insert the perturbations (no hooks)."""
    sites = _sites(layers)
    with _traceable_torch_nn():
        source = _Tracer(sites).trace(model)
    site_calls = [n for n in source.nodes if n.op == "call_module" and n.target in sites]

    def rewrite(perturb: bool):
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        nodes = list(source.nodes)
        for node in nodes:
            if node.op == "placeholder":
                env[node] = graph.node_copy(node, env.__getitem__)
        # a keyword with a default, so it fits after any signature (defaults, *args)
        pert = graph.placeholder(_PERTURBATIONS, default_value=None) if perturb else None
        recorded: list[Any] = []
        outputs: list[Any] = []
        calls: list[str] = []

        def slot() -> Any:
            return graph.call_function(operator.getitem, (pert, len(calls))) if perturb else None

        for node in nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                out = torch.fx.map_arg(node.args[0], env.__getitem__)
                graph.output((out, tuple(recorded)) if perturb else tuple(outputs))
                continue
            if node not in site_calls:
                env[node] = graph.node_copy(node, env.__getitem__)
                continue
            infos = sites[node.target]
            if layer_kind(infos[0]).forward is None:
                new = graph.node_copy(node, env.__getitem__)
                recorded.append(new.args[0])
                outputs.append(new)
                if perturb:
                    new = graph.call_function(operator.add, (new, slot()))
                calls.append(infos[0].name)
                env[node] = new
                continue
            module = graph.get_attr(node.target)
            slots = tuple(graph.call_function(operator.getitem, (pert, len(calls) + j))
                          for j in range(len(infos))) if perturb else None
            args = torch.fx.map_arg(node.args, env.__getitem__)
            kwargs = torch.fx.map_arg(node.kwargs, env.__getitem__)
            res = graph.call_function(_kind_call(infos), (module, slots, *args), kwargs)
            ins = graph.call_function(operator.getitem, (res, 1))
            outs = graph.call_function(operator.getitem, (res, 2))
            for j, info in enumerate(infos):
                recorded.append(graph.call_function(operator.getitem, (ins, j)))
                outputs.append(graph.call_function(operator.getitem, (outs, j)))
                calls.append(info.name)
            env[node] = graph.call_function(operator.getitem, (res, 0))
        graph.lint()
        return torch.fx.GraphModule(model, graph), tuple(calls)

    perturbed, calls = rewrite(True)
    probe, _ = rewrite(False)
    probe.graph.eliminate_dead_code()  # the probe stops at the last layer call
    probe.recompile()
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

    full: dict[str, Tensor] = dict(program.probe.named_parameters())
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
            perturbed (see the module docstring). ``"fx"`` raises when the model cannot
            be traced with ``torch.fx`` or when the traced calls do not cover every
            layer of ``layers``; ``"auto"`` then warns (once, here) and uses hooks.

    Returns:
        ``capture(params, *inputs, targets, buffers=None, record_layers=True) ->
        (loss, grads, captures)``: ``grads`` maps every key of ``params`` to its
        gradient, ``captures`` maps every layer name to a :class:`LayerCapture`. Works
        eagerly, under ``torch.func.vmap`` and under ``torch.compile``
        (``fullgraph=True`` with the traced program). A layer that the forward pass
        never calls is missing from ``captures``. ``record_layers=False`` (for steps
        that skip the factor update) is a plain gradient of the loss: the
        same loss and gradients, ``captures == {}``, no perturbations or hooks.
        Its attribute ``method`` says what it runs under ``torch.compile``:
        ``"fx"`` (the traced program; ``method="auto"`` still runs hooks eagerly, with
        the same numbers) or ``"hooks"``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    layers = tuple(layers)
    program, why, fix, cause = None, None, None, None
    if method != "hooks":
        try:
            program = _trace(model, layers)
        except Exception as err:  # fx cannot trace data-dependent control flow etc.
            why = (f"torch.fx could not trace {type(model).__name__} "
                   f"({type(err).__name__}: {err})")
            fix = "make the model traceable (no Python branches on tensor values)"
            cause = err
        else:
            traced = set(program.calls)
            missing = [info.name for info in layers if info.name not in traced]
            if missing:
                program = None
                why = (f"the traced forward of {type(model).__name__} never calls the modules "
                       f"of layers {missing}")
                fix = ("call each layer's module in forward (a weight used directly, as in "
                       "F.linear(x, m.weight), is no layer call), or leave a layer that "
                       "forward really never calls out of `layers`")
    if why is not None:
        if method == "fx":
            raise ValueError(
                f"method='fx': {why}. Use method='hooks' (or 'auto'), or {fix}"
            ) from cause
        warnings.warn(
            f"make_capture(method='auto'): {why}; using forward hooks, under "
            "torch.compile too (each layer call is then a graph break). Pass "
            "method='hooks' to choose that and silence this warning",
            stacklevel=2,
        )
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
                out = _call(model, {**buffers, **params}, tuple(inputs))
            loss = loss_fn(out, targets)
            return loss, (loss.detach(), record)

        grads, out_grads, (loss, record) = _grad_and_aux(loss_of, params, perturbations)
        captures = {
            info.name: LayerCapture(tuple(record[info.name]), tuple(out_grads[info.name]))
            for info in layers
            if record.get(info.name)
        }
        return loss, grads, captures

    capture.method = "hooks" if program is None else "fx"  # type: ignore[attr-defined]
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
        out, recorded = _call(
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
    """``(loss, grads, {})`` with a plain gradient of the loss (no layer data)."""

    def loss_of(params):
        loss = loss_fn(_call(model, {**buffers, **params}, tuple(inputs)), targets)
        return loss, loss.detach()

    (grads,), loss = _differentiate(loss_of, params)
    return loss, grads, {}


def _grad_and_aux(loss_of, params, perturbations):
    (g_params, g_pert), aux = _differentiate(loss_of, params, perturbations)
    return g_params, g_pert, aux


def _differentiate(loss_of, params, perturbations=None):
    """``(gradients, aux)`` of ``loss_of(params[, perturbations]) -> (loss, aux)``.

    ``params``: name -> tensor; ``perturbations``: a pytree of tensors. The
    gradients come as ``(grads,)`` or ``(grads, perturbation grads)``, in the same
    containers: what ``torch.func.grad(loss_of, argnums=..., has_aux=True)`` returns,
    and that is what runs under vmap and torch.compile. Eagerly, plain autograd on
    detached copies (``torch.autograd.grad``) gives the same numbers without
    functorch's wrapping of every tensor of the forward and backward: measured 0.41x
    of ``torch.func.grad``'s time for the loss and gradients of an MLP 64-128-128-10
    (batch 64, 1 thread), which takes the pure core's plain step from 2.3x to 1.4x of
    the hand-written arithmetic (``HandBatched`` in benchmarks/sweep_bench.py).
    A tensor the loss does not use gets a zero gradient, as with ``torch.func.grad``.
    """
    trees = (params,) if perturbations is None else (params, perturbations)
    if _under_transform():
        return torch.func.grad(loss_of, argnums=tuple(range(len(trees))), has_aux=True)(*trees)
    tracked = {k: v.detach().requires_grad_() for k, v in params.items()}
    leaves = list(tracked.values())
    args: tuple = (tracked,)
    if perturbations is not None:  # name -> list (hooks) or a list (the fx program)
        zeros, spec = torch.utils._pytree.tree_flatten(perturbations)
        zeros = [z.detach().requires_grad_() for z in zeros]
        leaves += zeros
        args = (tracked, torch.utils._pytree.tree_unflatten(zeros, spec))
    with torch.enable_grad():
        loss, aux = loss_of(*args)
        if loss.requires_grad:
            flat = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        else:  # the loss does not depend on the parameters at all
            flat = tuple(torch.zeros_like(t) for t in leaves)
    grads = dict(zip(tracked, flat))
    # aux (the loss, the recorded layer inputs) must not hold on to this graph; tensors
    # outside it (the model's inputs) come back as they are, as from torch.func.grad
    aux = torch.utils._pytree.tree_map(
        lambda t: t.detach() if isinstance(t, Tensor) and t.requires_grad else t, aux
    )
    if perturbations is None:
        return (grads,), aux
    return (grads, torch.utils._pytree.tree_unflatten(list(flat[len(tracked):]), spec)), aux

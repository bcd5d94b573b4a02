"""Stage 1 of the data path: which layers SINGD preconditions, described statically.

:func:`find_layers` walks a model once and returns a hashable tuple of
:class:`LayerInfo`; everything after it (capture, statistics, the factor update, the
preconditioned step) reads only this description, its :class:`LayerKind` and tensors,
never the modules.

The layer rule (one rule, used by the pure face and by the drop-in optimizer)
------------------------------------------------------------------------------
A module is a layer when the registry of layer kinds has an entry for its class or for
one of its base classes; the entry of the most specific class wins (the first class of
``type(module).__mro__`` that is registered). Built in: ``nn.Linear`` -> ``"linear"``,
``nn.Conv1d`` -> ``"conv1d"``, ``nn.Conv2d`` -> ``"conv2d"``, so their subclasses are
layers too (``MultiheadAttention.out_proj``, a ``NonDynamicallyQuantizableLinear``; a
user's ``class CastedLinear(nn.Linear)``), as in the official ``singd`` package.

A subclass that overrides ``forward`` is still treated as its base kind: the rule
trusts that ``forward`` computes the base map from its first argument (casting the
weight, as ``CastedLinear`` does, is fine; the captured rows are the input the module
received and the gradient of its output). When a subclass computes something else,
register it: ``register_layer_kind(MyLinear, my_kind)``, or
``register_layer_kind(MyLinear, None)`` to leave it (and its subclasses) out.

A module with a kind speaks for its whole subtree: the modules below it are not
visited, so a kind of a container module (``nn.MultiheadAttention``, which reads
``out_proj.weight`` without calling ``out_proj``) owns its submodules' parameters;
:data:`OPAQUE` marks a module whose subtree is not preconditioned at all. Each
parameter belongs to at most one layer: two modules sharing a weight (weight tying)
are an error unless a kind says how to handle it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ._types import Structures


@dataclass(frozen=True)
class LayerInfo:
    """Static description of one preconditioned layer, ``z = W~ a`` with W~ = [W | b].

    Attributes:
        name: the layer's name (unique; for the built-in kinds the module's path in
            ``model.named_modules()``).
        kind: name of its :class:`LayerKind` (``"linear"``, ``"conv1d"``, ``"conv2d"`` or
            a registered one); :func:`layer_kind` gives the kind itself.
        weight: key of the weight in ``dict(model.named_parameters())``.
        bias: key of the bias there, or ``None`` when the layer has no bias or its
            bias is frozen (then the bias is not part of W~ and is not updated).
        d_in: columns of the weight matrix view (``C_in/groups * prod(kernel)`` for convs).
        d_out: rows of the weight matrix view (output features / channels).
        kernel_size, stride, padding, dilation, groups, padding_mode: conv settings
            (2-tuples; conv1d is a conv2d of height 1). ``padding`` is resolved to
            ``(top, bottom, left, right)``; ``"same"`` may be asymmetric.
        module: path of the module whose call carries this layer; ``""`` means
            ``name`` (see :attr:`site`). Several layers of one module (attention's
            projections) share it.

    A kind that needs more static settings returns a frozen dataclass subclass of
    ``LayerInfo`` with its own fields (it stays hashable).
    """

    name: str
    kind: str
    weight: str
    bias: str | None
    d_in: int
    d_out: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"
    module: str = ""

    @property
    def d_K(self) -> int:
        """Side of K: input features plus one for a trained bias."""
        return self.d_in + (self.bias is not None)

    @property
    def d_C(self) -> int:
        """Side of C: output features."""
        return self.d_out

    @property
    def params(self) -> tuple[str, ...]:
        """The parameter keys this layer owns (weight, then bias if trained)."""
        return (self.weight,) if self.bias is None else (self.weight, self.bias)

    @property
    def site(self) -> str:
        """Path of the module whose call carries this layer (hooks and fx attach here)."""
        return self.module or self.name


Describe = Callable[[str, nn.Module, Mapping[int, str]], "LayerInfo | tuple[LayerInfo, ...] | None"]
Rows = Callable[[LayerInfo, Tensor, Tensor], tuple[Tensor, Tensor]]


# A Linear weight is its own matrix: asking the shape in Python skips a reshape to
# the same shape (a torch call, ~1-3 us, a few per layer and step)


def _flat_rows(info: LayerInfo, W: Tensor) -> Tensor:
    return W if W.shape == (info.d_out, info.d_in) else W.reshape(info.d_out, info.d_in)


def _shaped_like(info: LayerInfo, M: Tensor, W: Tensor) -> Tensor:
    return M if M.shape == W.shape else M.reshape(W.shape)


@dataclass(frozen=True, eq=False)
class LayerKind:
    """How SINGD reads one kind of module as Kronecker-factored layers (the contract).

    Only ``name``, ``describe`` and ``rows`` are required; the defaults fit any layer
    whose output is ``z = W a + b`` per row, with ``W.reshape(d_out, d_in)`` the weight
    matrix. Every function is pure and is called with tensors only (it must work under
    ``torch.func.vmap`` and ``torch.compile``, so no Python branch on tensor values).

    Attributes:
        name: unique name, stored in :attr:`LayerInfo.kind`.
        describe: ``describe(name, module, param_keys) -> LayerInfo | tuple | None``:
            the layer(s) of ``module`` (its path ``name``). ``param_keys`` maps
            ``id(tensor)`` to its key for the parameters that may be trained (it
            requires grad and is wanted); a kind returns ``None`` (or ``()``) when its
            weight is not among them and leaves a bias out when it is not. A kind may
            own raw parameters of the module (``in_proj_weight``) and parameters of its
            submodules (``out_proj.weight``): they are then not layers of their own.
            Several layers of one module set ``LayerInfo.module`` to the module path
            and have distinct names (e.g. ``f"{name}.in_proj"``).
        rows: ``rows(info, x, g) -> (a [N, S, d_in], g [N, S', d_out])`` for ONE call:
            ``x`` the captured input, ``g`` the gradient of the loss w.r.t. the
            captured output; N the batch size, S the weight-sharing positions (for
            the default statistics S' == S). No bias column: it is appended after.
        weight_matrix: ``weight_matrix(info, W) -> [d_out, d_in]``: the weight (or its
            gradient) as the matrix of ``z = W a`` (default ``W.reshape(d_out, d_in)``;
            a transposed storage, GPT-2's ``Conv1D`` or ``nn.Embedding``, returns
            ``W.T``).
        weight_from_matrix: ``weight_from_matrix(info, M, W) -> like W``: the inverse,
            turning the preconditioned direction back into the weight's shape.
        statistics: None (H_K, H_C from ``rows``) or a kind-specific statistic,
            ``statistics(info, K, C, capture, *, kfac_approx, loss_average, grad_scale)
            -> LayerStatistics`` (e.g. ``nn.Embedding``: its A over the vocabulary is
            diagonal, token counts, so H_K is built without one-hot rows).
        structures: ``(K, C)`` structure names this kind forces, None for "the user's
            choice" (e.g. ``("diagonal", None)`` for an embedding's vocabulary side).
        forward: None, or ``forward(module, infos, tap, args, kwargs) -> output`` for
            modules whose layers are not "the module's input -> the module's output"
            (attention: projections inside one call). It computes the module's output
            (the same values as ``module(*args, **kwargs)``) and routes the linear map
            of each layer in ``infos`` through ``tap(layer_name, a, z) -> z`` (``a`` the
            layer input as ``rows`` expects it, ``z`` its output; use the returned
            tensor), once per layer per call. ``infos`` are the layers being captured,
            possibly a subset of what ``describe`` gave (a tap of another name passes
            ``z`` through). The pure capture calls it instead of ``module.forward``
            (hooks: the instance's ``forward`` is shadowed for the call; fx: the module
            call node becomes a call of it); the drop-in calls it from a forward hook
            on recording steps and uses its output (the module's own is dropped). With
            None, capture records ``args[0]`` and perturbs the module's output.
        yields_tied: when a layer of another kind shares this layer's weight (weight
            tying, e.g. ``head.weight is embedding.weight``), that layer owns the weight
            and this one is dropped, wherever the two are in ``named_modules()``.
    """

    name: str
    describe: Describe
    rows: Rows
    weight_matrix: Callable[[LayerInfo, Tensor], Tensor] = _flat_rows
    weight_from_matrix: Callable[[LayerInfo, Tensor, Tensor], Tensor] = _shaped_like
    statistics: Callable[..., Any] | None = None
    structures: tuple[str | None, str | None] = (None, None)
    forward: Callable[..., Any] | None = None
    yields_tied: bool = False

    def __repr__(self) -> str:
        return f"LayerKind({self.name!r})"


# ------------------------------------------------------------------ built-in kinds
def _bias_key(mod: Any, param_keys: Mapping[int, str]) -> str | None:
    b = getattr(mod, "bias", None)
    return param_keys.get(id(b)) if isinstance(b, Tensor) else None


def _describe_linear(name: str, mod: Any, param_keys: Mapping[int, str]):
    weight = param_keys.get(id(mod.weight)) if isinstance(mod.weight, Tensor) else None
    if weight is None:
        return None
    d_out, d_in = mod.weight.shape
    return LayerInfo(name, "linear", weight, _bias_key(mod, param_keys), d_in, d_out)


def _linear_rows(info: LayerInfo, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    if x.dim() == 1:  # an unbatched input: a batch of one
        x, g = x.unsqueeze(0), g.unsqueeze(0)
    n, s = x.shape[0], math.prod(x.shape[1:-1])  # explicit S: an empty batch reshapes too
    return x.reshape(n, s, x.shape[-1]), g.reshape(n, s, g.shape[-1])


def _conv_padding(mod: Any, ks: tuple[int, int], dil: tuple[int, int]):
    pad = mod.padding
    if pad == "valid":
        return (0, 0, 0, 0)
    if pad == "same":
        out = []
        for k, d in zip(ks, dil):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]  # PyTorch puts the odd one last
        return tuple(out)
    pad = tuple(pad)
    if len(pad) == 1:
        pad = (0, pad[0])
    return (pad[0], pad[0], pad[1], pad[1])


def _describe_conv(kind: str):
    is_1d = kind == "conv1d"

    def describe(name: str, mod: Any, param_keys: Mapping[int, str]):
        weight = param_keys.get(id(mod.weight)) if isinstance(mod.weight, Tensor) else None
        if weight is None:
            return None
        ks = (1, mod.kernel_size[0]) if is_1d else tuple(mod.kernel_size)
        dil = (1, mod.dilation[0]) if is_1d else tuple(mod.dilation)
        return LayerInfo(
            name,
            kind,
            weight,
            _bias_key(mod, param_keys),
            d_in=mod.weight[0].numel(),
            d_out=mod.weight.shape[0],
            kernel_size=ks,
            stride=(1, mod.stride[0]) if is_1d else tuple(mod.stride),
            padding=_conv_padding(mod, ks, dil),
            dilation=dil,
            groups=mod.groups,
            padding_mode=mod.padding_mode,
        )

    return describe


def _patches(info: LayerInfo, x: Tensor) -> Tensor:
    """Unfolded input patches of a conv layer: [N, d_in, positions] (a view of a
    [d_in, N, positions] tensor), the entries of ``F.unfold`` (rows ordered channel,
    kernel row, kernel column).

    Built as a strided view of the padded input (``Tensor.unfold`` per spatial dim, the
    dilation as a step over each window) and one copy into the patch layout: the same
    numbers as ``F.unfold``, whose CPU kernel took 20-40x longer (0.2 ms vs 6.6-9.0 ms for
    the benchmark CNN's conv1 patches [64, 27, 1024], 1 thread).
    """
    if info.kind == "conv1d":
        x = x.unsqueeze(-2)
    n, ch = x.shape[0], x.shape[1]
    if info.groups > 1:  # docs/algorithm.md#statistics: average the input channels over the groups
        ch = ch // info.groups
        x = x.reshape(n, info.groups, ch, *x.shape[2:]).mean(1)
    top, bottom, left, right = info.padding
    if info.padding_mode != "zeros" or top or bottom or left or right:
        mode = "constant" if info.padding_mode == "zeros" else info.padding_mode
        x = F.pad(x, (left, right, top, bottom), mode=mode)
    (kh, kw), (sh, sw), (dh, dw) = info.kernel_size, info.stride, info.dilation
    windows = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    windows = windows[..., ::dh, ::dw]  # [N, C, out_h, out_w, kh, kw]
    positions = windows.shape[2] * windows.shape[3]
    # stored as [d_in, N, positions]: the statistics read the patches as the columns
    # X [d_in, N positions] of their Gram without another copy
    cols = windows.permute(1, 4, 5, 0, 2, 3).reshape(ch * kh * kw, n, positions)
    return cols.permute(1, 0, 2)


def _conv_rows(info: LayerInfo, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    if x.dim() == (2 if info.kind == "conv1d" else 3):  # unbatched (C, L) / (C, H, W)
        x, g = x.unsqueeze(0), g.unsqueeze(0)
    return _patches(info, x).transpose(1, 2), g.flatten(2).transpose(1, 2)


def _no_layer(name: str, mod: nn.Module, param_keys: Mapping[int, str]) -> None:
    return None


def _no_rows(info: LayerInfo, x: Tensor, g: Tensor):
    raise TypeError(f"layer {info.name!r}: an opaque module has no rows")


LINEAR = LayerKind("linear", _describe_linear, _linear_rows)
CONV1D = LayerKind("conv1d", _describe_conv("conv1d"), _conv_rows)
CONV2D = LayerKind("conv2d", _describe_conv("conv2d"), _conv_rows)

#: A module that is not preconditioned, nor is anything below it (its parameters
#: fall back). ``nn.MultiheadAttention`` is opaque until a kind preconditions it: it
#: never calls its ``out_proj`` module (it reads ``out_proj.weight`` directly), so
#: ``out_proj`` is no layer call that hooks or fx could capture.
OPAQUE = LayerKind("opaque", _no_layer, _no_rows)

# ------------------------------------------------------------------------ registry
_BY_TYPE: dict[type, LayerKind | None] = {
    nn.Linear: LINEAR, nn.Conv1d: CONV1D, nn.Conv2d: CONV2D, nn.MultiheadAttention: OPAQUE,
}
_BY_NAME: dict[str, LayerKind] = {k.name: k for k in (LINEAR, CONV1D, CONV2D, OPAQUE)}


class Registration:
    """What :func:`register_layer_kind` did; ``remove()`` (or leaving a ``with``) undoes it."""

    def __init__(self, module_type: type, previous: Any, had: bool):
        self.module_type, self._previous, self._had = module_type, previous, had

    def remove(self) -> None:
        """Restore the registry entry of ``module_type`` that was there before."""
        if self._had:
            _BY_TYPE[self.module_type] = self._previous
        else:
            _BY_TYPE.pop(self.module_type, None)

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def register_layer_kind(module_type: type, kind: LayerKind | None) -> Registration:
    """Make ``module_type`` (and its subclasses without an entry of their own) a layer.

    Args:
        module_type: an ``nn.Module`` subclass.
        kind: how to read it (:class:`LayerKind`), or None: ``module_type`` and its
            subclasses are NOT layers (e.g. a ``Linear`` subclass whose ``forward``
            computes something other than ``x W^T + b``).

    Returns:
        A :class:`Registration`; ``.remove()`` or ``with register_layer_kind(...):``
        restores the previous entry. Applies to models described after the call.
        Kind names are unique among the registered kinds; a removed kind's name stays
        readable by :func:`layer_kind` (layers described before) until another kind of
        that name is registered.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if kind is not None:
        if not isinstance(kind, LayerKind):
            raise TypeError(f"kind must be a LayerKind or None, got {type(kind).__name__}")
        known = _BY_NAME.get(kind.name)
        if known is not None and known is not kind and known in _BY_TYPE.values():
            raise ValueError(
                f"a different layer kind named {kind.name!r} is registered already; give "
                "yours another name (LayerKind(name=...)), or reuse the registered one"
            )
        _BY_NAME[kind.name] = kind
    had = module_type in _BY_TYPE
    registration = Registration(module_type, _BY_TYPE.get(module_type), had)
    _BY_TYPE[module_type] = kind
    return registration


def kind_of_module(module: nn.Module) -> LayerKind | None:
    """The kind of ``module`` under the layer rule (most specific registered class)."""
    for cls in type(module).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls]
    return None


def layer_types() -> tuple[type, ...]:
    """The module types registered with a kind (their subclasses are layers too), i.e.
    what ``isinstance(module, layer_types())`` needs, for the official ``SUPPORTED_MODULES``."""
    return tuple(t for t, kind in _BY_TYPE.items() if kind is not None and kind is not OPAQUE)


def layer_kind(info: LayerInfo | str) -> LayerKind:
    """The :class:`LayerKind` of a layer (or of a kind name)."""
    name = info if isinstance(info, str) else info.kind
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(
            f"no layer kind named {name!r} is registered (known: {sorted(_BY_NAME)}); "
            "register it with register_layer_kind(ModuleType, LayerKind(...))"
        ) from None


def module_layers(model: nn.Module, param_keys: Mapping[int, str]):
    """``(module path, module, LayerInfo)`` of every layer of ``model`` under the rule.

    ``param_keys`` maps ``id(parameter)`` to its key for the parameters that may be
    trained. A module with a kind speaks for its whole subtree: the modules below it
    are not visited (``nn.MultiheadAttention``'s kind owns ``out_proj``). Of two layers
    of different kinds sharing a weight, the one whose kind ``yields_tied`` (an
    embedding tied to a Linear head) gives it up; any other parameter claimed by two
    layers (weight tying across modules) is a ValueError.
    """
    owner: dict[str, str] = {}  # parameter key -> name of the layer that owns it
    found_layers: list[tuple[str, nn.Module, LayerInfo]] = []
    covered: list[str] = []  # paths of modules with a kind (their subtrees are theirs)
    for path, mod in model.named_modules():
        if any(path.startswith(c + ".") or c == "" for c in covered):
            continue
        kind = kind_of_module(mod)
        if kind is None:
            continue
        covered.append(path)
        found = kind.describe(path, mod, param_keys)
        if found is None:
            continue
        for info in (found,) if isinstance(found, LayerInfo) else tuple(found):
            tied = [e for e in found_layers if e[2].weight == info.weight]
            if tied and _yields_to(tied[0][2], info) is info:
                continue  # e.g. an embedding tied to an earlier Linear head
            if tied and _yields_to(tied[0][2], info) is tied[0][2]:
                found_layers.remove(tied[0])  # the earlier layer gives its weight up
                for k in tied[0][2].params:
                    owner.pop(k, None)
            shared = [k for k in info.params if k in owner]
            if shared:
                raise ValueError(
                    f"layer {info.name!r} ({info.kind}) shares parameters {shared} with layer "
                    f"{owner[shared[0]]!r}; SINGD needs one layer per weight: call one module "
                    "several times instead of tying weights, or leave one of them out "
                    "(pass `params` without it)"
                )
            for k in info.params:
                owner[k] = info.name
            found_layers.append((path, mod, info))
    yield from found_layers


def _yields_to(first: LayerInfo, second: LayerInfo) -> LayerInfo | None:
    """Of two layers of different kinds sharing a weight, the one that gives it up."""
    a, b = layer_kind(first).yields_tied, layer_kind(second).yields_tied
    return None if a == b else (first if a else second)


def find_layers(
    model: nn.Module, params: Iterable[Tensor] | None = None
) -> tuple[LayerInfo, ...]:
    """Describe every layer of ``model`` whose weight is trained (the layer rule above).

    Built-in kinds: ``nn.Linear`` (any number of leading dims), ``nn.Conv1d``,
    ``nn.Conv2d`` (any stride, dilation, groups, padding incl. ``"same"``/``"valid"``,
    any padding_mode), and their subclasses; more with :func:`register_layer_kind`. A
    layer whose weight does not require grad is left out; a frozen bias beside a
    trained weight is fine (the bias is left out of W~).

    Args:
        model: the model.
        params: optional iterable of parameters; only layers whose weight is among
            them are returned (the stateful optimizer uses this for param groups).

    Returns:
        A tuple of :class:`LayerInfo`, in ``named_modules()`` order; hashable.
    """
    wanted = None if params is None else {id(p) for p in params}
    param_keys = {
        id(p): k
        for k, p in model.named_parameters()
        if p.requires_grad and (wanted is None or id(p) in wanted)
    }
    return tuple(info for _, _, info in module_layers(model, param_keys))


# ------------------------------------------------------------------- describe()
def _label(structure: str | type) -> str:
    """A structure's name, given as a name or as a structure type."""
    return structure if isinstance(structure, str) else getattr(structure, "name", str(structure))


def describe(
    layers: Iterable[LayerInfo], structures: Structures = ("dense", "dense")
) -> str:
    """A readable table of what is preconditioned: name, kind, d_K, d_C, structures.

    Args:
        layers: from :func:`find_layers` (or ``opt.layers``).
        structures: the (K, C) names for all layers, or a dict per layer name (as
            :func:`~singd_functional.singd` takes them); a kind's forced structure
            (:attr:`LayerKind.structures`) is shown where it applies.
    """
    rows = [("layer", "kind", "d_K", "d_C", "K", "C", "parameters")]
    for info in layers:
        pair = structures.get(info.name, ("dense", "dense")) if isinstance(
            structures, Mapping) else structures
        forced = layer_kind(info).structures
        K, C = (_label(f if f is not None else s) for f, s in zip(forced, pair))
        rows.append((info.name, info.kind, str(info.d_K), str(info.d_C), K, C,
                     ", ".join(info.params)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary(layers) -> str:
    """One line: how many layers of which kind, and how many numbers they train."""
    by_kind: dict[str, int] = {}
    for info in layers:
        by_kind[info.kind] = by_kind.get(info.kind, 0) + 1
    kinds = ", ".join(f"{n} {k}" for k, n in by_kind.items()) or "none"
    numbers = sum(info.d_C * info.d_K for info in layers)
    return f"{len(layers)} preconditioned layers ({kinds}), {numbers:,} parameters"


__all__ = [
    "LayerInfo",
    "LayerKind",
    "OPAQUE",
    "Registration",
    "describe",
    "find_layers",
    "kind_of_module",
    "layer_kind",
    "module_layers",
    "register_layer_kind",
    "summary",
]

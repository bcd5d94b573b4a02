"""The drop-in face's group/layer mapping: one :class:`Group` per param group, one
:class:`Layer` per preconditioned layer (private; used by :class:`~singd_functional.SINGD`).

These records are the single source of truth for which layer belongs to which param
group, which parameters it has, and what its hooks have recorded; the per-parameter
numbers (K, C, m_K, m_C, momentum buffers) live in ``optimizer.state`` as for every
``torch.optim.Optimizer``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from torch import Tensor, nn

from . import _fsdp, _options
from .combine import GradientTransformation
from .factors import Factors
from .layers import LayerInfo, layer_kind, module_layers
from .transform import _Kronecker, _kronecker, singd

# Group entries fixed when the group's state is created (its layout depends on them).
LOCKED = ("structures", "kfac_like")
# Group entries the pure transform is built from (rebuilt when one changes).
STATIC = ("structures", "kfac_approx", "loss_average", "kfac_like", "normalize_lr_cov",
          "preconditioner_dtype", "T")


@dataclasses.dataclass(eq=False)
class Layer:
    """One preconditioned layer: what it is, where it sits, what its hooks recorded."""

    info: LayerInfo
    module: nn.Module
    group: int  # index in ``param_groups``
    handle: Any = None  # its forward hook
    # (x, dL/dz) per call reached by the backward pass that is running
    reached: list = dataclasses.field(default_factory=list)
    # one _recording.Part per backward pass finished since the last step / zero_grad
    parts: list = dataclasses.field(default_factory=list)
    # K K^T and C C^T between factor updates (T > 1); derived from K and C, so not
    # checkpointed (recomputed, bit-identically, after a load)
    products: dict | None = None
    # (submodule path below ``module``, attribute) where the weight sits (_current_weight)
    weight_site: tuple[str, str] = dataclasses.field(init=False)

    def __post_init__(self):
        self.weight_site = _weight_site(self.info)

    @property
    def name(self) -> str:
        return self.info.name


@dataclasses.dataclass(eq=False)
class Group:
    """What the optimizer derived from one param group (same index as ``param_groups``)."""

    index: int
    layers: tuple[Layer, ...]
    params: dict[str, Tensor]  # key (the name in model.named_parameters()) -> parameter
    locked: tuple
    keeps_momenta: bool
    transforms: dict = dataclasses.field(default_factory=dict)
    # the optimizer's compiled per-layer functions (_compile.Kernels), None: eager
    kernels: Any = None
    # keys of the parameters outside the layers (the identity-preconditioned ones)
    plain: tuple[str, ...] = dataclasses.field(init=False)

    def __post_init__(self):
        owned = {k for layer in self.layers for k in layer.info.params}
        self.plain = tuple(k for k in self.params if k not in owned)

    def weight(self, layer: Layer) -> Tensor:
        return self.params[layer.info.weight]


def all_layers(groups: list[Group]):
    for grp in groups:
        yield from grp.layers


def remove_hooks(groups: list[Group]) -> None:
    for layer in all_layers(groups):
        if layer.handle is not None:
            layer.handle.remove()
            layer.handle = None


def locked(group: dict) -> tuple:
    return tuple(tuple(v) if isinstance(v, list) else v for v in (group[e] for e in LOCKED))


def build_group(optimizer, index: int, group: dict[str, Any]) -> Group:
    """The layers of param group ``index``, their initial state and their hooks."""
    from ._recording import CaptureHook, KindHook  # the hooks record into these records

    for entry, what in (("structures", "structure name"), ("preconditioner_dtype", "dtype")):
        group[entry] = _options.pair(group[entry], entry, what)
    _options.check_group(f"param group {index}", group, host_tensors=True)
    if group["kfac_like"] and group["alpha1"] != 0:  # as the official package
        warnings.warn(
            f"param group {index}: kfac_like=True (IKFAC) keeps no Riemannian momenta, so "
            f"alpha1={group['alpha1']} is ignored and set to 0; pass alpha1=0 with "
            "kfac_like=True to silence this",
            stacklevel=5,  # the SINGD(...) call
        )
        group["alpha1"] = 0.0
    model = optimizer.model
    names = {id(p): k for k, p in model.named_parameters()}
    owner = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    keys = {id(p): names.get(id(p), f"param_groups[{index}][{i}]")
            for i, p in enumerate(group["params"])}
    # the layer rule over every parameter this optimizer trains (any group), so that a
    # layer split across groups is seen and refused
    trained = {i: names[i] for i in owner if i in names}
    group_of = {names[i]: g for i, g in owner.items() if i in names}

    infos, modules = [], []
    for _, mod, info in module_layers(model, trained):
        where = {k: group_of[k] for k in info.params}
        if index not in where.values():
            continue
        if len(set(where.values())) > 1:
            placed = ", ".join(f"{k} in group {g}" for k, g in where.items())
            raise ValueError(
                f"layer {info.name!r} is split across param groups ({placed}); SINGD "
                "preconditions [W | b] jointly, so put a layer's weight and bias in the "
                "same param group"
            )
        infos.append(info)
        modules.append(mod)

    params = {keys[id(p)]: p for p in group["params"]}
    tx = transform(group, tuple(infos), group["alpha1"])
    state = tx.init({k: p.detach() for k, p in params.items()})
    for k, p in params.items():
        optimizer.state[p]["momentum_buffer"] = state.velocity[k]
    for info in infos:
        store_factors(optimizer.state[params[info.weight]], state.factors[info.name],
                      state.momenta.get(info.name))
    group.setdefault("step", 0)

    layers = tuple(Layer(info, mod, index) for info, mod in zip(infos, modules))
    for layer in layers:
        if layer_kind(layer.info).forward is None:
            layer.handle = layer.module.register_forward_hook(CaptureHook(optimizer, layer))
            continue
        # a kind that taps its layers inside the module call: ONE hook per module, over
        # its layers in every param group (each hook would run the forward again)
        hook = optimizer._kind_hooks.get(id(layer.module))
        if hook is None:
            hook = optimizer._kind_hooks[id(layer.module)] = KindHook(optimizer, layer.module)
            # prepend: before fully_shard's post-forward hook, which reshards the module's
            # parameters and hooks its backward on the output this hook replaces
            layer.handle = layer.module.register_forward_hook(hook, with_kwargs=True,
                                                              prepend=True)
        hook.add(layer)
    return Group(index, layers, params, locked(group), bool(state.momenta),
                 kernels=optimizer._kernels)


def _static_options(group: dict[str, Any]) -> dict[str, Any]:
    """The arguments of the pure core that the group's static entries (``STATIC``) set."""
    return dict(
        structures=group["structures"], kfac_approx=group["kfac_approx"],
        loss_average=group["loss_average"], kfac_like=group["kfac_like"],
        normalize_lr_cov=group["normalize_lr_cov"],
        preconditioner_dtype=group["preconditioner_dtype"],
        cache_preconditioner=group["T"] > 1,
    )


def transform(group: dict[str, Any], layers: tuple[LayerInfo, ...], alpha1, kernels=None
              ) -> GradientTransformation:
    """The pure core for ``layers`` with the group's static entries.

    The numbers are passed again at every step (HyperParams); ``alpha1`` here only
    decides whether the transform keeps Riemannian momenta (alpha1 != 0). ``kernels``:
    see :func:`~singd_functional.singd` (the optimizer's compiled functions, or None).
    """
    return singd(
        layers,
        lr=group["lr"], momentum=group["momentum"], damping=group["damping"],
        alpha1=alpha1, weight_decay=group["weight_decay"], lr_cov=group["lr_cov"],
        **_static_options(group), kernels=kernels,
    )


def group_transform(grp: Group, group: dict, active: tuple[Layer, ...]) -> GradientTransformation:
    """The (cached) pure core for the group's ``active`` layers and its static entries."""
    key = (tuple(l.name for l in active), tuple(_static_key(group[e]) for e in STATIC))
    tx = grp.transforms.get(key)
    if tx is None:
        alpha1 = 0.5 if grp.keeps_momenta else 0.0
        tx = grp.transforms[key] = transform(group, tuple(l.info for l in active), alpha1,
                                             grp.kernels)
    return tx


def group_directions(grp: Group, group: dict, active: tuple[Layer, ...]) -> _Kronecker:
    """The (cached) preconditioning stage of :func:`group_transform` alone (``kron.step``
    gives C C^T G K K^T per layer and the gradient elsewhere): the drop-in's plain step
    does the first-order rest in place (``_step._lean_update``)."""
    key = ("directions", tuple(l.name for l in active),
           tuple(_static_key(group[e]) for e in STATIC))
    kron = grp.transforms.get(key)
    if kron is None:
        alpha1 = 0.0 if group["kfac_like"] or not grp.keeps_momenta else 0.5
        kron = grp.transforms[key] = _kronecker(tuple(l.info for l in active), alpha1,
                                                **_static_options(group), kernels=grp.kernels)
    return kron


def _static_key(value) -> Any:
    # a tensor (loss_average) by identity: its repr would read it back from the device
    return ("tensor", id(value)) if isinstance(value, Tensor) else repr(value)


def store_factors(state: dict, factors: Factors, momenta: Factors | None) -> None:
    state["K"], state["C"] = factors
    if momenta is not None:
        state["m_K"], state["m_C"] = momenta


def follow_params(optimizer, layer: Layer) -> dict:
    """The layer's state, re-cast if the model was moved or cast since it was made."""
    w = check_weight(optimizer._groups[layer.group], layer)
    return follow_weight(optimizer.state[w], w,
                         optimizer.param_groups[layer.group]["preconditioner_dtype"])


def follow_weight(state: dict, w: Tensor, preconditioner_dtype) -> dict:
    """:func:`follow_params` for a weight already checked (``check_weight``)."""
    dtype_K, dtype_C = preconditioner_dtype
    dtype_w, device = w.dtype, w.device
    for key, dtype in (("K", dtype_K), ("m_K", dtype_K), ("C", dtype_C), ("m_C", dtype_C)):
        M = state.get(key)
        dtype = dtype or dtype_w
        if M is not None and (M.dtype != dtype or M.device != device):
            state[key] = M.to(dtype=dtype, device=device)
    return state


def check_weight(grp: Group, layer: Layer) -> Tensor:
    """The layer's weight, if its module still holds the parameter the group was built with."""
    w = grp.weight(layer)
    # fully_shard swaps the module's weight for the gathered one around each forward
    if _current_weight(layer) is not w and not _fsdp.is_sharded(w):
        raise RuntimeError(
            f"the weight of layer {layer.name!r} is no longer the parameter this optimizer "
            "was built with (a new nn.Parameter was assigned, or the model was converted "
            "with torch.__future__.set_overwrite_module_params_on_conversion(True)); "
            "build the optimizer after changing the model, or change it in place "
            "(model.to(...) with the default settings keeps the parameters)"
        )
    return w


def _current_weight(layer: Layer):
    """The tensor the layer's module holds now where its weight was (None: not found)."""
    path, attr = layer.weight_site
    try:
        return getattr(layer.module.get_submodule(path) if path else layer.module, attr)
    except AttributeError:
        return None


def _weight_site(info: LayerInfo) -> tuple[str, str]:
    """(submodule path below the layer's module, attribute) of the layer's weight.

    The weight key is the module's path plus the attribute path below it
    (``blocks.0.attn.in_proj_weight``, ``...attn.out_proj.weight``); a weight named from
    elsewhere (a tied weight first registered by another module) is the module's
    ``weight`` attribute.
    """
    site, key = info.site, info.weight
    if site == "" or key.startswith(site + "."):
        *path, attr = (key if site == "" else key[len(site) + 1:]).split(".")
        return ".".join(path), attr
    return "", "weight"


def default_parameters(model: nn.Module, warn_unsupported: bool) -> list[Tensor]:
    """``params=None``: the trainable parameters of the layers; warn about the rest."""
    keys = {id(p): k for k, p in model.named_parameters() if p.requires_grad}
    by_key = dict(model.named_parameters())
    chosen: dict[int, Tensor] = {}
    for _, _, info in module_layers(model, keys):
        for k in info.params:
            chosen.setdefault(id(by_key[k]), by_key[k])
    left_out = [k for k, p in model.named_parameters() if p.requires_grad and id(p) not in chosen]
    if left_out and warn_unsupported:
        warnings.warn(
            f"SINGD(params=None) trains only the parameters of preconditioned layers "
            f"(opt.describe() lists them); these trainable parameters will NOT be trained: "
            f"{', '.join(left_out)}. Pass them explicitly in `params` (they then get SINGD's "
            "heavy-ball step without preconditioner), train them with another optimizer, or "
            "silence this with warn_unsupported=False",
            stacklevel=3,
        )
    return list(chosen.values())


def not_preconditioned(optimizer) -> list[str]:
    """Keys of the trained parameters that no layer owns (they get the identity step)."""
    return [k for grp in optimizer._groups for k in grp.plain]

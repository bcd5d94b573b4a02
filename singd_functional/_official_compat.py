"""The official package's names on the drop-in face, as read-only views of our state.

Code written for ``singd.optim.optimizer.SINGD`` 0.0.5 (and that package's own tests)
reads attributes of the optimizer besides the ``torch.optim`` ones: ``opt.steps``,
``opt.Ks[name]``, ``opt.module_names``, ``SINGD.SUPPORTED_STRUCTURES``, ... This module
gives :class:`~singd_functional.SINGD` those names through :class:`OfficialNames`, a
mixin. Every name is computed from our own state when it is read (the factors live in
``opt.state[weight]``, the step count in ``param_groups``): nothing is stored twice,
nothing here can drift from what the step uses, and assigning to a view raises.

It also converts the official package's checkpoints (:func:`from_official_state_dict`;
``SINGD.load_state_dict`` calls it when it is given one).
"""

from __future__ import annotations

import types
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import structures as _structures
from ._groups import Group, all_layers
from ._recording import combine
from .layers import LayerInfo, kind_of_module, layer_types

if TYPE_CHECKING:
    from .optim import SINGD

# the names the official package's SINGD documents as its state besides `state`
_STATE_ATTRIBUTES = ("steps", "_grad_scales", "Ks", "Cs", "m_Ks", "m_Cs", "H_Ks", "H_Cs")
# the structures the official package lists, in its order; ours add the rest
_OFFICIAL_EXAMPLES = ("dense", "diagonal", "block30diagonal", "hierarchical15_15",
                      "triltoeplitz", "triutoeplitz")


class _ClassView:
    """A class attribute computed at every read (e.g. from a registry that can grow)."""

    def __init__(self, compute):
        self.compute = compute
        self.__doc__ = compute.__doc__

    def __get__(self, obj, owner):
        return self.compute()


class _StructureTable(Mapping):
    """``SUPPORTED_STRUCTURES``: name -> structure type, for every name we accept.

    Iterating lists the fixed names and the official package's two parametrised
    examples (``block30diagonal``, ``hierarchical15_15``); looking up any other
    ``block{B}diagonal`` or ``hierarchical{K1}_{K2}`` works too.
    """

    def _names(self) -> tuple[str, ...]:
        fixed = [n for n in _structures.VALID_NAMES if "{" not in n]
        return tuple(dict.fromkeys([*_OFFICIAL_EXAMPLES, *fixed]))

    def __getitem__(self, name: str) -> type:
        try:
            return _structures.get(name)
        except ValueError as err:
            raise KeyError(name) from err

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            _structures.get(name)
        except ValueError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return f"SUPPORTED_STRUCTURES({', '.join(self._names())}, block{{B}}diagonal, " \
            "hierarchical{K1}_{K2})"


def _supported_modules() -> tuple[type[nn.Module], ...]:
    """The layer types SINGD preconditions (and their subclasses): the registry of
    ``layers.py``, read at every access, so registered kinds appear."""
    return layer_types()


class OfficialNames:
    """The official ``SINGD``'s attributes, read from this optimizer's own state.

    ``steps``                 the step count t (``param_groups[i]["step"]``)
    ``module_names``          {layer module: its name}, in ``model.named_modules()`` order
    ``Ks, Cs, m_Ks, m_Cs``    {layer name: structured matrix} (``m_Ks`` empty when alpha1 = 0)
    ``H_Ks, H_Cs``            {layer name: statistics accumulated since the last step}
                              (empty right after a step; H_C divided by the square of the
                              expected loss scale: init_grad_scale, then the last step's;
                              the tensors are the step's workspace: clone them to keep
                              them past the next ``step()``)
    ``preconditioner_dims``   (d_K, d_C) of a layer module
    class attributes          ``SUPPORTED_STRUCTURES``, ``SUPPORTED_MODULES``,
                              ``SUPPORTED_LOSS_AVERAGE``, ``STATE_ATTRIBUTES``

    The mappings are read-only snapshots: to change the factors, load a state dict.
    """

    SUPPORTED_STRUCTURES: Mapping[str, type] = _StructureTable()
    SUPPORTED_MODULES = _ClassView(_supported_modules)
    #: the strings the official package accepts; ours also takes a count of loss terms
    SUPPORTED_LOSS_AVERAGE: tuple[str | None, ...] = (None, "batch", "batch+sequence")
    STATE_ATTRIBUTES: tuple[str, ...] = _STATE_ATTRIBUTES

    # what the mixin reads from the SINGD it is part of (declared for the type checker)
    model: nn.Module
    param_groups: list[dict[str, Any]]
    state: defaultdict[Tensor, Any]
    init_grad_scale: float
    _statistics_scale: float
    _groups: list[Group]

    def _check_first_grad_scale(self, grad_scale) -> None:
        """As the official package: warn when the loss scale of step 0 is far from
        ``init_grad_scale`` (the first statistics are stored divided by the latter, which
        keeps low-precision factors finite only when the two are alike)."""
        if self.steps != 0:
            return
        scale, init = float(grad_scale), self.init_grad_scale
        if not (init / 2 <= scale <= init * 2):
            warnings.warn(
                f"the loss scale of step 0 is {scale:g} but SINGD was built with "
                f"init_grad_scale={init:g}; pass init_grad_scale={scale:g} (e.g. the "
                "GradScaler's init_scale) to keep the first statistics well scaled",
                stacklevel=3,
            )

    # ---------------------------------------------------------------- the views
    @property
    def steps(self) -> int:
        """The step count t: calls of ``step()`` since construction (or the loaded one's)."""
        return max((g["step"] for g in self.param_groups), default=0)

    @property
    def module_names(self) -> Mapping[nn.Module, str]:
        """{module: layer name} for the modules that carry one layer (all built-in kinds;
        a module of several layers, such as attention, is left out: see ``Ks``)."""
        layers = self._layers()
        count: dict[int, int] = {}
        for layer in layers:
            count[id(layer.module)] = count.get(id(layer.module), 0) + 1
        return types.MappingProxyType(
            {l.module: l.name for l in layers if count[id(l.module)] == 1}
        )

    @property
    def Ks(self) -> Mapping[str, Any]:
        return self._factor_view("K")

    @property
    def Cs(self) -> Mapping[str, Any]:
        return self._factor_view("C")

    @property
    def m_Ks(self) -> Mapping[str, Any]:
        return self._factor_view("m_K")

    @property
    def m_Cs(self) -> Mapping[str, Any]:
        return self._factor_view("m_C")

    @property
    def H_Ks(self) -> Mapping[str, Any]:
        return types.MappingProxyType(
            {name: s.H_K for name, s in self._pending_statistics().items()}
        )

    @property
    def H_Cs(self) -> Mapping[str, Any]:
        return types.MappingProxyType(
            {name: s.H_C for name, s in self._pending_statistics().items()}
        )

    @property
    def _grad_scales(self) -> dict[int, float]:
        """{t - 1: the loss scale of the last step} (the official package's bookkeeping)."""
        return {self.steps - 1: self._statistics_scale}

    def _get_param_group_entry(self, module: nn.Module, entry: str) -> Any:
        """``param_groups[i][entry]`` of the group that trains ``module`` (official name)."""
        for layer in self._layers():
            if layer.module is module:
                return self.param_groups[layer.group][entry]
        raise KeyError(f"{module} is not a layer this optimizer preconditions")

    @staticmethod
    def preconditioner_dims(module: nn.Module) -> tuple[int, int]:
        """(d_K, d_C): the sides of K and C for a layer module (d_K counts the bias)."""
        kind = kind_of_module(module)
        keys = {id(p): k for k, p in module.named_parameters()}
        info = None if kind is None else kind.describe("", module, keys)
        if kind is None or info is None:
            raise NotImplementedError(
                f"preconditioner_dims: {type(module).__name__} is no layer SINGD "
                f"preconditions (layer types: {', '.join(t.__name__ for t in layer_types())})"
            )
        if not isinstance(info, LayerInfo):
            raise NotImplementedError(
                f"preconditioner_dims: a {type(module).__name__} carries {len(info)} layers "
                f"({', '.join(i.name for i in info)}); read opt.Ks[name].dim and "
                "opt.Cs[name].dim of each instead"
            )
        return info.d_K, info.d_C

    # ------------------------------------------------------------- internals
    def _layers(self) -> list:
        """Our layer records in ``model.named_modules()`` order (the official order)."""
        order = {name: i for i, (name, _) in enumerate(self.model.named_modules())}
        return sorted(all_layers(self._groups),
                      key=lambda l: (order.get(l.info.site, len(order)), l.name))

    def _pending_statistics(self) -> dict[str, Any]:
        """{layer name: H_K, H_C of the backward passes since the last step}, combined
        as the coming step will combine them (before any all-reduce)."""
        return {
            layer.name: combine(layer.parts, self.param_groups[layer.group]["loss_average"])
            for layer in self._layers() if layer.parts
        }

    def _factor_view(self, key: str) -> Mapping[str, Any]:
        out = {}
        for layer in self._layers():
            st = self.state[self._groups[layer.group].weight(layer)]
            if key in st:
                out[layer.name] = st[key]
        return types.MappingProxyType(out)


# ------------------------------------------------------------------ checkpoints
def is_official_state_dict(state_dict: Mapping) -> bool:
    """True for a state dict of the official package's SINGD (it has ``Ks`` and ``steps``)."""
    return isinstance(state_dict, Mapping) and "Ks" in state_dict and "steps" in state_dict \
        and "singd" not in state_dict


def from_official_state_dict(official: Mapping[str, Any], optimizer: SINGD) -> dict[str, Any]:
    """Our state dict for ``optimizer`` from a state dict of the official ``SINGD`` 0.0.5.

    Continue a run that the official package began: build ``optimizer`` with the same
    model, params and hyperparameters as the official one, then::

        official = torch.load("singd_checkpoint.pt", weights_only=False)
        opt.load_state_dict(sf.from_official_state_dict(official, opt))
        # or simply opt.load_state_dict(official): it recognises the format

    The official package pickles its structured matrices, so its checkpoints load only
    with ``torch.load(..., weights_only=False)`` (trusted files only) and with ``singd``
    installed. The factors are copied exactly (stored entries, not a projection); the
    step count, momentum buffers, loss scale and the official param groups'
    hyperparameters come along. ``official`` is not modified.

    Raises:
        ValueError: when the checkpoint does not fit ``optimizer`` (other layers, shapes,
            structures), or holds statistics of a backward pass not yet stepped (save
            official checkpoints after ``step()``).
    """
    if not is_official_state_dict(official):
        raise ValueError(
            "from_official_state_dict: not a state dict of singd.optim.optimizer.SINGD (it "
            "has no 'Ks' and 'steps' entries); our own state dicts load with load_state_dict"
        )
    if any(len(official.get(k) or {}) for k in ("H_Ks", "H_Cs")):
        raise ValueError(
            "from_official_state_dict: the official checkpoint holds statistics of a backward "
            "pass that was not stepped yet (H_Ks/H_Cs); save it after opt.step()"
        )
    ours = optimizer.state_dict()
    saved = official["param_groups"]
    if len(saved) != len(ours["param_groups"]) or any(
        len(s["params"]) != len(g["params"]) for s, g in zip(saved, ours["param_groups"])
    ):
        raise ValueError(
            "from_official_state_dict: the official checkpoint has other param groups "
            f"(sizes {[len(s['params']) for s in saved]}) than this optimizer "
            f"({[len(g['params']) for g in ours['param_groups']]}); build SINGD with the same "
            "model and params as the official optimizer was built with"
        )
    for index, (s, g) in enumerate(zip(saved, ours["param_groups"])):
        for entry in ("structures", "kfac_like"):
            theirs, mine = s.get(entry), g.get(entry)
            if entry == "structures" and theirs is not None:
                theirs = tuple(theirs)
            if theirs != mine:
                raise ValueError(
                    f"from_official_state_dict: param group {index} was built with "
                    f"{entry}={theirs!r} in the official checkpoint and {entry}={mine!r} here; "
                    "build SINGD with the same configuration as the official optimizer"
                )
    steps = int(official["steps"])
    scales = dict(official.get("_grad_scales") or {})
    scale = float(scales.get(steps - 1, optimizer.init_grad_scale))

    # our index of each parameter, and the official one at the same position
    ours_of: dict[int, int] = {}
    for s, g in zip(saved, ours["param_groups"]):
        ours_of.update(zip(s["params"], g["params"]))
    index_of = {id(p): i for g, og in zip(optimizer.param_groups, ours["param_groups"])
                for p, i in zip(g["params"], og["params"])}

    state = {i: dict(st) for i, st in ours["state"].items()}
    for off_i, st in official["state"].items():
        i = ours_of[off_i]
        buf = st.get("momentum_buffer")
        if buf is not None:
            mine = state[i]["momentum_buffer"]
            if buf.shape != mine.shape:
                raise ValueError(
                    f"from_official_state_dict: parameter {off_i} has shape {tuple(mine.shape)} "
                    f"here and {tuple(buf.shape)} in the official checkpoint; build SINGD with "
                    "the same model"
                )
            state[i]["momentum_buffer"] = buf.detach().clone()

    for layer in all_layers(optimizer._groups):
        name = layer.name
        off_name = _official_name(name, official["Ks"])
        i = index_of[id(optimizer._groups[layer.group].weight(layer))]
        for key, table in (("K", "Ks"), ("C", "Cs"), ("m_K", "m_Ks"), ("m_C", "m_Cs")):
            matrix = (official.get(table) or {}).get(off_name)
            if key not in state[i] and matrix is None:
                continue
            if matrix is None or key not in state[i]:
                where = "here" if matrix is not None else "in the official checkpoint"
                raise ValueError(
                    f"from_official_state_dict: layer {name!r} has no {table[:-1]} {where}; "
                    "build SINGD with the same model, params and alpha1 (0 or not) and "
                    "kfac_like as the official optimizer"
                )
            state[i][key] = _converted(state[i][key], matrix, name, key)

    groups = []
    for s, g in zip(saved, ours["param_groups"]):
        g = dict(g)
        for k, v in s.items():
            if k in g and k not in ("params", "step"):
                g[k] = tuple(v) if k in ("structures", "preconditioner_dtype") else v
        if callable(g.get("lr_cov")):  # a callable is never part of our state dicts
            g["lr_cov"] = None
        g["step"] = steps
        groups.append(g)
    return {**ours, "state": state, "param_groups": groups,
            "singd": {**ours.get("singd", {}), "statistics_scale": scale}}


def _official_name(name: str, table: Mapping[str, Any]) -> str:
    """The official name of our layer ``name`` (a DDP wrapper adds ``module.`` here)."""
    if name in table:
        return name
    if name.startswith("module.") and name[len("module."):] in table:
        return name[len("module."):]
    raise ValueError(
        f"from_official_state_dict: layer {name!r} is not in the official checkpoint (it has "
        f"{', '.join(table) or 'no layers'}); build SINGD with the same model"
    )


def _converted(packed: Mapping[str, Any], matrix, name: str, key: str) -> dict[str, Any]:
    """The official ``matrix`` in our packed checkpoint form, with ``packed``'s structure."""
    cls = _structures.get(packed["structure"])
    dense = matrix.to_dense().detach()
    ours = _read_entries(cls, dense)
    if ours is None:
        raise ValueError(
            f"from_official_state_dict: {key} of layer {name!r} ({type(matrix).__name__}) is "
            f"not a {cls.name} matrix; build SINGD with the same structures as the official one"
        )
    like = packed["tensors"][0]
    return {"structure": packed["structure"],
            "tensors": [t.to(like.dtype) for t in ours.leaves]}


def _read_entries(cls: type[_structures.StructuredMatrix], dense: Tensor):
    """The ``cls`` matrix whose dense form is ``dense`` exactly, or None if there is none.

    Reads each stored entry off the position where ``cls.to_dense`` places it (found
    once with distinct codes in place of the entries), so no structure's layout is
    spelled out here.
    """
    d = dense.shape[-1]
    if dense.shape != (d, d):
        return None
    template = cls.eye(d, dtype=torch.float64)
    sizes = [leaf.numel() for leaf in template.leaves]
    codes = torch.arange(1, sum(sizes) + 1, dtype=torch.float64)
    coded = cls(*(c.reshape(leaf.shape) for c, leaf in zip(codes.split(sizes),
                                                             template.leaves)))
    placed = coded.to_dense().flatten().round().long()
    where = torch.full((len(codes) + 1,), d * d, dtype=torch.long)
    where.scatter_reduce_(0, placed, torch.arange(d * d), "amin")
    values = torch.cat([dense.flatten(), dense.new_zeros(1)])[where[1:]]
    out = cls(*(v.reshape(leaf.shape) for v, leaf in zip(values.split(sizes), template.leaves)))
    return out if torch.equal(out.to_dense(), dense) else None

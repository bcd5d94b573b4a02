"""The drop-in face's checkpoints (private): ``state_dict`` packing and unpacking.

Structured factors are saved as ``{"structure": name, "tensors": [...]}``, so a
checkpoint holds only tensors and plain Python values and ``torch.load(...,
weights_only=True)`` reads it. A callable ``lr_cov`` is saved as None (the optimizer
loaded into keeps its own).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, NoReturn

from torch import Tensor

from . import _options, _recording
from . import structures as _structures
from ._groups import locked
from ._official_compat import from_official_state_dict, is_official_state_dict


def pack(optimizer, packed: dict[str, Any]) -> dict[str, Any]:
    """``Optimizer.state_dict()``'s output ``packed`` in plain values, plus our own entries."""
    groups = []
    for g in packed["param_groups"]:
        g = dict(g)
        if callable(g["lr_cov"]):
            g["lr_cov"] = None
        groups.append(g)
    state = {i: {k: _pack(v) for k, v in st.items()} for i, st in packed["state"].items()}
    return {"state": state, "param_groups": groups,
            "singd": {"statistics_scale": optimizer._statistics_scale}}


def load(optimizer, state_dict: dict[str, Any]) -> None:
    """The body of ``SINGD.load_state_dict``; the argument is not modified.

    All or nothing: everything is read and checked against this optimizer's parameters,
    layers and structures first; a refused state dict leaves the optimizer as it was.
    A state dict of the official package's SINGD is converted first
    (:func:`~singd_functional.from_official_state_dict`).
    """
    if is_official_state_dict(state_dict):
        state_dict = from_official_state_dict(state_dict, optimizer)
    state_dict = dict(state_dict)
    for pre_hook in optimizer._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    if not isinstance(state_dict.get("state"), dict) or not isinstance(
        state_dict.get("param_groups"), (list, tuple)
    ):
        raise TypeError(
            "load_state_dict expects the output of SINGD.state_dict() (a dict with 'state' "
            f"and 'param_groups'), got keys {sorted(map(str, state_dict))}"
        )
    saved_groups = copy.deepcopy(list(state_dict["param_groups"]))
    if len(saved_groups) != len(optimizer.param_groups) or any(
        len(s["params"]) != len(g["params"])
        for s, g in zip(saved_groups, optimizer.param_groups)
    ):
        raise ValueError(
            "the loaded state dict has different param groups (number or sizes) than this "
            "optimizer; build the optimizer with the same model and params as the saved one"
        )
    id_map = {i: p for s, g in zip(saved_groups, optimizer.param_groups)
              for i, p in zip(s["params"], g["params"])}
    names = {id(p): k for grp in optimizer._groups for k, p in grp.params.items()}
    state: defaultdict[Tensor, dict] = defaultdict(dict)
    for i, st in state_dict["state"].items():
        if i not in id_map or not isinstance(st, dict):
            raise ValueError(
                f"the loaded state dict has state for parameter {i!r}, which none of its "
                "param groups lists; it is not a SINGD.state_dict() of this configuration"
            )
        p = id_map[i]
        state[p] = {k: _unpack(v, p.device) for k, v in st.items()}
    groups: list[dict[str, Any]] = []
    for saved, current in zip(saved_groups, optimizer.param_groups):
        if saved.get("lr_cov") is None and current["lr_cov"] is not None:
            saved["lr_cov"] = current["lr_cov"]  # a callable is not saved
        where = f"the loaded state dict's param group {len(groups)}"
        missing = [k for k in (*optimizer.defaults, "step") if k not in saved]
        if missing:
            raise ValueError(f"{where} lacks {missing}; it was not saved by SINGD.state_dict()")
        _options.check_group(where, saved, host_tensors=True)
        saved["params"] = current["params"]
        groups.append(saved)

    for grp, group in zip(optimizer._groups, groups):
        for layer in grp.layers:
            st = state[grp.weight(layer)]
            for key, name in (("K", group["structures"][0]), ("C", group["structures"][1])):
                M = st.get(key)
                if M is None or M.name != _structures.get(name).name:
                    raise ValueError(
                        f"param group {grp.index}, layer {layer.name!r}: the state dict has no "
                        f"{key} of structure {name!r}; it was saved from another model or "
                        "optimizer configuration"
                    )
    for p, st in state.items():
        _check_shapes(names.get(id(p), "a parameter"), p, st, optimizer.state.get(p, {}))

    # everything checked: from here on nothing raises
    for grp, group in zip(optimizer._groups, groups):
        grp.locked = locked(group)
        grp.keeps_momenta = all("m_K" in state[grp.weight(l)] for l in grp.layers) \
            and bool(grp.layers)
        grp.transforms.clear()
        for layer in grp.layers:
            layer.products = None
    optimizer.__setstate__({"state": state, "param_groups": groups})
    optimizer._statistics_scale = float(
        state_dict.get("singd", {}).get("statistics_scale", optimizer.init_grad_scale)
    )
    _recording.drop(optimizer)
    for post_hook in optimizer._optimizer_load_state_dict_post_hooks.values():
        post_hook(optimizer)


def _check_shapes(name: str, p: Tensor, saved: dict, current: dict) -> None:
    """Raise if a loaded state entry of parameter ``name`` does not fit it (another model)."""
    def refuse(what: str) -> NoReturn:
        raise ValueError(
            f"parameter {name!r} (shape {tuple(p.shape)}): the state dict's {what}; it was "
            "saved from another model (equal parameter counts, other shapes); build the "
            "optimizer with the model the checkpoint was saved with"
        )

    for key, value in saved.items():
        if key == "momentum_buffer":
            if not isinstance(value, Tensor) or value.shape != p.shape:
                refuse(f"momentum_buffer is {_describe(value)}")
        elif isinstance(value, _structures.StructuredMatrix):
            ref = current.get(key, current.get(key[2:] if key.startswith("m_") else key))
            if not isinstance(ref, _structures.StructuredMatrix):
                refuse(f"{key} belongs to a preconditioned layer, and this parameter's is not")
            # the structure may differ (the loaded group's is adopted), the dimension not
            shapes = [tuple(t.shape) for t in value.leaves]
            expected = type(value).zeros(ref.dim, device="meta").leaves
            if shapes != [tuple(t.shape) for t in expected]:
                refuse(f"{key} is a {value.name} of tensor shapes {shapes}, expected "
                       f"{[tuple(t.shape) for t in expected]} (dimension {ref.dim})")
        elif isinstance(current.get(key), Tensor):
            if not isinstance(value, Tensor) or value.shape != current[key].shape:
                refuse(f"{key} is {_describe(value)}, expected shape "
                       f"{tuple(current[key].shape)}")


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


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

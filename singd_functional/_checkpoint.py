"""The drop-in face's checkpoints (private): ``state_dict`` packing and unpacking.

Structured factors are saved as ``{"structure": name, "tensors": [...]}``, so a
checkpoint holds only tensors and plain Python values and ``torch.load(...,
weights_only=True)`` reads it. A callable ``lr_cov`` is saved as None (the optimizer
loaded into keeps its own).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

from torch import Tensor

from . import _recording
from . import structures as _structures
from ._groups import locked


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
    """The body of ``SINGD.load_state_dict``; the argument is not modified."""
    state_dict = dict(state_dict)
    for pre_hook in optimizer._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    saved_groups = copy.deepcopy(state_dict["param_groups"])
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
    state: defaultdict[Tensor, dict] = defaultdict(dict)
    for i, st in state_dict["state"].items():
        p = id_map[i]
        state[p] = {k: _unpack(v, p.device) for k, v in st.items()}
    groups = []
    for saved, current in zip(saved_groups, optimizer.param_groups):
        if saved.get("lr_cov") is None and current["lr_cov"] is not None:
            saved["lr_cov"] = current["lr_cov"]  # a callable is not saved
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

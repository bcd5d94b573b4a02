"""Stage 1 of the data path: which layers SINGD preconditions, described statically.

:func:`find_layers` walks a model once and returns a hashable tuple of
:class:`LayerInfo`; everything after it (capture, statistics, the factor update, the
preconditioned step) reads only this description and tensors, never the modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class LayerInfo:
    """Static description of one supported layer.

    Attributes:
        name: the module's path in ``model.named_modules()``.
        kind: ``"linear"``, ``"conv1d"`` or ``"conv2d"``.
        weight: key of the weight in ``dict(model.named_parameters())``.
        bias: key of the bias there, or ``None`` when the layer has no bias or its
            bias is frozen (then the bias is not part of W~ and is not updated).
        d_in: columns of the flattened weight (``C_in/groups * prod(kernel)`` for convs).
        d_out: rows of the weight (output features / channels).
        kernel_size, stride, padding, dilation, groups, padding_mode: conv settings
            (2-tuples; conv1d is a conv2d of height 1). ``padding`` is resolved to
            ``(top, bottom, left, right)``; ``"same"`` may be asymmetric.
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


def _conv_padding(mod: nn.Module, ks: tuple[int, int], dil: tuple[int, int]):
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


def describe(name: str, mod: nn.Module, param_keys: dict[int, str]) -> LayerInfo:
    """The :class:`LayerInfo` of one supported module (see :func:`find_layers`)."""
    weight = param_keys[id(mod.weight)]
    bias = None
    if mod.bias is not None and mod.bias.requires_grad and id(mod.bias) in param_keys:
        bias = param_keys[id(mod.bias)]
    if isinstance(mod, nn.Linear):
        return LayerInfo(name, "linear", weight, bias, mod.in_features, mod.out_features)
    is_1d = isinstance(mod, nn.Conv1d)
    ks = (1, mod.kernel_size[0]) if is_1d else tuple(mod.kernel_size)
    stride = (1, mod.stride[0]) if is_1d else tuple(mod.stride)
    dil = (1, mod.dilation[0]) if is_1d else tuple(mod.dilation)
    return LayerInfo(
        name,
        "conv1d" if is_1d else "conv2d",
        weight,
        bias,
        d_in=mod.weight[0].numel(),
        d_out=mod.weight.shape[0],
        kernel_size=ks,
        stride=stride,
        padding=_conv_padding(mod, ks, dil),
        dilation=dil,
        groups=mod.groups,
        padding_mode=mod.padding_mode,
    )


def find_layers(model: nn.Module, params=None) -> tuple[LayerInfo, ...]:
    """Describe every supported layer of ``model`` whose weight is trained.

    Supported: ``nn.Linear`` (any number of leading dims), ``nn.Conv1d``, ``nn.Conv2d``
    (any stride, dilation, groups, padding incl. ``"same"``/``"valid"``, any
    padding_mode). A layer whose weight does not require grad is left out; a frozen
    bias beside a trained weight is fine (the bias is left out of W~).

    Args:
        model: the model.
        params: optional iterable of parameters; only layers whose weight is among
            them are returned (the stateful optimizer uses this for param groups).

    Returns:
        A tuple of :class:`LayerInfo`, in ``named_modules()`` order; hashable.
    """
    param_keys = {id(p): k for k, p in model.named_parameters()}
    wanted = None if params is None else {id(p) for p in params}
    out = []
    for name, mod in model.named_modules():
        if type(mod) not in SUPPORTED or not isinstance(mod.weight, torch.Tensor):
            continue
        if not mod.weight.requires_grad or id(mod.weight) not in param_keys:
            continue
        if wanted is not None and id(mod.weight) not in wanted:
            continue
        out.append(describe(name, mod, param_keys))
    return tuple(out)

"""Stage 1 (a layer kind): ``nn.MultiheadAttention`` as three Kronecker-factored layers.

``nn.MultiheadAttention`` keeps its input projection as a raw parameter
(``in_proj_weight``, or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when the
key/value widths differ) and its ``forward`` calls ``F.multi_head_attention_forward``,
which applies ``linear`` to those weights and to ``out_proj.weight`` itself. No module
hook sees these maps, so the kind brings its own forward (:func:`attention_forward`):
the same computation with every projection routed through a *tap*, which the capture
and the drop-in use to read the projection's input and the gradient of its output.

The layers of one attention module ``attn`` (each ``z = W~ a`` of
docs/algorithm.md#layers-and-the-matrix-view):

* ``attn.in_proj``: ``[q; k; v] = W_in x + b_in`` as ONE ``Linear(E, 3E)`` (weight
  ``in_proj_weight`` [3E, E], bias ``in_proj_bias``), applied once per distinct input:
  self-attention (query is key is value, or views of the same elements) is one input;
  cross-attention with key is value is two (the query feeds rows [0, E), the key/value
  rows [E, 3E)); three different tensors are three. The layer is tapped once per module
  call with the distinct inputs concatenated along the positions and their outputs
  padded with zeros to all 3E columns; so each input's output gradient has the 3E
  columns, zero where that input does not feed, and the statistics pool the inputs'
  positions, exactly as for a ``Linear(E, 3E)`` called once per input with its unused
  output columns dropped (the oracle in tests/test_layers_attention.py). Only the rows
  each input feeds are computed; the padding and concatenation cost one copy of the
  projections on statistics steps of cross-attention (measured: cross-attention forward
  + backward 0.99x PyTorch's ``nn.MultiheadAttention`` with the taps, 0.85x without;
  self-attention 0.92x / 0.84x; E=64, 4 heads, N=32, L=64, one thread, a loaded machine,
  median of 25 interleaved runs).
* ``attn.q_proj``, ``attn.k_proj``, ``attn.v_proj`` instead when the projections are
  separate (``kdim``/``vdim`` differ from ``embed_dim``): one ``Linear`` each with its
  own input. Their biases are slices of one tensor, ``in_proj_bias``; a Kronecker layer
  owns whole tensors, so that bias is left to the fallback step (heavy ball without
  preconditioner, or the ``fallback`` transform).
* ``attn.out_proj``: ``out_proj`` (a ``Linear`` subclass whose ``forward`` is never
  called).

Captured rows are batch-first ([N, L, E]) whatever ``batch_first`` says, so N is the
batch size for ``loss_average="batch"``; an unbatched call ([L, E]) is a batch of one.

Refused (a ValueError that says what to do): ``add_bias_kv`` and ``add_zero_attn``
(the appended key/value positions are not rows of a projection). Dropout is applied
where PyTorch applies it (on the attention weights, or inside
``scaled_dot_product_attention``); the equality tests run with dropout 0.

Why a re-implementation (:func:`attention_forward`, the kind's ``forward``) rather
than a ``TorchFunctionMode`` that intercepts the ``linear`` calls PyTorch's function
makes on ``in_proj_weight`` (or a view of it) and ``out_proj.weight``: which calls
PyTorch makes (packed, split, chunked views) is an implementation detail that has
changed between releases, a mode is one more layer that dynamo must trace, and fx
cannot trace ``MultiheadAttention.forward`` at all (it branches on ``query.dim()``).
Written out, the calls are fixed, the capture's fx program calls this function where
the model calls the module, dynamo compiles it (``fullgraph=True``, see tests), and it
is not slower than PyTorch's (figures above). It is checked against
``nn.MultiheadAttention`` (outputs, attention weights, gradients; 4e-16 in float64) for
``batch_first`` both ways, unbatched input, self / cross / three-input attention,
separate projections, boolean, float, 3-D and causal masks, ``key_padding_mask``,
``need_weights`` both ways and ``average_attn_weights``. The drop-in optimizer
computes the module's output once more through it on statistics steps (its forward
hook, ``_recording.SiteHook``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import LayerInfo, LayerKind, _linear_rows, register_layer_kind

Tap = Callable[[str, Tensor, Tensor], Tensor]

IN_PROJ, OUT_PROJ = "in_proj", "out_proj"
SEPARATE = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class AttentionLayerInfo(LayerInfo):
    """A projection of one ``nn.MultiheadAttention``; ``slot`` says which one."""

    slot: str = IN_PROJ


def _refusal(name: str, mha: Any) -> str | None:
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv=True"
    if mha.add_zero_attn:
        return "add_zero_attn=True"
    return None


def describe_attention(name: str, mha: Any, param_keys: Mapping[int, str]):
    """The projections of ``mha`` (an ``nn.MultiheadAttention``) whose weights are trained."""
    keys = [param_keys.get(id(p)) for p in mha.parameters()]
    if not any(keys):
        return ()
    why = _refusal(name, mha)
    if why is not None:
        raise ValueError(
            f"nn.MultiheadAttention {name!r} was built with {why}: SINGD cannot read its "
            "projections as Kronecker layers (the appended key/value positions are not rows "
            "of a projection). Build it without that option, or leave its parameters out "
            "of SINGD (pass `params` without them and train them with another optimizer)"
        )
    E = mha.embed_dim

    def key(t):
        return param_keys.get(id(t)) if isinstance(t, Tensor) else None

    out = []
    if mha._qkv_same_embed_dim:
        w = key(mha.in_proj_weight)
        if w is not None:
            b = key(mha.in_proj_bias)
            out.append(AttentionLayerInfo(f"{name}.{IN_PROJ}", "attention", w, b, E, 3 * E,
                                          module=name, slot=IN_PROJ))
    else:
        for slot, d_in in zip(SEPARATE, (E, mha.kdim, mha.vdim)):
            w = key(getattr(mha, f"{slot}_weight"))
            if w is not None:
                out.append(AttentionLayerInfo(f"{name}.{slot}", "attention", w, None, d_in, E,
                                              module=name, slot=slot))
    w = key(mha.out_proj.weight)
    if w is not None:
        out.append(AttentionLayerInfo(f"{name}.{OUT_PROJ}", "attention", w,
                                      key(mha.out_proj.bias), E, E, module=name, slot=OUT_PROJ))
    return tuple(out)


def _canonical(mask: Tensor | None, dtype: torch.dtype, name: str) -> Tensor | None:
    """A boolean mask (True = masked) as an additive float mask; a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    if not torch.is_floating_point(mask):
        raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")
    return mask


def _packed_projection(tap: Tap | None, W: Tensor, b: Tensor | None, inputs, E: int):
    """q, k, v from ``[q; k; v] = W x + b``, one tap for all distinct inputs.

    ``inputs`` pairs each distinct input [N, L_i, E] with the row block [lo, hi) of
    the 3E outputs it feeds. The tap sees the inputs concatenated along the positions
    and the outputs padded with zeros to 3E columns (the columns this input does not
    feed; their gradient is zero, as for a ``Linear(E, 3E)`` whose unused outputs are
    dropped). Pooling the positions is what several calls of one layer give in the
    statistics, so this is the "one call per distinct input" layer, in one tap.
    """
    outs = []
    for x, (lo, hi) in inputs:
        full = (lo, hi) == (0, 3 * E)
        outs.append(F.linear(x, W if full else W[lo:hi],
                             None if b is None else (b if full else b[lo:hi])))
    if tap is None:
        return outs
    if len(inputs) == 1:
        return [tap(IN_PROJ, inputs[0][0], outs[0])]
    a = torch.cat([x for x, _ in inputs], 1)
    z = torch.cat([F.pad(o, (lo, 3 * E - hi)) for o, (_, (lo, hi)) in zip(outs, inputs)], 1)
    z = tap(IN_PROJ, a, z)
    parts, start = [], 0
    for x, (lo, hi) in inputs:
        parts.append(z[:, start:start + x.shape[1], lo:hi])
        start += x.shape[1]
    return parts


def _single(tap: Tap | None, slot: str, x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    z = F.linear(x, W, b)
    return z if tap is None else tap(slot, x, z)


def attention_forward(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    *,
    tap: Tap | None = None,
    slots: frozenset[str] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``mha(query, key, value, ...)`` (the training path), projections through ``tap``.

    Same arguments and result as ``nn.MultiheadAttention.forward``. ``tap(slot, a, z)
    -> z`` is called for every projection whose slot (``"in_proj"``, ``"q_proj"``,
    ``"k_proj"``, ``"v_proj"``, ``"out_proj"``) is in ``slots`` (all when None), once
    per call, with ``a`` the batch-first input [N, L, d_in] and ``z`` the batch-first
    output [N, L, d_out] (module docstring); the returned tensor is used.
    """
    why = _refusal("", mha)
    if why is not None:
        raise ValueError(f"attention_forward does not support {why}")

    def tapped(slot: str) -> Tap | None:
        return None if tap is None or (slots is not None and slot not in slots) else tap

    # the same elements passed as two tensors count as one input (fully_shard on the
    # attention module hands it each argument through an autograd function, one alias each)
    key = query if _same_elements(key, query) else key
    value = key if _same_elements(value, key) else (
        query if _same_elements(value, query) else value)
    batched = query.dim() == 3
    E, H = mha.embed_dim, mha.num_heads
    hd = E // H
    if batched and not mha.batch_first:  # batch-first views; which are the same is kept
        query, key, value = _same_map(lambda t: t.transpose(0, 1), query, key, value)
    elif not batched:
        query, key, value = _same_map(lambda t: t.unsqueeze(0), query, key, value)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    N, L, S = query.shape[0], query.shape[1], key.shape[1]

    kpm = _canonical(key_padding_mask, query.dtype, "key_padding_mask")
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "is_causal=True needs attn_mask as well (as nn.MultiheadAttention): pass "
            "nn.Transformer.generate_square_subsequent_mask(L) with it"
        )
    use_causal = is_causal and kpm is None and not need_weights
    mask = None if use_causal else _canonical(attn_mask, query.dtype, "attn_mask")
    if mask is not None:
        if mask.dim() == 2 and tuple(mask.shape) == (L, S):
            mask = mask.view(1, 1, L, S)
        elif mask.dim() == 3 and tuple(mask.shape) == (N * H, L, S):
            mask = mask.view(N, H, L, S)
        else:
            raise RuntimeError(
                f"attn_mask has shape {tuple(mask.shape)}; expected ({L}, {S}) or "
                f"({N * H}, {L}, {S})"
            )
    if kpm is not None:
        if tuple(kpm.shape) != (N, S):
            raise RuntimeError(
                f"key_padding_mask has shape {tuple(kpm.shape)}; expected ({N}, {S})"
            )
        kpm = kpm.view(N, 1, 1, S)
        mask = kpm if mask is None else mask + kpm

    if mha._qkv_same_embed_dim:
        if key is value and query is key:
            pieces = [(query, (0, 3 * E))]
        elif key is value:
            pieces = [(query, (0, E)), (key, (E, 3 * E))]
        else:
            pieces = [(x, (i * E, (i + 1) * E)) for i, x in enumerate((query, key, value))]
        parts = _packed_projection(tapped(IN_PROJ), mha.in_proj_weight, mha.in_proj_bias,
                                   pieces, E)
        if len(parts) == 1:
            q, k, v = parts[0].chunk(3, -1)
        elif len(parts) == 2:
            q, (k, v) = parts[0], parts[1].chunk(2, -1)
        else:
            q, k, v = parts
    else:
        bias = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
        q, k, v = (
            _single(tapped(slot), slot, x, getattr(mha, f"{slot}_weight"), bb)
            for slot, x, bb in zip(SEPARATE, (query, key, value), bias)
        )

    q = q.reshape(N, L, H, hd).transpose(1, 2)  # [N, H, L, hd]
    k = k.reshape(N, S, H, hd).transpose(1, 2)
    v = v.reshape(N, S, H, hd).transpose(1, 2)
    dropout = mha.dropout if mha.training else 0.0
    weights = None
    if need_weights:
        scores = (q * math.sqrt(1.0 / hd)) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if dropout > 0.0:
            weights = F.dropout(weights, p=dropout)
        o = weights @ v
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        o = F.scaled_dot_product_attention(q, k, v, mask, dropout, use_causal)
    o = o.transpose(1, 2).reshape(N, L, E)
    out = _single(tapped(OUT_PROJ), OUT_PROJ, o, mha.out_proj.weight, mha.out_proj.bias)
    if not batched:
        return out.squeeze(0), None if weights is None else weights.squeeze(0)
    if not mha.batch_first:
        out = out.transpose(0, 1)
    return out, weights


def _same_elements(a: Tensor, b: Tensor) -> bool:
    """``a is b``, or a view of the very same elements (same storage, offset, strides)."""
    if a is b:
        return True
    if torch.compiler.is_compiling() or a.device.type == "meta" or a.shape != b.shape:
        return False  # (traced: tensors passed as one are one; no storage to compare)
    try:
        return (a.stride() == b.stride() and a.dtype == b.dtype and a.device == b.device
                and a.storage_offset() == b.storage_offset()
                and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())
    except NotImplementedError:  # torch.func's wrapped tensors have no storage to compare
        return False


def _same_map(fn: Callable[[Tensor], Tensor], query: Tensor, key: Tensor, value: Tensor):
    """``fn`` of q, k, v, keeping which of them are the same tensor (it decides the calls)."""
    q = fn(query)
    k = q if key is query else fn(key)
    v = k if value is key else (q if value is query else fn(value))
    return q, k, v


def _forward(module: Any, infos, tap: Tap, args, kwargs):
    """:attr:`LayerKind.forward` of the attention kind: ``tap`` gets the layer names."""
    names = {info.slot: info.name for info in infos}

    def by_name(slot: str, a: Tensor, z: Tensor) -> Tensor:
        return tap(names[slot], a, z)

    return attention_forward(module, *args, **kwargs, tap=by_name, slots=frozenset(names))


def _rows(info: LayerInfo, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    return _linear_rows(info, x, g)


ATTENTION = LayerKind("attention", describe_attention, _rows, forward=_forward)
register_layer_kind(nn.MultiheadAttention, ATTENTION)

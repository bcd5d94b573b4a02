"""Stage 1 (a layer kind): ``nn.Embedding`` as a Kronecker-factored layer.

An embedding ``z = weight[i]`` is ``Linear(V, d)`` applied to the one-hot row of the
index ``i``: its weight matrix (``z = W a``) is ``weight.T`` [d, V], K is over the
vocabulary (d_K = V) and C over the embedding dimension (d_C = d). One-hot rows make
A exactly diagonal, ``A = diag(token counts) / R``, so:

* K is **always diagonal** (forced, whatever structure pair is passed; a dense V x V
  factor would cost V^2 numbers for a matrix that is diagonal anyway), and H_K is
  built from the indices with one ``index_add`` (``kfac_approx="expand"``) or a
  per-sample count (``"reduce"``, an [N, V] buffer). No one-hot row is formed.
* C has the structure you choose; H_C comes from the output gradients as for a Linear.

``padding_idx``: PyTorch gives that row a zero gradient, and a diagonal K keeps a zero
row of G zero, so the preconditioned direction of that row is exactly zero (with
``weight_decay=0``, or with the zero row ``nn.Embedding`` initialises it to, the row
never moves). ``sparse=True`` is refused (a sparse gradient has no dense matrix view).

Weight tying (``head.weight is emb.weight``, a Linear head sharing the table): one
parameter, one preconditioner. The head owns it: its Kronecker factors (K over the
hidden width from the head's inputs, C over the vocabulary from its output gradients)
precondition the summed gradient that autograd accumulates from both uses; the
embedding is then not a layer of its own (``LayerKind.yields_tied``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from .capture import LayerCapture
from .layers import LayerInfo, LayerKind, register_layer_kind
from .statistics import LayerStatistics, loss_scale
from .structures import Diagonal, StructuredMatrix


@dataclass(frozen=True)
class EmbeddingLayerInfo(LayerInfo):
    """An ``nn.Embedding``; ``padding_idx`` as the module has it (informational)."""

    padding_idx: int | None = None


def describe_embedding(name: str, mod: Any, param_keys: Mapping[int, str]):
    """The layer of ``mod`` (an ``nn.Embedding``) when its weight is trained."""
    weight = param_keys.get(id(mod.weight))
    if weight is None:
        return None
    if mod.sparse:
        raise ValueError(
            f"nn.Embedding {name!r} has sparse=True: its gradient is a sparse tensor, which "
            "SINGD cannot precondition. Build it with sparse=False, or leave its weight out "
            "of SINGD (pass `params` without it and train it with e.g. torch.optim.SparseAdam)"
        )
    V, d = mod.weight.shape
    return EmbeddingLayerInfo(name, "embedding", weight, None, d_in=V, d_out=d,
                              padding_idx=mod.padding_idx)


def _batched(info: LayerInfo, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Indices [N, S] and output gradients [N, S, d]: the leading dim is the batch."""
    if x.dim() == 0:
        x, g = x.reshape(1), g.reshape(1, -1)
    n = x.shape[0]
    return x.reshape(n, -1), g.reshape(n, -1, info.d_out)


def _rows(info: LayerInfo, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """The one-hot a-rows [N, S, V] of the contract. Only ever called on 'meta'
    tensors (for N and S); the statistics below never build them."""
    ids, g = _batched(info, x, g)
    a = torch.zeros(*ids.shape, info.d_in, dtype=g.dtype, device=g.device)
    return a.scatter(-1, ids.unsqueeze(-1), 1.0), g


def _statistics(
    info: LayerInfo,
    K: StructuredMatrix,
    C: StructuredMatrix,
    capture: LayerCapture,
    *,
    kfac_approx: str,
    loss_average,
    grad_scale,
) -> LayerStatistics:
    """H_K = diag(k^2 * diag(A)), A from token counts; H_C as for a Linear."""
    calls = [_batched(info, x, g) for x, g in zip(capture.inputs, capture.output_grads)]
    ids = torch.cat([c[0] for c in calls], 1) if len(calls) > 1 else calls[0][0]
    g = torch.cat([c[1] for c in calls], 1) if len(calls) > 1 else calls[0][1]
    N, S = ids.shape
    V = info.d_in
    if kfac_approx == "expand":  # sum_i a_i a_i^T / R with one-hot a_i: counts / (N S)
        ones = torch.ones(N * S, dtype=K.dtype, device=ids.device)
        A = torch.zeros(V, dtype=K.dtype, device=ids.device).index_add(0, ids.reshape(-1), ones)
        A = A / (N * S)
        g = g.reshape(N * S, info.d_out)
    else:  # a_n = counts of sample n / S; diag of (1/N) sum_n a_n a_n^T
        ones = torch.ones(N, S, dtype=K.dtype, device=ids.device)
        per = torch.zeros(N, V, dtype=K.dtype, device=ids.device).scatter_add(1, ids, ones) / S
        A = (per * per).sum(0) / N
        g = g.sum(1)
    k = cast(Diagonal, K).values  # the kind forces K diagonal
    H_K = Diagonal(k * k * A)  # Pi_diag(K^T A K) for a diagonal K and A
    g = g.to(C.dtype)
    H_C = C.project_inner(g.mT).scale(loss_scale(loss_average, N, S) / grad_scale**2)
    return LayerStatistics(H_K, H_C)


def _transposed(info: LayerInfo, W: Tensor) -> Tensor:
    return W.mT


def _from_transposed(info: LayerInfo, M: Tensor, W: Tensor) -> Tensor:
    return M.mT


EMBEDDING = LayerKind(
    "embedding",
    describe_embedding,
    _rows,
    weight_matrix=_transposed,
    weight_from_matrix=_from_transposed,
    statistics=_statistics,
    structures=("diagonal", None),
    yields_tied=True,
)
register_layer_kind(nn.Embedding, EMBEDDING)

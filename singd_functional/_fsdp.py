"""SINGD on parameters sharded by FSDP2 (``fully_shard``): the step on row shards.

FSDP2 registers every parameter as a ``DTensor`` sharded on dim 0 (rows of W, entries of
b) and reduce-scatters the gradients, averaged over the data-parallel processes, into
DTensors of the same layout. Nothing else changes for SINGD's statistics: the layer
inputs and output gradients the hooks capture are the local batch's, so the statistics
are those of DDP and travel the same way (``_distributed.all_reduce_statistics``, one
collective). What is sharded here is the step:

    K, C, m_K, m_C      replicated: every process holds them whole (d_K^2 + d_C^2 per
                        dense layer, the statistics' size) and updates them identically
                        from the reduced statistics
    velocity            sharded like the parameter (a DTensor with the same placements)
    D = C C^T G K K^T   per row shard: the right factor K K^T acts on each row of G
                        alone, so the rows r0:r1 of D are (C C^T)[r0:r1, :] G K K^T

The left product needs only the local rows of G when C C^T has no entry outside its
diagonal blocks [r0:r1, r0:r1], i.e. when C is diagonal, or block-diagonal with blocks
that do not cross a shard boundary (block size dividing the shard length
ceil(d_out / n)). Every other structure (dense, Toeplitz, hierarchical, triangular,
arrowhead) mixes rows across shards: each process applies K K^T to its own rows of G
(its share of the right product), the rows of G K K^T of such layers are all-gathered
(all of them in ONE ``all_gather`` per shard group, every step), and each process
applies C C^T to the whole and keeps its rows of D. With ``T > 1`` the K K^T and C C^T
cached between factor updates are used (and sliced for the row-local case).

A kind that stores W^T (nn.Embedding's table [V, d]: dim 0 is the vocabulary, K's
side) has its shards on the columns of G instead. Its K is diagonal (forced by the
kind; any K with no entry outside the shards' diagonal blocks would do), so the columns
r0:r1 of D are C C^T G[:, r0:r1] K_b K_b^T with K_b = K[r0:r1, r0:r1], for every C: no
communication. Its statistics (token counts over the whole vocabulary, H_C from the
output gradients) are the local batch's and travel with the others; K stays whole (V
numbers). ``check_shardable`` refuses, in ``SINGD()``, such a layer with a bias (sharded
on the other side) or with a K that mixes the shards, and any other weight layout.

All arithmetic is the pure core's: the factor update is :func:`transform.singd` over the
reduced statistics, D is :func:`precondition.natural_gradient`, and the heavy-ball step
on the local rows is the same transform's identity path fed with the local rows of D.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

import torch
import torch.distributed as dist
from torch import Tensor

from .factors import Factors
from .layers import LayerInfo, LayerKind, layer_kind
from .precondition import layer_gradient_matrix, natural_gradient, split_layer_update
from .structures import StructuredMatrix
from .structures import get as get_structure
from .structures.block_diagonal import BlockDiagonal
from .structures.diagonal import Diagonal
from .transform import SINGDState

_ROW_MAJOR = LayerKind.__dataclass_fields__["weight_matrix"].default  # W.reshape(d_out, d_in)

try:  # torch >= 2.4 has the public DTensor module
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - older torch: no FSDP2 either
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]


def is_sharded(p: Tensor) -> bool:
    """Whether ``p`` is a DTensor (a parameter or gradient of a ``fully_shard`` model)."""
    return DTensor is not None and isinstance(p, DTensor)


def local(t: Tensor) -> Tensor:
    """The rows this process holds (the tensor itself when it is not sharded).

    The one private torch API of this module: ``DTensor._local_tensor``, the tensor
    ``to_local()`` returns a view of. ``to_local()`` is an autograd Function and costs
    ~80 us per call on CPU (measured, torch 2.13), more than a small layer's arithmetic;
    writes into the local tensor are writes into the DTensor.
    """
    if not is_sharded(t):
        return t
    held = getattr(t, "_local_tensor", None)
    return held if held is not None else t.to_local()  # type: ignore[attr-defined]


class RowShard(NamedTuple):
    """Where this process's rows of a dim-0 sharded tensor lie.

    Attributes:
        start, stop: the local rows r0:r1 of the global d_out rows.
        chunk: ceil(d_out / n), the padded length every process contributes to a gather.
        shards: n, the number of shards.
        group: the process group of the mesh dimension that shards the rows (None: the
            tensor is not sharded; every process holds all rows).
    """

    start: int
    stop: int
    chunk: int
    shards: int
    group: Any

    def bounds(self, rows: int):
        """(start, stop) of every shard, in shard order."""
        return [(min(r * self.chunk, rows), min((r + 1) * self.chunk, rows))
                for r in range(self.shards)]


def row_shard(param: Tensor) -> RowShard:
    """The :class:`RowShard` of a parameter (torch.chunk's rule, as FSDP2 uses it)."""
    rows = param.shape[0]
    if not is_sharded(param):
        return RowShard(0, rows, rows, 1, None)
    p: Any = param  # a DTensor
    shard_dims = [i for i, pl in enumerate(p.placements) if not isinstance(pl, Replicate)]
    if len(shard_dims) != 1 or p.placements[shard_dims[0]] != Shard(0):
        raise NotImplementedError(
            f"SINGD supports DTensor parameters sharded on dim 0 along one mesh dimension "
            f"(fully_shard, or HSDP's (Replicate, Shard(0))), got placements {p.placements}; "
            "use fully_shard's default shard_placement_fn"
        )
    mesh_dim = shard_dims[0]
    mesh = p.device_mesh
    n, index = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    chunk = math.ceil(rows / n)
    start, stop = min(index * chunk, rows), min((index + 1) * chunk, rows)
    held = local(p).shape[0]
    if held != stop - start:
        raise RuntimeError(
            f"a DTensor of {rows} rows holds {held} on this process where torch.chunk's "
            f"rule gives {stop - start}; this sharding layout is not supported"
        )
    return RowShard(start, stop, chunk, n, mesh.get_group(mesh_dim))


def row_block(M: StructuredMatrix, start: int, stop: int) -> StructuredMatrix | None:
    """The diagonal block [start:stop, start:stop] of M, if M has nothing outside it there.

    That is the case for a diagonal M and for a block-diagonal M whose blocks do not
    cross ``start`` or ``stop``; then (M G)[start:stop] = block @ G[start:stop]. None for
    every other case (the rows of M G need rows of G held elsewhere).
    """
    if start == 0 and stop == M.dim:
        return M
    if isinstance(M, Diagonal):
        return Diagonal(M.values[..., start:stop])
    if isinstance(M, BlockDiagonal):
        B = type(M).block_size
        full = M.blocks.shape[-3] * B
        if start % B or (stop % B and stop != M.dim) or start > full:
            return None
        blocks = M.blocks[..., start // B : min(stop, full) // B, :, :]
        last = M.last if stop == M.dim else M.last[..., :0, :0]
        return type(M)(blocks, last)
    return None


@functools.cache
def _row_local(name: str, dim: int, chunk: int, shards: int) -> bool:
    """Whether every shard's rows of a matrix of structure ``name`` are a block of their own."""
    M = get_structure(name).zeros(dim)
    bounds = RowShard(0, 0, chunk, shards, None).bounds(dim)
    return all(row_block(M, start, stop) is not None for start, stop in bounds)


def _left_block(factors: Factors, products: Mapping[str, StructuredMatrix], shard: RowShard):
    """C and the cached C C^T restricted to the local rows, or None when not row-local.

    Decided from the layout alone, for every shard at once (so every process takes the
    same branch and the gather's sizes agree): one shard whose rows C mixes with others
    sends the layer to the gather.
    """
    matrices = [factors.C, *(products[k] for k in ("C",) if k in products)]
    if not all(_row_local(M.name, M.dim, shard.chunk, shard.shards) for M in matrices):
        return None

    def rows(M: StructuredMatrix) -> StructuredMatrix:
        return cast(StructuredMatrix, row_block(M, shard.start, shard.stop))  # checked above

    sliced = {k: rows(M) if k == "C" else M for k, M in products.items()}
    return rows(factors.C), sliced


def sharded_update(
    layers: tuple[LayerInfo, ...],
    make_tx: Callable[[tuple[LayerInfo, ...]], Any],
    grads: Mapping[str, Tensor],
    state: SINGDState,
    params: Mapping[str, Tensor],
    *,
    statistics: Mapping[str, Any] | None,
    hyperparams,
    grad_scale=1.0,
):
    """``tx.update`` of the pure core, for parameters that may be dim-0 sharded DTensors.

    Args:
        layers: the layers of this update (their ``d_out`` are the global row counts).
        make_tx: builds the group's pure transform over the given layers (called with
            ``()``: the factor update and the heavy-ball step without preconditioning).
        grads, params: per key, DTensors (or plain tensors for unsharded ones).
        state: the group's :class:`SINGDState`; its velocity is sharded like the params.
        statistics, hyperparams, grad_scale: as for ``tx.update``.

    Returns:
        ``(updates, new_state)`` as ``tx.update``, except that the updates are this
        process's rows (add them to ``local(p)``); the new velocity is placed like the
        old (its local rows are written in place).
    """
    tx = make_tx(())
    # Stage 4 on the whole (replicated) factors: a transform over no layers only updates them
    _, factor_state = tx.update({}, state._replace(velocity={}), {}, statistics=statistics,
                                hyperparams=hyperparams)

    local_params = {k: local(p) for k, p in params.items()}
    directions: dict[str, Tensor] = {}
    gather: dict[str, tuple[LayerInfo, RowShard, Tensor]] = {}
    for info in layers:
        shard = row_shard(params[info.weight])
        if shard.group is not None and stored_columns(info, params[info.weight]):
            directions.update(_column_shard(info, shard, grads, factor_state, local_params))
            continue
        rows = dataclasses.replace(info, d_out=shard.stop - shard.start)  # the local rows
        G = layer_gradient_matrix(rows, {k: local(grads[k]) for k in info.params})
        factors = factor_state.factors[info.name]
        block = _left_block(factors, factor_state.products.get(info.name, {}), shard)
        if block is None:  # C C^T mixes rows of other processes: gather G K K^T below
            K, C = factors
            cached = factor_state.products.get(info.name, {})
            right = {"K": cached["K"]} if "K" in cached else {}
            # the right product acts row by row: each process does its rows' share
            GKK = natural_gradient(K, Diagonal.eye(rows.d_C, dtype=C.dtype, device=G.device),
                                   G, right)
            gather[info.name] = (rows, shard, GKK)
            continue
        D = natural_gradient(factors.K, block[0], G, block[1])
        directions.update(split_layer_update(rows, D, local_params))
    if gather:
        d_out = {info.name: info.d_out for info in layers}
        full = _gather_rows([(n, G, shard) for n, (_, shard, G) in gather.items()], d_out)
        for name, (rows, shard, _) in gather.items():
            K, C = factor_state.factors[name]
            cached = factor_state.products.get(name, {})
            left = {"C": cached["C"]} if "C" in cached else {}
            identity = Diagonal.eye(K.dim, dtype=K.dtype, device=K.device)
            D = natural_gradient(identity, C, full[name], left)
            directions.update(split_layer_update(rows, D[shard.start : shard.stop], local_params))

    keys = list(state.velocity)
    local_grads = {k: directions.get(k, local(grads[k])) for k in keys}
    updates, hb_state = tx.update(
        local_grads, factor_state._replace(velocity={k: local(state.velocity[k]) for k in keys}),
        local_params, hyperparams=hyperparams, grad_scale=grad_scale,
    )
    new_state = factor_state._replace(
        count=state.count + 1,
        velocity={k: _into(state.velocity[k], v) for k, v in hb_state.velocity.items()},
    )
    return updates, new_state


def stored_columns(info: LayerInfo, weight: Tensor) -> bool:
    """Whether the kind stores the weight as W^T: its dim 0 is the input columns of G.

    Read from the kind's ``weight_matrix`` applied to a 'meta' tensor of the weight's
    shape (no data): a [d_in, d_out] weight whose matrix view is the transposed view
    (strides (1, d_out)) is W^T (nn.Embedding's table [V, d], GPT-2's Conv1D).
    """
    return _stored_columns(info, tuple(weight.shape))


@functools.cache
def _stored_columns(info: LayerInfo, shape: tuple[int, ...]) -> bool:
    if layer_kind(info).weight_matrix is _ROW_MAJOR or shape != (info.d_in, info.d_out):
        return False
    M = layer_kind(info).weight_matrix(info, torch.empty(shape, device="meta"))
    return tuple(M.shape) == (info.d_out, info.d_in) and M.stride() == (1, info.d_out)


def check_shardable(info: LayerInfo, params: Mapping[str, Tensor], K: StructuredMatrix
                    ) -> None:
    """Refuse a sharded layer SINGD cannot precondition on its shards (in SINGD()).

    FSDP2 shards the weight's dim 0. That is G's rows for kinds that view the weight as
    ``W.reshape(d_out, d_in)`` (Linear, Conv1d, Conv2d, the attention projections). For a
    kind that stores W^T (:func:`stored_columns`) it is G's columns, K's side: D's
    columns of a shard are local when K has no entry outside the shard's diagonal block
    (diagonal, or block-diagonal aligned with the shards; nn.Embedding forces diagonal)
    and the layer has no bias (a bias would be sharded on the other side).
    """
    W = params[info.weight]
    if not is_sharded(W):
        return
    kind = layer_kind(info)
    if kind.weight_matrix is _ROW_MAJOR and W.shape[0] == info.d_out:
        return
    what = (f"layer {info.name!r} (kind {kind.name!r}) is sharded by fully_shard, but its "
            "weight's dim 0 is not the output rows of its matrix")
    fix = ("keep that module out of fully_shard (fully_shard the blocks around it, or pass "
           "it in ignored_params), or drop it from SINGD's params")
    if not stored_columns(info, W):
        raise NotImplementedError(f"{what}, so SINGD cannot precondition it on row shards; {fix}")
    shard = row_shard(W)
    why = [] if info.bias is None else ["a bias (sharded on the other side)"]
    if not _row_local(K.name, K.dim, shard.chunk, shard.shards):
        why.append(f"K {K.name!r}, which mixes the shards")
    if why:
        raise NotImplementedError(
            f"{what} but its input columns (K's side, d_K = {K.dim}); SINGD preconditions "
            "such a layer on its shards only without a bias and with a K that does not mix "
            "the shards (diagonal, or block-diagonal with blocks dividing the shard length "
            f"{shard.chunk}); this one has {' and '.join(why)}. Use structures=('diagonal', "
            f"...) for it (a param group of its own) and no bias, or {fix}"
        )


def _gather_rows(pending: list[tuple[str, Tensor, RowShard]], d_out: Mapping[str, int]
                 ) -> dict[str, Tensor]:
    """The whole G of each pending layer: one ``all_gather`` per shard group.

    Every process sends its rows padded to the shard's ``chunk`` (same size everywhere);
    the padding is cut off again with the global row count ``d_out[name]``.
    """
    out: dict[str, Tensor] = {}
    by_group: dict[int, list] = {}
    for entry in pending:
        by_group.setdefault(id(entry[2].group), []).append(entry)
    for entries in by_group.values():
        group = entries[0][2].group
        dtype = entries[0][1].dtype
        for _, G, _ in entries[1:]:
            dtype = torch.promote_types(dtype, G.dtype)
        flat = []
        for _, G, shard in entries:
            padded = G.new_zeros((shard.chunk, G.shape[1]), dtype=dtype)
            padded[: G.shape[0]] = G
            flat.append(padded.reshape(-1))
        mine = torch.cat(flat)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, mine, group=group)
        offset = 0
        for name, G, shard in entries:
            size = shard.chunk * G.shape[1]
            blocks = [g[offset : offset + size].reshape(shard.chunk, G.shape[1]) for g in gathered]
            offset += size
            out[name] = torch.cat(blocks)[: d_out[name]].to(G.dtype)
    return out


def _column_shard(info: LayerInfo, shard: RowShard, grads, factor_state: SINGDState,
                  local_params) -> dict[str, Tensor]:
    """D's columns r0:r1 of a layer whose shards hold columns of G (W^T stored).

    With K block-local there (checked in SINGD()), D[:, r0:r1] = C C^T G[:, r0:r1]
    K_b K_b^T for the block K_b = K[r0:r1, r0:r1], whatever C is: no communication.
    """
    cols = dataclasses.replace(info, d_in=shard.stop - shard.start)  # the local columns
    G = layer_gradient_matrix(cols, {info.weight: local(grads[info.weight])})
    K, C = factor_state.factors[info.name]
    cached = dict(factor_state.products.get(info.name, {}))
    if "K" in cached:
        cached["K"] = cast(StructuredMatrix, row_block(cached["K"], shard.start, shard.stop))
    K_block = cast(StructuredMatrix, row_block(K, shard.start, shard.stop))
    return split_layer_update(cols, natural_gradient(K_block, C, G, cached), local_params)


def _into(old: Tensor, rows: Tensor) -> Tensor:
    """The new velocity placed like the old one: written into its local rows if sharded.

    Wrapping ``rows`` in a new DTensor (``DTensor.from_local``) costs ~140 us per
    parameter on CPU (measured); the old buffer is not needed any more.
    """
    if not is_sharded(old):
        return rows
    local(old).copy_(rows)
    return old

"""Block-diagonal K or C: floor(d/B) B x B blocks plus one (d mod B) x (d mod B) block.

``block{B}diagonal`` is a family indexed by the block size B; :meth:`BlockDiagonal.specialize`
builds (once, cached) the concrete pytree type for one B. Pi keeps the diagonal blocks.

Every operation works block by block with one batched matmul over the ``nb`` full blocks
and one plain matmul for the trailing block; nothing d x d is formed except in
:meth:`to_dense` / :meth:`from_dense`. Blocks are general (not symmetric) matrices, so
``rmatmat`` and ``gram`` use each block's transpose. The row forms ``X K`` / ``X K^T``
are the transposed column forms on X^T (a view): the batched matmul reads the
transposed blocks of X in place and writes X K in column-major order, which measured
faster than a row-major result (a permuted copy) or a Python loop over the blocks;
``row_form_transposed`` tells ``precondition.natural_gradient`` to form ``G K K^T`` first
so that its last product, the column form ``C C^T (.)``, writes D in row order.
``K K^T X`` forms the blocks of K K^T first when that is cheaper (B <= n).
Outside vmap, grad and torch.compile, an unbatched product writes the full blocks and the
trailing block straight into one output (``out=``) instead of joining two results (a copy
of the whole product).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._base import (
    Scalar,
    StructuredMatrix,
    _add_diag,
    _broadcast_shapes,
    _eager,
    _eye_like,
    _resolve,
)

if TYPE_CHECKING:
    from typing_extensions import Self


class BlockDiagonal(StructuredMatrix):
    """blockdiag(blocks[0], ..., blocks[nb-1], last).

    Leaves: ``blocks`` [nb, B, B] with nb = d // B, and ``last`` [r, r] with r = d % B
    (either may be empty). Use :meth:`specialize` (or ``structures.get``) to get the
    type for a block size; the unspecialized base cannot be instantiated.
    """

    block_size: int = 0
    blocks: Tensor
    last: Tensor

    @classmethod
    def specialize(cls, block_size: int) -> type[BlockDiagonal]:
        """The (cached) ``block{B}diagonal`` type for block size ``B >= 1``."""
        return _specialize(int(block_size))

    def __init__(self, *leaves: Tensor):
        if not type(self).block_size:
            raise TypeError("use BlockDiagonal.specialize(B) to get a concrete block size")
        super().__init__(*leaves)

    # ----------------------------------------------------------------- helpers
    @classmethod
    def _split(cls, dim: int) -> tuple[int, int]:
        """(nb, r): the number of full blocks and the size of the trailing block."""
        if cls.block_size < 1:
            raise TypeError("use BlockDiagonal.specialize(B) to get a concrete block size")
        return divmod(dim, cls.block_size)

    @property
    def _nb(self) -> int:
        return self.blocks.shape[-3]

    @property
    def dim(self) -> int:
        return self._nb * self.block_size + self.last.shape[-1]

    def _apply(self, X: Tensor, transpose: bool) -> Tensor:
        """blockdiag(K)^(T) X for X [..., d, n]: the full blocks, then the trailing block."""
        B, nb = self.block_size, self._nb
        m = nb * B
        blocks, last = (self.blocks.mT, self.last.mT) if transpose else (self.blocks, self.last)
        if nb and last.shape[-1] and _plain(X, blocks, last):
            # the hot path, with the fewest Python-level tensor ops (each costs microseconds)
            d, n = X.shape
            out = X.new_empty(d, n)  # _plain: one dtype
            torch.bmm(blocks, X[:m].reshape(nb, B, n), out=out[:m].view(nb, B, n))
            torch.mm(last, X[m:], out=out[m:])
            return out
        Xm = X[..., :m, :]
        Xm = Xm.reshape(*Xm.shape[:-2], nb, B, Xm.shape[-1])
        top = blocks @ Xm
        top = top.reshape(*top.shape[:-3], m, top.shape[-1])
        if self.last.shape[-1] == 0:  # no trailing block: no concatenation (a copy)
            return top
        bottom = last @ X[..., m:, :]
        if nb == 0:
            return bottom
        batch = _broadcast_shapes(top.shape[:-2], bottom.shape[:-2])
        top = top.expand(*batch, *top.shape[-2:])
        bottom = bottom.expand(*batch, *bottom.shape[-2:])
        return torch.cat([top, bottom], dim=-2)

    # ------------------------------------------------------------ construction
    @classmethod
    def eye(cls, dim: int, dtype: torch.dtype | None = None, device: Any = None) -> Self:
        nb, r = cls._split(dim)
        B, dtype = cls.block_size, _resolve(dtype)
        # repeat, not expand + clone: a clone keeps an expanded size-1 dimension's stride 0,
        # which the updated factors do not have (a recompile under torch.compile)
        blocks = torch.eye(B, dtype=dtype, device=device).repeat(nb, 1, 1)
        return cls(blocks, torch.eye(r, dtype=dtype, device=device))

    @classmethod
    def zeros(cls, dim: int, dtype: torch.dtype | None = None, device: Any = None) -> Self:
        nb, r = cls._split(dim)
        B, dtype = cls.block_size, _resolve(dtype)
        return cls(
            torch.zeros(nb, B, B, dtype=dtype, device=device),
            torch.zeros(r, r, dtype=dtype, device=device),
        )

    @classmethod
    def from_dense(cls, sym: Tensor) -> Self:
        nb, _ = cls._split(sym.shape[-1])
        B = cls.block_size
        m = nb * B
        main = sym[..., :m, :m].reshape(*sym.shape[:-2], nb, B, nb, B)
        # diagonal over the two block indices -> [..., B, B, nb] -> [..., nb, B, B]
        blocks = torch.diagonal(main, dim1=-4, dim2=-2).movedim(-1, -3)
        return cls(blocks.clone(), sym[..., m:, m:].clone())

    @classmethod
    def project_outer(cls, Y: Tensor) -> Self:
        nb, _ = cls._split(Y.shape[-2])
        B = cls.block_size
        m = nb * B
        Ym = Y[..., :m, :]
        Ym = Ym.reshape(*Ym.shape[:-2], nb, B, Ym.shape[-1])
        Yl = Y[..., m:, :]
        return cls(Ym @ Ym.mT, Yl @ Yl.mT)

    # ------------------------------------------------------------------ algebra
    def to_dense(self) -> Tensor:
        blocks, last = self.blocks, self.last
        B, nb, r = self.block_size, self._nb, last.shape[-1]
        m = nb * B
        batch = _broadcast_shapes(blocks.shape[:-3], last.shape[:-2])
        blocks = blocks.expand(*batch, nb, B, B)
        last = last.expand(*batch, r, r)
        # [..., i, a, j, b] = delta_ij * blocks[..., i, a, b]
        sel = _eye_like(nb, blocks)[:, None, :, None]
        main = (sel * blocks[..., :, :, None, :]).reshape(*batch, m, m)
        top = torch.cat([main, blocks.new_zeros(*batch, m, r)], dim=-1)
        bottom = torch.cat([last.new_zeros(*batch, r, m), last], dim=-1)
        return torch.cat([top, bottom], dim=-2)

    def matmat(self, X: Tensor) -> Tensor:
        return self._apply(X, transpose=False)

    def rmatmat(self, X: Tensor) -> Tensor:
        return self._apply(X, transpose=True)

    def outer_matmat(self, X: Tensor) -> Tensor:
        # K K^T X: forming the blocks of K K^T (nb B^3) beats a second product with X
        # (d B n) unless the blocks are wider than X
        if self.block_size <= X.shape[-1]:
            return self.outer_self().matmat(X)
        return self.matmat(self.rmatmat(X))

    def outer_matmat_right(self, X: Tensor) -> Tensor:
        if self.block_size <= X.shape[-2]:
            return self.outer_self().matmat_right(X)  # K K^T is symmetric
        return self.rmatmat_right(self.matmat_right(X))

    def project_inner(self, X: Tensor) -> BlockDiagonal:
        # Pi(K^T X X^T K) keeps the blocks (K_b^T X_b)(K_b^T X_b)^T: no concatenated K^T X
        nb, B = self._nb, self.block_size
        m = nb * B
        Xm = X[..., :m, :]
        Ym = self.blocks.mT @ Xm.reshape(*Xm.shape[:-2], nb, B, Xm.shape[-1])
        Yl = self.last.mT @ X[..., m:, :]
        return type(self)(Ym @ Ym.mT, Yl @ Yl.mT)

    def matmul(self, other: BlockDiagonal) -> BlockDiagonal:
        return type(self)(self.blocks @ other.blocks, self.last @ other.last)

    def gram(self) -> BlockDiagonal:
        return type(self)(self.blocks.mT @ self.blocks, self.last.mT @ self.last)

    def outer_self(self) -> BlockDiagonal:
        return type(self)(self.blocks @ self.blocks.mT, self.last @ self.last.mT)

    def add_diag(self, value: Scalar) -> BlockDiagonal:
        return type(self)(_add_diag(self.blocks, value), _add_diag(self.last, value))

    def trace(self) -> Tensor:
        main = torch.diagonal(self.blocks, dim1=-2, dim2=-1).sum((-2, -1))
        return main + torch.diagonal(self.last, dim1=-2, dim2=-1).sum(-1)


def _plain(X: Tensor, blocks: Tensor, last: Tensor) -> bool:
    """True when ``out=`` products may be used: eager, unbatched, no autograd, one dtype."""
    if X.dim() != 2 or blocks.dim() != 3 or last.dim() != 2 or X.dtype != blocks.dtype:
        return False
    return _eager(X, blocks, last)


@functools.cache
def _specialize(block_size: int) -> type[BlockDiagonal]:
    if block_size < 1:
        raise ValueError(f"the block size must be a positive integer, got {block_size}")
    qualname = f"BlockDiagonal{block_size}"
    return type(
        qualname,
        (BlockDiagonal,),
        {
            "name": f"block{block_size}diagonal",
            "block_size": block_size,
            "_fields": ("blocks", "last"),
            "closed_under_outer": True,
            "row_form_transposed": True,
            "__module__": __name__,
            "__qualname__": qualname,
            "__doc__": f"Block-diagonal with {block_size} x {block_size} blocks "
            "(see :class:`BlockDiagonal`).",
        },
    )

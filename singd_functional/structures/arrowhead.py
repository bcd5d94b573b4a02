"""Diagonal plus one dense row or column (2d - 1 parameters); the four SINGD "arrowheads".

With p the special index and ``rest`` the other d - 1 indices in order:

=====================  =====  ======  ==============================
name                   p      kind    dense form
=====================  =====  ======  ==============================
triltopleftdiag        d - 1  row     diagonal + last row M[d-1, :d-1]
trilbottomrightdiag    0      column  diagonal + first column M[1:, 0]
triutopleftdiag        d - 1  column  diagonal + last column M[:d-1, d-1]
triubottomrightdiag    0      row     diagonal + first row M[0, 1:]
=====================  =====  ======  ==============================

Leaves: ``diag`` [d] (a) and ``vec`` [d - 1] (r, the off-diagonal entries of the dense
row / column, placed at ``rest``). With D = diag(a) and e_p the p-th unit vector, a row
type is K = D + e_p r^T and a column type K = D + r e_p^T (its transpose is the other
kind with the same parameters). Since p is 0 or d - 1, ``rest`` is a contiguous slice,
so every operation is slicing plus ``torch.cat``: O(d) per column, no d x d tensor except
in :meth:`to_dense` / :meth:`from_dense`. Leading batch dimensions are allowed and every
operation is ``torch.func.vmap``-able.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ._base import Scalar, StructuredMatrix, _resolve

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["TrilTopLeftDiag", "TrilBottomRightDiag", "TriuTopLeftDiag", "TriuBottomRightDiag"]


class _Arrowhead(StructuredMatrix):
    """Shared implementation; subclasses set ``name``, ``first`` (p = 0, else p = d - 1)
    and ``row`` (a dense row at p, else a dense column at p)."""

    _fields = ("diag", "vec")
    first: ClassVar[bool] = True
    row: ClassVar[bool] = True
    diag: Tensor
    vec: Tensor

    @property
    def dim(self) -> int:
        return self.diag.shape[-1]

    # ---------------------------------------------------------------- helpers
    @classmethod
    def _split(cls, x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """(x at p, kept as a length-1 slice; x at rest) along ``dim`` (negative)."""
        n = x.shape[dim]
        if cls.first:
            return x.narrow(dim, 0, 1), x.narrow(dim, 1, n - 1)
        return x.narrow(dim, n - 1, 1), x.narrow(dim, 0, n - 1)

    @classmethod
    def _join(cls, at_p: Tensor, at_rest: Tensor, dim: int) -> Tensor:
        """The inverse of :meth:`_split`."""
        return torch.cat([at_p, at_rest] if cls.first else [at_rest, at_p], dim=dim)

    @classmethod
    def _apply(cls, a: Tensor, r: Tensor, X: Tensor, row: bool) -> Tensor:
        """(D + e_p r^T) X if ``row`` else (D + r e_p^T) X, for X [..., d, n]."""
        aX = a.unsqueeze(-1) * X
        aX_p, aX_rest = cls._split(aX, -2)
        X_p, X_rest = cls._split(X, -2)
        if row:  # row p gains r^T X[rest]
            return cls._join(aX_p + r.unsqueeze(-2) @ X_rest, aX_rest, -2)
        # rows `rest` gain r X[p]
        return cls._join(aX_p, aX_rest + r.unsqueeze(-1) * X_p, -2)

    @classmethod
    def _apply_right(cls, a: Tensor, r: Tensor, X: Tensor, row: bool) -> Tensor:
        """X (D + e_p r^T) if ``row`` else X (D + r e_p^T), for X [..., n, d] (rows)."""
        Xa = X * a.unsqueeze(-2)
        Xa_p, Xa_rest = cls._split(Xa, -1)
        X_p, X_rest = cls._split(X, -1)
        if row:  # columns `rest` gain X[:, p] r^T
            return cls._join(Xa_p, Xa_rest + X_p * r.unsqueeze(-2), -1)
        # column p gains X[:, rest] r
        return cls._join(Xa_p + X_rest @ r.unsqueeze(-1), Xa_rest, -1)

    # ------------------------------------------------------------ construction
    @classmethod
    def eye(cls, dim: int, dtype: torch.dtype | None = None, device: Any = None) -> Self:
        dtype = _resolve(dtype)
        return cls(
            torch.ones(dim, dtype=dtype, device=device),
            torch.zeros(dim - 1, dtype=dtype, device=device),
        )

    @classmethod
    def zeros(cls, dim: int, dtype: torch.dtype | None = None, device: Any = None) -> Self:
        dtype = _resolve(dtype)
        return cls(
            torch.zeros(dim, dtype=dtype, device=device),
            torch.zeros(dim - 1, dtype=dtype, device=device),
        )

    @classmethod
    def from_dense(cls, sym: Tensor) -> Self:
        diag = torch.diagonal(sym, dim1=-2, dim2=-1).clone()
        M_p, _ = cls._split(sym, -2)  # [..., 1, d]: row p (= column p, M is symmetric)
        _, off = cls._split(M_p.squeeze(-2), -1)
        return cls(diag, 2 * off)

    @classmethod
    def project_outer(cls, Y: Tensor) -> Self:
        Y_p, Y_rest = cls._split(Y, -2)
        diag = torch.linalg.vecdot(Y, Y)  # row sums of squares, no Y * Y temporary
        vec = 2 * (Y_rest @ Y_p.mT).squeeze(-1)
        return cls(diag, vec)

    # ----------------------------------------------------------------- algebra
    def to_dense(self) -> Tensor:
        a, r = self.diag, self.vec
        full = self._join(torch.zeros_like(a[..., :1]), r, -1)  # r placed at rest, 0 at p
        e_p = self._join(torch.ones_like(a[..., :1]), torch.zeros_like(r), -1)
        extra = e_p.unsqueeze(-1) * full.unsqueeze(-2)  # e_p r^T
        if not self.row:
            extra = extra.mT
        return torch.diag_embed(a) + extra

    def matmat(self, X: Tensor) -> Tensor:
        return self._apply(self.diag, self.vec, X, row=self.row)

    def rmatmat(self, X: Tensor) -> Tensor:
        return self._apply(self.diag, self.vec, X, row=not self.row)

    def matmat_right(self, X: Tensor) -> Tensor:
        return self._apply_right(self.diag, self.vec, X, row=self.row)

    def rmatmat_right(self, X: Tensor) -> Tensor:
        return self._apply_right(self.diag, self.vec, X, row=not self.row)

    def matmul(self, other: _Arrowhead) -> _Arrowhead:
        a1, r1, a2, r2 = self.diag, self.vec, other.diag, other.vec
        a1_p, a1_rest = self._split(a1, -1)
        a2_p, a2_rest = self._split(a2, -1)
        if self.row:
            vec = a1_p * r2 + r1 * a2_rest
        else:
            vec = a1_rest * r2 + r1 * a2_p
        return type(self)(a1 * a2, vec)

    def gram(self) -> _Arrowhead:
        a, r = self.diag, self.vec
        a_p, a_rest = self._split(a, -1)
        if self.row:  # K^T K = D^2 + a_p (e_p r^T + r e_p^T) + r r^T
            diag = self._join(a_p * a_p, a_rest * a_rest + r * r, -1)
            vec = 2 * a_p * r
        else:  # K^T K = D^2 + D r e_p^T + e_p r^T D + (r.r) e_p e_p^T
            diag = self._join(a_p * a_p + (r * r).sum(-1, keepdim=True), a_rest * a_rest, -1)
            vec = 2 * a_rest * r
        return type(self)(diag, vec)

    def add_diag(self, value: Scalar) -> _Arrowhead:
        return type(self)(self.diag + value, self.vec)

    def trace(self) -> Tensor:
        return self.diag.sum(-1)


class TrilTopLeftDiag(_Arrowhead):
    """Diagonal plus a dense last row: ``M[d-1, :d-1] = vec``."""

    name = "triltopleftdiag"
    first = False
    row = True


class TrilBottomRightDiag(_Arrowhead):
    """Diagonal plus a dense first column: ``M[1:, 0] = vec``."""

    name = "trilbottomrightdiag"
    first = True
    row = False


class TriuTopLeftDiag(_Arrowhead):
    """Diagonal plus a dense last column: ``M[:d-1, d-1] = vec``."""

    name = "triutopleftdiag"
    first = False
    row = False


class TriuBottomRightDiag(_Arrowhead):
    """Diagonal plus a dense first row: ``M[0, 1:] = vec``."""

    name = "triubottomrightdiag"
    first = True
    row = True

"""Diagonal K or C: d parameters; Pi keeps the diagonal."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._base import Scalar, StructuredMatrix, _resolve

if TYPE_CHECKING:
    from typing_extensions import Self


class Diagonal(StructuredMatrix):
    """diag(values). Leaves: ``values`` [d]."""

    name = "diagonal"
    _fields = ("values",)
    closed_under_outer = True
    values: Tensor

    @property
    def dim(self) -> int:
        return self.values.shape[-1]

    @classmethod
    def eye(cls, dim: int, dtype: torch.dtype | None = None, device: Any = None) -> Self:
        return cls(torch.ones(dim, dtype=_resolve(dtype), device=device))

    @classmethod
    def zeros(cls, dim: int, dtype: torch.dtype | None = None, device: Any = None) -> Self:
        return cls(torch.zeros(dim, dtype=_resolve(dtype), device=device))

    @classmethod
    def from_dense(cls, sym: Tensor) -> Self:
        return cls(torch.diagonal(sym, dim1=-2, dim2=-1).clone())

    @classmethod
    def project_outer(cls, Y: Tensor) -> Self:
        return cls(torch.linalg.vecdot(Y, Y))  # row sums of squares, no Y * Y temporary

    def to_dense(self) -> Tensor:
        return torch.diag_embed(self.values)

    def matmat(self, X: Tensor) -> Tensor:
        return self.values.unsqueeze(-1) * X

    rmatmat = matmat

    def matmat_right(self, X: Tensor) -> Tensor:
        return X * self.values.unsqueeze(-2)

    rmatmat_right = matmat_right

    def outer_matmat(self, X: Tensor) -> Tensor:
        return (self.values * self.values).unsqueeze(-1) * X

    def outer_matmat_right(self, X: Tensor) -> Tensor:
        return X * (self.values * self.values).unsqueeze(-2)

    def project_inner(self, X: Tensor) -> Diagonal:
        # Pi(D X X^T D) = values^2 * rowsumsq(X): no scaled copy of X
        return Diagonal(self.values * self.values * torch.linalg.vecdot(X, X))

    def project_inner_gram(self, A: Tensor) -> Diagonal:
        return Diagonal(self.values * self.values * torch.diagonal(A, dim1=-2, dim2=-1))

    def inner_cost(self) -> int:
        return 2 * self.dim  # the sums of squares of X's rows: always below the Gram's d^2

    def matmul(self, other: Diagonal) -> Diagonal:
        return Diagonal(self.values * other.values)

    def gram(self) -> Diagonal:
        return Diagonal(self.values * self.values)

    def outer_self(self) -> Diagonal:
        return Diagonal(self.values * self.values)

    def add_diag(self, value: Scalar) -> Diagonal:
        return Diagonal(self.values + value)

    def trace(self) -> Tensor:
        return self.values.sum(-1)

"""Diagonal K or C: d parameters; Pi keeps the diagonal."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import Scalar, StructuredMatrix, _resolve


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
    def eye(cls, dim, dtype=None, device=None):
        return cls(torch.ones(dim, dtype=_resolve(dtype), device=device))

    @classmethod
    def zeros(cls, dim, dtype=None, device=None):
        return cls(torch.zeros(dim, dtype=_resolve(dtype), device=device))

    @classmethod
    def from_dense(cls, sym: Tensor):
        return cls(torch.diagonal(sym, dim1=-2, dim2=-1).clone())

    @classmethod
    def project_outer(cls, Y: Tensor):
        return cls((Y * Y).sum(-1))

    def to_dense(self) -> Tensor:
        return torch.diag_embed(self.values)

    def matmat(self, X: Tensor) -> Tensor:
        return self.values.unsqueeze(-1) * X

    rmatmat = matmat

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

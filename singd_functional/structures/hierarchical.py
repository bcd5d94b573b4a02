"""Hierarchical K or C: a dense head and tail around a diagonal middle.

``hierarchical{K1}_{K2}`` is a family indexed by (K1, K2); :meth:`Hierarchical.specialize`
builds (once, cached) the concrete pytree type. For a side d, with k1 = min(d, K1),
k2 = min(d - k1, K2) and n = d - k1 - k2, the dense form is::

    [[A (k1 x k1), B1 (k1 x n),  B2 (k1 x k2)],
     [0,           diag(c) (n),  0           ],
     [0,           D (k2 x n),   E (k2 x k2) ]]

with B = [B1 | B2] stored as one [k1, n + k2] tensor. Block algebra (derived from the
dense form, written per block so nothing d x d is formed):

* K X:   [A X1 + B [X2; X3],  c * X2,  D X2 + E X3]
* K^T X: [A^T X1,  B1^T X1 + c * X2 + D^T X3,  B2^T X1 + E^T X3]
* K L:   A A',  [A B1' + B1 diag(c') + B2 D',  A B2' + B2 E'],  c c',  D diag(c') + E D',  E E'
* Pi(K^T K): A^T A,  2 A^T B,  colsumsq(B1) + c^2 + colsumsq(D),  2 (B2^T B1 + E^T D),
  B2^T B2 + E^T E
* Pi(Y Y^T): Y1 Y1^T,  2 Y1 [Y2; Y3]^T,  rowsumsq(Y2),  2 Y3 Y2^T,  Y3 Y3^T
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ._base import Scalar, StructuredMatrix, _eye_like, _resolve


def _cat_broadcast(parts: list[Tensor], dim: int) -> Tensor:
    """torch.cat after broadcasting the leading (batch) dims of ``parts``."""
    batch = torch.broadcast_shapes(*(p.shape[:-2] for p in parts))
    return torch.cat([p.expand(*batch, *p.shape[-2:]) for p in parts], dim=dim)


class Hierarchical(StructuredMatrix):
    """See the module docstring. Leaves: ``A`` [k1, k1], ``B`` [k1, n + k2], ``c`` [n],
    ``D`` [k2, n], ``E`` [k2, k2]. Use :meth:`specialize` (or ``structures.get``) to get
    the type for (K1, K2); the unspecialized base cannot be instantiated.
    """

    K1: int = 0
    K2: int = 0
    A: Tensor
    B: Tensor
    c: Tensor
    D: Tensor
    E: Tensor

    @classmethod
    def specialize(cls, k1: int, k2: int) -> type[Hierarchical]:
        """The (cached) ``hierarchical{K1}_{K2}`` type for ``K1, K2 >= 1``."""
        return _specialize(int(k1), int(k2))

    def __init__(self, *leaves: Tensor):
        if not type(self).K1:
            raise TypeError("use Hierarchical.specialize(K1, K2) to get concrete sizes")
        super().__init__(*leaves)

    # ----------------------------------------------------------------- helpers
    @classmethod
    def _split(cls, dim: int) -> tuple[int, int, int]:
        """(k1, n, k2) for side ``dim``."""
        if cls.K1 < 1:
            raise TypeError("use Hierarchical.specialize(K1, K2) to get concrete sizes")
        k1 = min(dim, cls.K1)
        k2 = min(dim - k1, cls.K2)
        return k1, dim - k1 - k2, k2

    @property
    def _sizes(self) -> tuple[int, int, int]:
        return self.A.shape[-1], self.c.shape[-1], self.E.shape[-1]

    @property
    def dim(self) -> int:
        return sum(self._sizes)

    # ------------------------------------------------------------ construction
    @classmethod
    def eye(cls, dim, dtype=None, device=None):
        k1, n, k2 = cls._split(dim)
        kw = {"dtype": _resolve(dtype), "device": device}
        return cls(
            torch.eye(k1, **kw),
            torch.zeros(k1, n + k2, **kw),
            torch.ones(n, **kw),
            torch.zeros(k2, n, **kw),
            torch.eye(k2, **kw),
        )

    @classmethod
    def zeros(cls, dim, dtype=None, device=None):
        k1, n, k2 = cls._split(dim)
        kw = {"dtype": _resolve(dtype), "device": device}
        return cls(
            torch.zeros(k1, k1, **kw),
            torch.zeros(k1, n + k2, **kw),
            torch.zeros(n, **kw),
            torch.zeros(k2, n, **kw),
            torch.zeros(k2, k2, **kw),
        )

    @classmethod
    def from_dense(cls, sym: Tensor):
        k1, n, k2 = cls._split(sym.shape[-1])
        s = k1 + n
        mid = sym[..., k1:s, k1:s]
        return cls(
            sym[..., :k1, :k1].clone(),
            2 * sym[..., :k1, k1:],
            torch.diagonal(mid, dim1=-2, dim2=-1).clone(),
            2 * sym[..., s:, k1:s],
            sym[..., s:, s:].clone(),
        )

    @classmethod
    def project_outer(cls, Y: Tensor):
        k1, n, _ = cls._split(Y.shape[-2])
        s = k1 + n
        Y1, Y2, Y3 = Y[..., :k1, :], Y[..., k1:s, :], Y[..., s:, :]
        return cls(
            Y1 @ Y1.mT,
            2 * (Y1 @ Y[..., k1:, :].mT),
            (Y2 * Y2).sum(-1),
            2 * (Y3 @ Y2.mT),
            Y3 @ Y3.mT,
        )

    # ------------------------------------------------------------------ algebra
    def _B12(self) -> tuple[Tensor, Tensor]:
        n = self.c.shape[-1]
        return self.B[..., :n], self.B[..., n:]

    def to_dense(self) -> Tensor:
        A, B, c, D, E = self.leaves
        k1, n, k2 = self._sizes
        top = _cat_broadcast([A, B], dim=-1)
        mid = _cat_broadcast([c.new_zeros(n, k1), torch.diag_embed(c), c.new_zeros(n, k2)], -1)
        bottom = _cat_broadcast([D.new_zeros(k2, k1), D, E], dim=-1)
        return _cat_broadcast([top, mid, bottom], dim=-2)

    def matmat(self, X: Tensor) -> Tensor:
        A, B, c, D, E = self.leaves
        k1, n, _ = self._sizes
        s = k1 + n
        X1, X2, X3 = X[..., :k1, :], X[..., k1:s, :], X[..., s:, :]
        top = A @ X1 + B @ X[..., k1:, :]
        mid = c.unsqueeze(-1) * X2
        bottom = D @ X2 + E @ X3
        return _cat_broadcast([top, mid, bottom], dim=-2)

    def rmatmat(self, X: Tensor) -> Tensor:
        A, B, c, D, E = self.leaves
        k1, n, _ = self._sizes
        s = k1 + n
        X1, X2, X3 = X[..., :k1, :], X[..., k1:s, :], X[..., s:, :]
        BtX1 = B.mT @ X1  # [B1^T X1; B2^T X1]
        top = A.mT @ X1
        mid = BtX1[..., :n, :] + c.unsqueeze(-1) * X2 + D.mT @ X3
        bottom = BtX1[..., n:, :] + E.mT @ X3
        return _cat_broadcast([top, mid, bottom], dim=-2)

    def matmul(self, other: Hierarchical) -> Hierarchical:
        A, B, c, D, E = self.leaves
        Ao, Bo, co, Do, Eo = other.leaves
        B1, B2 = self._B12()
        right = _cat_broadcast([B1 * co.unsqueeze(-2) + B2 @ Do, B2 @ Eo], dim=-1)
        return type(self)(
            A @ Ao,
            A @ Bo + right,
            c * co,
            D * co.unsqueeze(-2) + E @ Do,
            E @ Eo,
        )

    def gram(self) -> Hierarchical:
        A, B, c, D, E = self.leaves
        B1, B2 = self._B12()
        return type(self)(
            A.mT @ A,
            2 * (A.mT @ B),
            (B1 * B1).sum(-2) + c * c + (D * D).sum(-2),
            2 * (B2.mT @ B1 + E.mT @ D),
            B2.mT @ B2 + E.mT @ E,
        )

    def add_diag(self, value: Scalar) -> Hierarchical:
        A, B, c, D, E = self.leaves
        return type(self)(
            A + value * _eye_like(A.shape[-1], A),
            B,
            c + value,
            D,
            E + value * _eye_like(E.shape[-1], E),
        )

    def trace(self) -> Tensor:
        tr_a = torch.diagonal(self.A, dim1=-2, dim2=-1).sum(-1)
        tr_e = torch.diagonal(self.E, dim1=-2, dim2=-1).sum(-1)
        return tr_a + self.c.sum(-1) + tr_e


@functools.cache
def _specialize(k1: int, k2: int) -> type[Hierarchical]:
    if k1 < 1 or k2 < 1:
        raise ValueError(f"K1 and K2 must be positive integers, got {k1}, {k2}")
    qualname = f"Hierarchical{k1}_{k2}"
    return type(
        qualname,
        (Hierarchical,),
        {
            "name": f"hierarchical{k1}_{k2}",
            "K1": k1,
            "K2": k2,
            "_fields": ("A", "B", "c", "D", "E"),
            "__module__": __name__,
            "__qualname__": qualname,
            "__doc__": f"Hierarchical with K1={k1}, K2={k2} (see :class:`Hierarchical`).",
        },
    )

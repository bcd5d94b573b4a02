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

For speed the products with X go through the k1 + k2 dense ("hub") rows of K,
W = [[A, B1, B2], [0, D, E]] ([k1 + k2, d]): each is one thin matmul with W over the
whole of d plus one elementwise pass with c (see :meth:`Hierarchical.matmat`), and the
two-sided K K^T X of the natural gradient never forms K^T X (:meth:`outer_matmat`: one
GEMM with the hub columns of K K^T, one with its middle-hub block, one pass with c^2);
outside vmap, grad and compile it writes its middle rows (columns) straight into the
output instead of joining three parts.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._base import Scalar, StructuredMatrix, _add_diag, _broadcast_shapes, _eager, _resolve

if TYPE_CHECKING:
    from typing_extensions import Self


def _cat_broadcast(parts: list[Tensor], dim: int) -> Tensor:
    """torch.cat after broadcasting the leading (batch) dims of ``parts``."""
    batch = _broadcast_shapes(*(p.shape[:-2] for p in parts))
    if all(p.shape[:-2] == batch for p in parts):  # the usual case: no expand calls
        return torch.cat(parts, dim=dim)
    return torch.cat([p.expand(*batch, *p.shape[-2:]) for p in parts], dim=dim)


class Hierarchical(StructuredMatrix):
    """See the module docstring. Leaves: ``A`` [k1, k1], ``B`` [k1, n + k2], ``c`` [n],
    ``D`` [k2, n], ``E`` [k2, k2]. Use :meth:`specialize` (or ``structures.get``) to get
    the type for (K1, K2); the unspecialized base cannot be instantiated.
    """

    K1: int = 0
    K2: int = 0
    _outer_type: type[HierarchicalOuter]
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
    def eye(cls, dim: int, dtype: torch.dtype | None = None, device: Any = None) -> Self:
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
    def zeros(cls, dim: int, dtype: torch.dtype | None = None, device: Any = None) -> Self:
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
    def from_dense(cls, sym: Tensor) -> Self:
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
    def project_outer(cls, Y: Tensor) -> Self:
        k1, n, _ = cls._split(Y.shape[-2])
        s = k1 + n
        Y2 = Y[..., k1:s, :]
        # the k1 + k2 dense rows of Y Y^T in one matmul: P = [Y1; Y3] Y^T ([k1 + k2, d])
        P = torch.cat([Y[..., :k1, :], Y[..., s:, :]], dim=-2) @ Y.mT
        return cls(
            P[..., :k1, :k1],
            2 * P[..., :k1, k1:],
            torch.linalg.vecdot(Y2, Y2),
            2 * P[..., k1:, k1:s],
            P[..., k1:, s:],
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

    # The k1 + k2 dense rows of K form W = [[A, B1, B2], [0, D, E]] ([k1 + k2, d]), the
    # rest is diag(c). Every product with X is then ONE matmul with W (a thin GEMM over
    # all of d) plus one elementwise pass, instead of five small products and slices.
    def _W(self) -> Tensor:
        A, B, _, D, E = self.leaves
        top = _cat_broadcast([A, B], dim=-1)
        bottom = _cat_broadcast([D.new_zeros(E.shape[-1], A.shape[-1]), D, E], dim=-1)
        return _cat_broadcast([top, bottom], dim=-2)

    def _c_full(self) -> Tensor:
        """(0 (k1), c, 0 (k2)): the diagonal part of K as a length-d vector."""
        k1, _, k2 = self._sizes
        return torch.nn.functional.pad(self.c, (k1, k2))

    def matmat(self, X: Tensor) -> Tensor:
        # K X = [W_top X,  c * X2,  W_bottom X]
        k1, n, _ = self._sizes
        P = self._W() @ X
        mid = self.c.unsqueeze(-1) * X[..., k1 : k1 + n, :]
        return _cat_broadcast([P[..., :k1, :], mid, P[..., k1:, :]], dim=-2)

    def rmatmat(self, X: Tensor) -> Tensor:
        # K^T X = W^T [X1; X3] + (0, c, 0) * X, the product formed as ([X1; X3]^T W)^T
        # (see HierarchicalOuter.matmat_right): 0.45-0.79x the time on X [513-785, 128]
        k1, n, _ = self._sizes
        X13 = torch.cat([X[..., :k1, :], X[..., k1 + n :, :]], dim=-2)
        return torch.addcmul((X13.mT @ self._W()).mT, self._c_full().unsqueeze(-1), X)

    def matmat_right(self, X: Tensor) -> Tensor:
        # X K = [X1, X3] W + X * (0, c, 0)
        k1, n, _ = self._sizes
        X13 = torch.cat([X[..., :k1], X[..., k1 + n :]], dim=-1)
        return X13 @ self._W() + X * self._c_full().unsqueeze(-2)

    def rmatmat_right(self, X: Tensor) -> Tensor:
        # X K^T = [X W_top^T,  X2 * c,  X W_bottom^T], X W^T formed as (W X^T)^T (as rmatmat)
        k1, n, _ = self._sizes
        P = (self._W() @ X.mT).mT
        mid = X[..., k1 : k1 + n] * self.c.unsqueeze(-2)
        return _cat_broadcast([P[..., :k1], mid, P[..., k1:]], dim=-1)

    # K K^T with K = diag(0, c, 0) + S^T W (S picks the k1 + k2 hub rows) is, in hub /
    # middle order, [[W W^T, Wc], [Wc^T, diag(c^2)]] with Wc = W[:, mid] c: the three
    # tensors of :class:`HierarchicalOuter`, which does the products.
    def outer_cache(self) -> HierarchicalOuter:
        """K K^T as a :class:`HierarchicalOuter` (kept between factor updates, it saves
        the ~12 small operations that build it on every plain step)."""
        k1, n, _ = self._sizes
        W = self._W()
        WWt = W @ W.mT
        Wc = W[..., k1 : k1 + n] * self.c.unsqueeze(-2)
        M = _cat_broadcast([WWt[..., :k1, :], Wc.mT, WWt[..., k1:, :]], dim=-2)
        return self._outer_type(M, Wc, self.c * self.c)

    def outer_matmat(self, X: Tensor) -> Tensor:
        return self.outer_cache().matmat(X)

    def outer_matmat_right(self, X: Tensor) -> Tensor:
        return self.outer_cache().matmat_right(X)

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
            torch.linalg.vecdot(B1, B1, dim=-2) + c * c + torch.linalg.vecdot(D, D, dim=-2),
            2 * (B2.mT @ B1 + E.mT @ D),
            B2.mT @ B2 + E.mT @ E,
        )

    def add_diag(self, value: Scalar) -> Hierarchical:
        A, B, c, D, E = self.leaves
        return type(self)(_add_diag(A, value), B, c + value, D, _add_diag(E, value))

    def trace(self) -> Tensor:
        tr_a = torch.diagonal(self.A, dim1=-2, dim2=-1).sum(-1)
        tr_e = torch.diagonal(self.E, dim1=-2, dim2=-1).sum(-1)
        return tr_a + self.c.sum(-1) + tr_e


class HierarchicalOuter(StructuredMatrix):
    """K K^T of a hierarchical K (symmetric, d x d), in the form of the natural
    gradient's products; built by :meth:`Hierarchical.outer_cache`, not a structure of
    its own (it has the products ``matmat`` / ``matmat_right`` and their transposes,
    ``to_dense``, and the leaf-wise algebra of the base).

    Leaves: ``M`` [d, k1 + k2], the hub columns of K K^T (hub rows first at 0..k1, then
    the middle, then the last k2); ``Wc`` [k1 + k2, n], its hub-middle block; ``c2`` [n],
    its middle diagonal. Named like its factor's structure, so that code deciding by
    the name (layouts) treats it as that factor.

    Its hub rows (columns) of K K^T X (X K K^T) are ONE thin GEMM with M over d, the
    middle ones c^2 X2 + Wc^T X_hub: two GEMMs and one elementwise pass, and K^T X is
    never formed. Outside vmap, grad and compile the middle part is written into the
    output and the second GEMM accumulates onto it (addmm_), with no temporary of the
    output's size: 0.85-0.88x the time of a separate product plus addcmul at
    d = 513-785 (n = 512 columns).
    """

    K1: int = 0
    K2: int = 0
    M: Tensor
    Wc: Tensor
    c2: Tensor

    def __reduce__(self):
        return (_rebuild_outer, (self.K1, self.K2, self.leaves))

    @property
    def dim(self) -> int:
        return self.M.shape[-2]

    @property
    def _k1(self) -> int:
        return min(self.dim, self.K1)

    def _writes_into(self, X: Tensor) -> bool:
        """True when a product may write its parts into one output (see ``_eager``)."""
        return (X.dim() == 2 and self.c2.dim() == 1 and X.dtype == self.c2.dtype
                and _eager(X, *self.leaves))

    def to_dense(self) -> Tensor:
        M, Wc, c2 = self.leaves
        k1 = self._k1
        mid = _cat_broadcast([Wc[..., :k1, :].mT, torch.diag_embed(c2), Wc[..., k1:, :].mT],
                             dim=-1)
        return _cat_broadcast([M[..., :k1].mT, mid, M[..., k1:].mT], dim=-2)

    def matmat(self, X: Tensor) -> Tensor:
        M, Wc, c2 = self.leaves
        k1, n = self._k1, c2.shape[-1]
        X2 = X[..., k1 : k1 + n, :]
        Xh = torch.cat([X[..., :k1, :], X[..., k1 + n :, :]], dim=-2)
        hub = M.mT @ X
        if self._writes_into(X):
            out = X.new_empty(X.shape)
            mid = out[k1 : k1 + n]
            torch.mul(X2, c2.unsqueeze(-1), out=mid)
            mid.addmm_(Wc.mT, Xh)
            out[:k1], out[k1 + n :] = hub[:k1], hub[k1:]
            return out
        mid = torch.addcmul(Wc.mT @ Xh, c2.unsqueeze(-1), X2)
        return _cat_broadcast([hub[..., :k1, :], mid, hub[..., k1:, :]], dim=-2)

    def matmat_right(self, X: Tensor) -> Tensor:
        M, Wc, c2 = self.leaves
        k1, n = self._k1, c2.shape[-1]
        X2 = X[..., k1 : k1 + n]
        Xh = torch.cat([X[..., :k1], X[..., k1 + n :]], dim=-1)
        # symmetric: its hub columns are X M, formed as (M^T X^T)^T: MKL's GEMM with the
        # long side of the product first took 0.58x the time (X [512, 785], 30 hub columns)
        hub = (M.mT @ X.mT).mT
        if self._writes_into(X):
            out = X.new_empty(X.shape)
            mid = out[:, k1 : k1 + n]
            torch.mul(X2, c2, out=mid)
            mid.addmm_(Xh, Wc)
            out[:, :k1], out[:, k1 + n :] = hub[:, :k1], hub[:, k1:]
            return out
        mid = torch.addcmul(Xh @ Wc, X2, c2.unsqueeze(-2))
        return _cat_broadcast([hub[..., :k1], mid, hub[..., k1:]], dim=-1)

    # symmetric
    def rmatmat(self, X: Tensor) -> Tensor:
        return self.matmat(X)

    def rmatmat_right(self, X: Tensor) -> Tensor:
        return self.matmat_right(X)


def _rebuild_outer(k1: int, k2: int, leaves: tuple[Tensor, ...]) -> HierarchicalOuter:
    return _outer_type(k1, k2)(*leaves)


@functools.cache
def _outer_type(k1: int, k2: int) -> type[HierarchicalOuter]:
    qualname = f"HierarchicalOuter{k1}_{k2}"
    return type(
        qualname,
        (HierarchicalOuter,),
        {
            "name": f"hierarchical{k1}_{k2}",
            "K1": k1,
            "K2": k2,
            "_fields": ("M", "Wc", "c2"),
            "__module__": __name__,
            "__qualname__": qualname,
            "__doc__": f"K K^T of a hierarchical{k1}_{k2} K (see :class:`HierarchicalOuter`).",
        },
    )


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
            # made here, not on first use: torch.compile cannot trace making a class
            "_outer_type": _outer_type(k1, k2),
            "__module__": __name__,
            "__qualname__": qualname,
            "__doc__": f"Hierarchical with K1={k1}, K2={k2} (see :class:`Hierarchical`).",
        },
    )

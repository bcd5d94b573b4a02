"""The common base of every structured matrix type.

A structured matrix is a square d x d matrix kept as its structure's own parameters
(the "storage" column of docs/algorithm.md#structures), never as a d x d tensor unless
the structure is dense. Instances are immutable pytrees: their tensors are the leaves and their type
(which carries static parameters such as a block size) is the tree spec, so
``torch.func.vmap``, ``torch.compile`` and ``optree.tree_map`` see through them.

Every operation returns a new object. Linear-space operations (sum, difference,
scalar multiple) act on the stored parameters leaf by leaf, which is exact because
each structure's dense form is linear in its parameters. Everything else is written
per structure, in that structure's own parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from .._pytree import register_pytree

if TYPE_CHECKING:
    from typing_extensions import Self

Scalar = float | Tensor


class StructuredMatrix:
    """Base of the structured d x d matrices; see the module docstring.

    Subclasses set ``name`` and ``_fields`` (the names of their tensor leaves, in
    order) and implement the abstract methods below. Concrete subclasses are
    registered as pytrees automatically.
    """

    name: ClassVar[str] = ""
    _fields: ClassVar[tuple[str, ...]] = ()
    #: True when K K^T stays in the structure (then :meth:`outer_self` exists and the
    #: optimizer may cache the products C C^T and K K^T between factor updates).
    closed_under_outer: ClassVar[bool] = False
    #: True when the row forms (``X @ K``, :meth:`matmat_right` ...) return a
    #: column-major result (a transposed view); the natural gradient then applies the K
    #: side first, so that D comes out in row order (see ``precondition.natural_gradient``).
    row_form_transposed: ClassVar[bool] = False

    def __init__(self, *leaves: Tensor):
        if len(leaves) != len(self._fields):
            raise TypeError(
                f"{type(self).__name__} takes {len(self._fields)} tensors "
                f"({', '.join(self._fields)}), got {len(leaves)}"
            )
        for field, leaf in zip(self._fields, leaves):
            object.__setattr__(self, field, leaf)

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if cls._fields:
            register_pytree(
                cls,
                lambda obj: (list(obj.leaves), None),
                lambda _ctx, leaves: cls(*leaves),
            )

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; build a new one instead")

    def __reduce__(self):
        return (type(self)._rebuild, (self.name, self.leaves))

    @staticmethod
    def _rebuild(name: str, leaves: tuple[Tensor, ...]) -> StructuredMatrix:
        from . import get

        return get(name)(*leaves)

    # ----------------------------------------------------------------- basics
    @property
    def leaves(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, f) for f in self._fields)

    def named_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """Iterator of (field name, stored tensor), as the official package's matrices have."""
        return iter(tuple(zip(self._fields, self.leaves)))

    @property
    def shape(self) -> torch.Size:
        """(d, d), as the official package's matrices have."""
        return torch.Size((self.dim, self.dim))

    @property
    def dim(self) -> int:
        """The side d of the d x d matrix."""
        raise NotImplementedError

    # (the first leaf read directly: read several times per layer and step, building
    # the tuple of leaves was a tenth of a small model's plain drop-in step)
    @property
    def dtype(self) -> torch.dtype:
        return getattr(self, self._fields[0]).dtype

    @property
    def device(self) -> torch.device:
        return getattr(self, self._fields[0]).device

    def storage_numel(self) -> int:
        """Number of stored entries (the storage formula of docs/algorithm.md#structures)."""
        return sum(leaf.numel() for leaf in self.leaves)

    def map(self, fn: Callable[[Tensor], Tensor]) -> Self:
        """Apply ``fn`` to every stored tensor (e.g. a dtype or device cast)."""
        return type(self)(*(fn(leaf) for leaf in self.leaves))

    def to(self, *args: Any, **kwargs: Any) -> StructuredMatrix:
        return self.map(lambda t: t.to(*args, **kwargs))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, dtype={self.dtype})"

    # ----------------------------------------------------- construction (abstract)
    @classmethod
    def eye(cls, dim: int, dtype: torch.dtype | None = None, device: Any = None) -> Self:
        """The identity I (d x d) in this structure."""
        raise NotImplementedError

    @classmethod
    def zeros(cls, dim: int, dtype: torch.dtype | None = None, device: Any = None) -> Self:
        """The zero matrix (d x d) in this structure."""
        raise NotImplementedError

    @classmethod
    def from_dense(cls, sym: Tensor) -> Self:
        """The projection Pi(M) of a symmetric d x d matrix M (docs/algorithm.md#structures)."""
        raise NotImplementedError

    @classmethod
    def project_outer(cls, Y: Tensor) -> Self:
        """Pi(Y Y^T) for Y of shape [d, R], without forming the d x d product."""
        raise NotImplementedError

    # ---------------------------------------------------------- algebra (abstract)
    def to_dense(self) -> Tensor:
        """The d x d tensor this matrix stands for."""
        raise NotImplementedError

    def matmat(self, X: Tensor) -> Tensor:
        """self @ X for X of shape [d, n]."""
        raise NotImplementedError

    def rmatmat(self, X: Tensor) -> Tensor:
        """self^T @ X for X of shape [d, n]."""
        raise NotImplementedError

    def matmul(self, other: Self) -> Self:
        """self @ other, both of this structure; the result stays in it."""
        raise NotImplementedError

    def gram(self) -> StructuredMatrix:
        """Pi(self^T self)."""
        raise NotImplementedError

    def outer_self(self) -> StructuredMatrix:
        """self @ self^T, exactly, for structures with ``closed_under_outer``."""
        raise TypeError(f"{self.name}: K K^T is not in the structure")

    def outer_cache(self) -> StructuredMatrix | None:
        """self @ self^T in a form worth keeping between factor updates, or None.

        The optimizer keeps it (``precondition.outer_products``) and calls only its
        ``matmat`` / ``matmat_right``. By default :meth:`outer_self` where the structure
        is ``closed_under_outer``; a structure whose K K^T leaves it may return a
        product type of its own (hierarchical).
        """
        return self.outer_self() if self.closed_under_outer else None

    def add_diag(self, value: Scalar) -> StructuredMatrix:
        """self + value * I."""
        raise NotImplementedError

    def trace(self) -> Tensor:
        """trace(self), a 0-d tensor."""
        raise NotImplementedError

    # ---------------------------------------------------------- derived, generic
    # The products below have generic definitions in terms of the abstract ones;
    # structures override them where a direct form is cheaper. The ``*_right`` forms
    # act on the rows of X ([..., n, d], usually contiguous), so ``G K K^T`` needs no
    # transposed copies: ``K.outer_matmat_right(G)``.
    def matmat_right(self, X: Tensor) -> Tensor:
        """X @ self for X of shape [n, d]."""
        return self.rmatmat(X.mT).mT

    def rmatmat_right(self, X: Tensor) -> Tensor:
        """X @ self^T for X of shape [n, d]."""
        return self.matmat(X.mT).mT

    def outer_matmat(self, X: Tensor) -> Tensor:
        """self @ self^T @ X for X of shape [d, n] (the left half of C C^T G K K^T)."""
        return self.matmat(self.rmatmat(X))

    def outer_matmat_right(self, X: Tensor) -> Tensor:
        """X @ self @ self^T for X of shape [n, d] (the right half of C C^T G K K^T)."""
        return self.rmatmat_right(self.matmat_right(X))

    def project_inner(self, X: Tensor) -> StructuredMatrix:
        """Pi(self^T X X^T self) for X of shape [d, R]; self need not be symmetric."""
        return type(self).project_outer(self.rmatmat(X))

    def project_inner_gram(self, A: Tensor) -> StructuredMatrix:
        """Pi(self^T A self) for a symmetric A [d, d]: ``project_inner(X)`` from the Gram
        A = X X^T (the statistics form it when X has many more columns than d)."""
        D = self.to_dense()
        return type(self).from_dense(D.mT @ A @ D)

    def inner_cost(self) -> int:
        """Multiply-adds per column of X that ``project_inner(X)`` costs on X [d, R]
        contiguous along R (a convolution's patches), an estimate the statistics weigh
        against the Gram's d^2 (:meth:`project_inner_gram`).

        2 d^2 unless a structure says less: a dense K^T X and Y Y^T take that, and the
        block-diagonal, hierarchical and Toeplitz products took as long or longer on that
        layout (measured 1.0-3.8x the Gram's time at d = 145, 16,384 columns)."""
        return 2 * self.dim**2

    def average_trace(self) -> Tensor:
        """trace(self) / d."""
        return self.trace() / self.dim

    def max_abs(self) -> Tensor:
        """The largest absolute entry, a 0-d tensor (0 for an empty matrix)."""
        parts = [_abs_max(leaf) for leaf in self.leaves if leaf.numel() > 0]
        if not parts:
            return self.leaves[0].new_zeros(())
        out = parts[0]
        for p in parts[1:]:
            out = torch.maximum(out, p)
        return out

    def _check_same(self, other: Any) -> None:
        if type(other) is not type(self):
            raise TypeError(
                f"cannot combine {type(self).__name__} ({self.name!r}) with "
                f"{type(other).__name__}: both operands must have the same structure"
            )

    def __add__(self, other: StructuredMatrix) -> StructuredMatrix:
        self._check_same(other)
        return type(self)(*(a + b for a, b in zip(self.leaves, other.leaves)))

    def __sub__(self, other: StructuredMatrix) -> StructuredMatrix:
        self._check_same(other)
        return type(self)(*(a - b for a, b in zip(self.leaves, other.leaves)))

    def scale(self, scalar: Scalar) -> StructuredMatrix:
        """scalar * self, for a float or a 0-d tensor.

        Prefer it to ``self * t`` for a tensor ``t`` in code meant for torch.compile:
        dynamo sends ``structured * tensor`` down its tensor path and cannot trace it.
        """
        return self.map(lambda t: t * scalar)

    def __mul__(self, scalar: Scalar) -> StructuredMatrix:
        if isinstance(scalar, StructuredMatrix):
            raise TypeError("use `@` (matmul) for products of structured matrices")
        return self.scale(scalar)

    __rmul__ = __mul__

    def __truediv__(self, scalar: Scalar) -> StructuredMatrix:
        return self.map(lambda t: t / scalar)

    def __neg__(self) -> StructuredMatrix:
        return self.map(torch.neg)

    def __matmul__(self, other: StructuredMatrix | Tensor):
        if isinstance(other, StructuredMatrix):
            self._check_same(other)
            return self.matmul(other)
        return self.matmat(other)


def _under_transform() -> bool:
    """True inside ``torch.compile`` or a torch.func transform (vmap, grad, ...).

    ``peek_interpreter_stack`` is private; it is the only way to ask whether a
    functorch transform is active.
    """
    return torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None


def _eager(*tensors: Tensor) -> bool:
    """True when products may write into buffers (``out=``, in-place): outside vmap,
    torch.func.grad and torch.compile, and with no tensor needing autograd."""
    if _under_transform():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _broadcast_shapes(*shapes: torch.Size) -> torch.Size:
    """``torch.broadcast_shapes`` of batch shapes, returning at once when they are equal
    (the usual case: unbatched, or every leaf with the same batch). torch's own goes
    through its symbolic-shape checks on every call: 0.25-1 ms per call measured
    (torch 2.13, CPU, loaded machine), 48 calls per hierarchical statistics step of a
    two-layer model; the comparison here costs well under a microsecond."""
    first = shapes[0]
    if all(s == first for s in shapes[1:]):
        return first
    return torch.broadcast_shapes(*shapes)


# A symmetric product from this size on (rows and inner dimension) is multiplied in a
# 4 x 4 grid of blocks, only the 10 on and above the diagonal (0.625 of the flops):
# measured 0.62-0.81x one GEMM's time at n = m = 513-2048, 1 thread; at 256-384 it
# tied or lost, and with an inner dimension of 128-256 (a batch's V V^T) it lost.
_SYMMETRIC_MIN = 512
_SYMMETRIC_BLOCKS = 4


def _symmetric_product(A: Tensor, B: Tensor) -> Tensor:
    """A @ B for a product known to be symmetric: A [..., n, m], B [..., m, n].

    From n, m >= 512 on, only the blocks on and above the diagonal are multiplied;
    the others are their transposes, and each diagonal block's lower triangle is its
    upper one, so that the result is exactly symmetric. Below, one GEMM.
    """
    n, m = A.shape[-2:]
    if n < _SYMMETRIC_MIN or m < _SYMMETRIC_MIN:
        return A @ B
    edges = [n * i // _SYMMETRIC_BLOCKS for i in range(_SYMMETRIC_BLOCKS + 1)]
    spans = [slice(a, b) for a, b in zip(edges, edges[1:])]
    if A.dim() == 2 and B.dim() == 2 and _eager(A, B):  # written in place into one output
        out = torch.empty(n, n, dtype=torch.result_type(A, B), device=A.device)
        for i, rows in enumerate(spans):
            for cols in spans[i:]:
                torch.mm(A[rows], B[:, cols], out=out[rows, cols])
                if cols is not rows:
                    out[cols, rows].copy_(out[rows, cols].mT)
            diag = out[rows, rows]
            diag.copy_(_mirror_upper(diag))
        return out
    upper = {(i, j): A[..., r, :] @ B[..., :, c]
             for i, r in enumerate(spans) for j, c in enumerate(spans) if j >= i}
    return torch.cat([
        torch.cat([_mirror_upper(upper[i, i]) if i == j else
                   upper[i, j] if j > i else upper[j, i].mT
                   for j in range(len(spans))], -1)
        for i in range(len(spans))
    ], -2)


def _mirror_upper(M: Tensor) -> Tensor:
    """The symmetric matrix with M's upper triangle (M [..., k, k])."""
    return M.triu() + M.triu(1).mT


def _eye_like(n: int, like: Tensor) -> Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def _resolve(dtype: torch.dtype | None) -> torch.dtype:
    return torch.get_default_dtype() if dtype is None else dtype


def _abs_max(t: Tensor) -> Tensor:
    """max |t| over all entries (t non-empty) in one pass with no |t| temporary."""
    lo, hi = torch.aminmax(t)
    return torch.maximum(-lo, hi)


def _add_diag(mat: Tensor, value: Scalar) -> Tensor:
    """mat + value * I for square matrices [..., k, k], without building I: one copy
    of ``mat`` with the new diagonal written in (out of place, vmap- and compile-safe)."""
    diag = torch.diagonal(mat, dim1=-2, dim2=-1) + value
    return torch.diagonal_scatter(mat, diag.to(mat.dtype), dim1=-2, dim2=-1)

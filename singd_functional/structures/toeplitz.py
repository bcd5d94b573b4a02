"""Lower / upper triangular Toeplitz K or C: d coefficients; Pi averages the diagonals.

``triltoeplitz`` stands for L with ``L[i, j] = c[i - j]`` for ``i >= j`` (else 0) and
``triutoeplitz`` for its transpose pattern U with ``U[i, j] = c[j - i]`` for ``j >= i``.
The two share every formula through :class:`_Toeplitz`; since U = L^T (same
coefficients), an upper matrix is a lower one with ``matmat`` and ``rmatmat`` swapped.

Products are convolutions of coefficient sequences and are done with real FFTs of a
fast length n >= 2d - 1 (no wrap-around), so ``matmat`` / ``rmatmat`` cost
O(n d log d) for X [d, n] and ``project_outer`` O(R d log d) for Y [d, R]; nothing
d x d is formed except in :meth:`to_dense` / :meth:`from_dense` and, for d <= 96
(``_DENSE_MAX``), in the products, which are then GEMMs with the d x d triangular
matrix, and in the projections, which then sum the diagonals of a d x d Gram (both
faster than FFTs there). The FFT runs in
float32 for half-precision inputs (CPU FFTs do not support them) and in the input's
precision otherwise; results are cast back to the input dtype.

Every product is done on ROWS (:func:`_rows_chain`): ``Z -> Z K`` and ``Z -> Z K^T``
for Z [..., rows, d], with the FFTs along the last dimension (strided FFTs along dim -2
are 2 to 3 times slower on CPU); the column forms ``K X`` work on the rows of X^T.
The two-sided ``K K^T X`` / ``X K K^T`` of the natural gradient reuse one spectrum of
the coefficients and truncate in between (the product of the two triangular matrices
is not Toeplitz). Rows go in cache-sized batches; outside autograd, vmap and compile
the batches are transformed in place and written into one result laid out like the
input (:func:`_eager_chain`).

What this costs (MLP 784-512-512-10, 1 thread): C C^T G K K^T needs two transform pairs
per row on each side, 9328 real FFTs of lengths 1024 to 1600 per plain step, which alone
took 0.67 of the whole natural gradient's time (median of 40 interleaved pairs), more
than an SGD step (forward, backward and update) takes. The same products applied to
the batch factors of G = E^T A (128 rows instead of d) and one GEMM measured 0.43 of
the time; that would need E and A on every step, which only the statistics steps capture.

Leaves may carry leading batch dimensions (``coeffs`` [..., d], ``X`` [..., d, n]);
every operation is also ``torch.func.vmap``-able.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ._base import Scalar, StructuredMatrix, _eager, _resolve

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["TrilToeplitz", "TriuToeplitz"]


# ---------------------------------------------------------------------- FFT helpers
# Odd parts q of the FFT lengths 2^a q (a >= 4) that are fast with torch's CPU FFT
# (MKL): measured on [512, 785] and [512, 513] rows, lengths like 1728 = 2^6 27 and
# 1152 = 2^7 9 run in 0.35 to 0.85 of the time of the next power of two, while lengths
# with a small power of two (1620 = 2^2 405, 1575 odd) run up to 1.8 times slower.
# 25 added later: 2^a 25 ran in 0.87 to 0.90 of the time of the 2^b 27 it replaces
# (400 vs 432 .. 6400 vs 6912; d = 785, the MLP's first K, gets 1600 instead of 1728).
_FAST_ODD_PARTS = (1, 3, 5, 7, 9, 15, 21, 25, 27)
# Rows per FFT batch: about 128K real entries (0.5 MB in float32) keeps one batch's
# spectra in the per-core L2 cache; measured 1.5 to 2 times faster than one batch of
# all rows at d = 512 .. 2048.
_CHUNK_ENTRIES = 1 << 17
# Up to this d the products are GEMMs with the d x d triangular matrix: measured 0.42 to
# 0.87 of the FFT path's time at d = 32 .. 96 for 8 to 513 rows (interleaved medians),
# 1.0 to 1.45 at d = 128 with up to 128 rows.
_DENSE_MAX = 96


@functools.cache
def _fft_size(m: int) -> int:
    """A fast FFT length >= m: the smallest 2^a q with q in ``_FAST_ODD_PARTS``."""
    best = 1 << max(m - 1, 0).bit_length()
    for q in _FAST_ODD_PARTS[1:]:
        n = q << 4
        while n < m:
            n *= 2
        best = min(best, n)
    return best


def _chunk_rows(n: int) -> int:
    """Rows per FFT batch for length-n transforms (a power of two, at least 8)."""
    return max(8, 1 << max((_CHUNK_ENTRIES // n).bit_length() - 1, 0))


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the FFT runs in: float32 for half precisions, else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _diag_weights(d: int, dtype: torch.dtype, device) -> Tensor:
    """w_k with w_0 = 1/d and w_k = 2/(d-k): maps a one-sided diagonal sum A_k of a
    symmetric matrix to the coefficient ``(sub + super diagonal sum)/(d-k)`` of Pi."""
    k = torch.arange(d, dtype=torch.float64, device=device)
    return ((2.0 - (k == 0).to(torch.float64)) / (d - k)).to(dtype)


def _spectrum(x: Tensor, n: int, dim: int) -> Tensor:
    return torch.fft.rfft(x, n=n, dim=dim)


def _conv_coeffs(a: Tensor, b: Tensor, correlate: bool = False) -> Tensor:
    """The first d entries of conv(a, b) (or of the correlation
    ``out[k] = sum_m a[m] b[m + k]`` if ``correlate``); a, b [..., d], same dtype."""
    d = a.shape[-1]
    n = _fft_size(2 * d - 1)
    A = _spectrum(a, n, -1)
    if correlate:
        A = A.conj()
    return torch.fft.irfft(A * _spectrum(b, n, -1), n=n, dim=-1)[..., :d]


def _skew_columns(M: Tensor) -> Tensor:
    """The diagonal sums of M [..., d, d] as [..., 2d]: entry d-1+k sums diagonal k
    (super-diagonals k > 0, sub-diagonals k < 0; the last entry is 0).

    Skew trick: left-pad the rows with d-1 zeros ([d, 2d-1]), flatten, pad to d*2d and
    reshape to [d, 2d]: entry (i, j) lands in column d-1 + (j - i)."""
    d = M.shape[-1]
    A = torch.nn.functional.pad(M, (d - 1, 0))
    A = A.reshape(*A.shape[:-2], d * (2 * d - 1))
    A = torch.nn.functional.pad(A, (0, d))
    return A.reshape(*A.shape[:-1], d, 2 * d).sum(-2)


def _row_chunks(Z: Tensor, n: int) -> list[Tensor]:
    """Z [..., rows, d] split along the rows into cache-sized FFT batches."""
    rows = _chunk_rows(n)
    return [Z] if Z.shape[-2] <= rows else list(Z.split(rows, dim=-2))


def _rows_chain(c: Tensor, Z: Tensor, correlate: tuple[bool, ...]) -> Tensor:
    """Z L_1 L_2 ... for Z [..., rows, d] and the lower Toeplitz L of coefficients c
    [..., d], each step either ``Z -> Z L`` (a correlation along the rows, ``correlate``
    True) or ``Z -> Z L^T`` (a causal convolution).

    All FFTs run along the last (contiguous) dimension, the spectrum of c is computed
    once for every step, each intermediate is cut back to d entries (the triangular
    truncation) before the next step, and the rows go in cache-sized batches. For
    d <= ``_DENSE_MAX`` the steps are GEMMs with the d x d matrix L instead."""
    d = c.shape[-1]
    out_dtype = torch.promote_types(c.dtype, Z.dtype)
    work = _work_dtype(out_dtype)
    c, Z = c.to(work), Z.to(work)
    if d <= _DENSE_MAX:
        return _dense_chain(c, Z, correlate).to(out_dtype)
    n = _fft_size(2 * d - 1)
    C = torch.fft.rfft(c, n=n, dim=-1).unsqueeze(-2)
    steps = [C.conj() if corr else C for corr in correlate]
    if not (_eager(c, Z) and c.shape[:-1] == Z.shape[:-2]):
        def run(Y: Tensor) -> Tensor:
            for S in steps:
                Y = torch.fft.irfft(torch.fft.rfft(Y, n=n, dim=-1) * S, n=n, dim=-1)[..., :d]
            return Y

        parts = [run(p) for p in _row_chunks(Z, n)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)
        return out.to(out_dtype)
    return _eager_chain(Z, d, n, steps).to(out_dtype)


def _eager_chain(Z: Tensor, d: int, n: int, steps: list[Tensor]) -> Tensor:
    """:func:`_rows_chain`'s FFT steps outside autograd, vmap and compile: each
    spectrum is multiplied in place, the truncation zeroes the tail of the length-n
    intermediate in place (no padded copy), and every batch of rows is written into one
    result laid out like Z, so that the column forms (Z = X^T, a transposed view)
    return a contiguous [d, n] and the row-form product that follows in C C^T G K K^T
    reads contiguous rows. Measured on the MLP 784-512-512-10's natural gradient (all
    three layers): 0.95 of the functional path's time (median of 60 interleaved pairs;
    a zero-padded input buffer and ``out=`` transforms, with or without transposing the
    rows first, measured 0.99 to 1.0 and were left out)."""
    out = torch.empty_like(Z)
    rows = _chunk_rows(n)
    for start in range(0, Z.shape[-2], rows):
        Y = Z[..., start : start + rows, :]
        for i, S in enumerate(steps):
            F = torch.fft.rfft(Y, n=n, dim=-1)
            F.mul_(S)
            Y = torch.fft.irfft(F, n=n, dim=-1)
            if i + 1 < len(steps):
                Y[..., d:].zero_()
        out[..., start : start + rows, :] = Y[..., :d]
    return out


def _lower_dense(c: Tensor, lower: bool = True) -> Tensor:
    """The d x d lower (or upper) triangular Toeplitz matrix of coefficients c [..., d]."""
    d = c.shape[-1]
    i = torch.arange(d, device=c.device)
    offset = i[:, None] - i[None, :]
    if not lower:
        offset = -offset
    vals = c[..., offset.clamp(min=0)]
    return torch.where(offset >= 0, vals, vals.new_zeros(()))


def _dense_chain(c: Tensor, Z: Tensor, correlate: tuple[bool, ...]) -> Tensor:
    """:func:`_rows_chain` for small d, as GEMMs with the d x d L; a Z that is a
    transposed view (the column forms) gives a result laid out the same way."""
    L = _lower_dense(c)
    columns = _eager(Z) and not Z.is_contiguous() and Z.mT.is_contiguous()
    for corr in correlate:
        A = L if corr else L.mT
        Z = (A.mT @ Z.mT).mT if columns else Z @ A
    return Z


def _rows_autocorrelation(Z: Tensor, c: Tensor | None = None, correlate: bool = True) -> Tensor:
    """A_k = sum_r sum_i Y[r, i] Y[r, i + k] (k < d) for Y = Z, or, when c is given, for
    Y = Z L (``correlate``) or Y = Z L^T with L the lower Toeplitz of c; Z [..., rows, d].
    Returns [..., d] in the work dtype."""
    d = Z.shape[-1]
    work = _work_dtype(Z.dtype if c is None else torch.promote_types(c.dtype, Z.dtype))
    if d <= _DENSE_MAX:
        # Y^T Y = A^T (Z^T Z) A (A = L or L^T), then its super-diagonal sums: measured
        # 0.22 to 0.6 of the FFT path's time without c and 0.34 to 0.87 with it, at
        # d = 10 .. 96 and 128 .. 65536 rows (the CNN's unfolded patches)
        Z = Z.to(work)
        gram = Z.mT @ Z
        if c is not None:
            L = _lower_dense(c.to(work))
            A = L if correlate else L.mT
            gram = A.mT @ gram @ A
        return _skew_columns(gram)[..., d - 1 : 2 * d - 1]
    n = _fft_size(2 * d - 1)
    C = None
    if c is not None:
        C = torch.fft.rfft(c.to(work), n=n, dim=-1).unsqueeze(-2)
        C = C.conj() if correlate else C
    power = None
    for Y in _row_chunks(Z.to(work), n):
        if C is not None:  # Y K, cut back to d entries before its power spectrum
            Y = torch.fft.irfft(torch.fft.rfft(Y, n=n, dim=-1) * C, n=n, dim=-1)[..., :d]
        F = torch.fft.rfft(Y, n=n, dim=-1)
        part = (F.real.square() + F.imag.square()).sum(-2)
        power = part if power is None else power + part
    return torch.fft.irfft(power, n=n, dim=-1)[..., :d]


# ------------------------------------------------------------------ the structure
class _Toeplitz(StructuredMatrix):
    """Shared implementation; subclasses set ``name`` and ``lower``. Leaves: ``coeffs``
    [d], the first column (lower) or first row (upper) of the matrix."""

    _fields = ("coeffs",)
    lower: ClassVar[bool] = True
    coeffs: Tensor

    @property
    def dim(self) -> int:
        return self.coeffs.shape[-1]

    # ------------------------------------------------------------ construction
    @classmethod
    def eye(cls, dim: int, dtype: torch.dtype | None = None, device: Any = None) -> Self:
        dtype = _resolve(dtype)
        one = torch.ones(1, dtype=dtype, device=device)
        return cls(torch.cat([one, torch.zeros(dim - 1, dtype=dtype, device=device)]))

    @classmethod
    def zeros(cls, dim: int, dtype: torch.dtype | None = None, device: Any = None) -> Self:
        return cls(torch.zeros(dim, dtype=_resolve(dtype), device=device))

    @classmethod
    def from_dense(cls, sym: Tensor) -> Self:
        d = sym.shape[-1]
        dtype = sym.dtype
        M = sym.to(_work_dtype(dtype))
        cols = _skew_columns(M)
        two_sided = cols[..., d - 1 : 2 * d - 1] + cols[..., :d].flip(-1)  # k=0 counted twice
        w = _diag_weights(d, M.dtype, M.device)
        return cls((0.5 * two_sided * w).to(dtype))

    @classmethod
    def project_outer(cls, Y: Tensor) -> Self:
        # A_k = sum_r sum_i Y[i, r] Y[i + k, r]: the column-summed autocorrelation,
        # computed on the rows of Y^T (FFTs along the contiguous dimension of a Y that
        # is itself a transposed view, as K^T a^T is)
        A = _rows_autocorrelation(Y.mT)
        return cls((A * _diag_weights(Y.shape[-2], A.dtype, Y.device)).to(Y.dtype))

    def project_inner(self, X: Tensor) -> _Toeplitz:
        # Pi(K^T X X^T K) = Pi(Y Y^T) with Y^T = X^T K, fused: one spectrum of c, the
        # truncation of X^T K, then its power spectrum, all along the rows of X^T
        c = self.coeffs
        A = _rows_autocorrelation(X.mT, c, correlate=self.lower)
        dtype = torch.promote_types(c.dtype, X.dtype)
        return type(self)((A * _diag_weights(self.dim, A.dtype, c.device)).to(dtype))

    # ----------------------------------------------------------------- algebra
    def to_dense(self) -> Tensor:
        return _lower_dense(self.coeffs, self.lower)

    # Everything goes through the rows form Z -> Z K (a correlation for a lower K, a
    # convolution for an upper one) and Z -> Z K^T, on X^T for the column forms.
    def matmat(self, X: Tensor) -> Tensor:
        return _rows_chain(self.coeffs, X.mT, (not self.lower,)).mT

    def rmatmat(self, X: Tensor) -> Tensor:
        return _rows_chain(self.coeffs, X.mT, (self.lower,)).mT

    def matmat_right(self, X: Tensor) -> Tensor:
        return _rows_chain(self.coeffs, X, (self.lower,))

    def rmatmat_right(self, X: Tensor) -> Tensor:
        return _rows_chain(self.coeffs, X, (not self.lower,))

    def outer_matmat(self, X: Tensor) -> Tensor:
        # K K^T X = (X^T K K^T)^T: both steps in one pass over the rows of X^T
        return _rows_chain(self.coeffs, X.mT, (self.lower, not self.lower)).mT

    def outer_matmat_right(self, X: Tensor) -> Tensor:
        return _rows_chain(self.coeffs, X, (self.lower, not self.lower))

    def matmul(self, other: _Toeplitz) -> _Toeplitz:
        # Triangular Toeplitz matrices of one kind commute and multiply by convolution.
        a, b = self.coeffs, other.coeffs
        dtype = torch.promote_types(a.dtype, b.dtype)
        work = _work_dtype(dtype)
        return type(self)(_conv_coeffs(a.to(work), b.to(work)).to(dtype))

    def gram(self) -> _Toeplitz:
        # For L^T L and for L L^T alike, the k-th one-sided diagonal sum is
        # S_k = sum_{j>=k} c_j c_{j-k} (d - j): a correlation of w = c * (d - j) with c.
        c = self.coeffs
        d = self.dim
        dtype = c.dtype
        work = _work_dtype(dtype)
        c = c.to(work)
        w = c * (d - torch.arange(d, dtype=work, device=c.device))
        S = _conv_coeffs(c, w, correlate=True)
        return type(self)((S * _diag_weights(d, work, c.device)).to(dtype))

    def add_diag(self, value: Scalar) -> _Toeplitz:
        c = self.coeffs
        return type(self)(torch.cat([c[..., :1] + value, c[..., 1:]], dim=-1))

    def trace(self) -> Tensor:
        return self.coeffs[..., 0] * self.dim


class TrilToeplitz(_Toeplitz):
    """Lower triangular Toeplitz: ``L[i, j] = coeffs[i - j]`` for i >= j."""

    name = "triltoeplitz"
    lower = True


class TriuToeplitz(_Toeplitz):
    """Upper triangular Toeplitz: ``U[i, j] = coeffs[j - i]`` for j >= i."""

    name = "triutoeplitz"
    lower = False

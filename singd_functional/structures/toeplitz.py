"""Lower / upper triangular Toeplitz K or C: d coefficients; Pi averages the diagonals.

``triltoeplitz`` stands for L with ``L[i, j] = c[i - j]`` for ``i >= j`` (else 0) and
``triutoeplitz`` for its transpose pattern U with ``U[i, j] = c[j - i]`` for ``j >= i``.
The two share every formula through :class:`_Toeplitz`; since U = L^T (same
coefficients), an upper matrix is a lower one with ``matmat`` and ``rmatmat`` swapped.

Products are convolutions of coefficient sequences and are done with real FFTs of a
fast length n >= 2d - 1 (no wrap-around), so ``matmat`` / ``rmatmat`` cost
O(n d log d) for X [d, n] and ``project_outer`` O(R d log d) for Y [d, R]; nothing
d x d is formed except in :meth:`to_dense` / :meth:`from_dense`. The FFT runs in
float32 for half-precision inputs (CPU FFTs do not support them) and in the input's
precision otherwise; results are cast back to the input dtype.

Leaves may carry leading batch dimensions (``coeffs`` [..., d], ``X`` [..., d, n]);
every operation is also ``torch.func.vmap``-able.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ._base import Scalar, StructuredMatrix, _resolve

__all__ = ["TrilToeplitz", "TriuToeplitz"]


# ---------------------------------------------------------------------- FFT helpers
def _fft_size(m: int) -> int:
    """The smallest 2^a 3^b 5^c >= m (a fast FFT length); O(log^2 m) plain Python."""
    best = 1 << max(m - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            n = p35
            while n < m:
                n *= 2
            best = min(best, n)
            p35 *= 3
        p5 *= 5
    return best


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


def _lower_apply(c: Tensor, X: Tensor, transpose: bool) -> Tensor:
    """L @ X (or L^T @ X if ``transpose``) for the lower Toeplitz L of coefficients c
    [..., d] and X [..., d, n]: a causal convolution (correlation) along dim -2."""
    d = c.shape[-1]
    out_dtype = torch.promote_types(c.dtype, X.dtype)
    work = _work_dtype(out_dtype)
    n = _fft_size(2 * d - 1)
    C = _spectrum(c.to(work), n, -1).unsqueeze(-1)
    if transpose:  # (L^T X)[i] = sum_k c[k] X[i + k]
        C = C.conj()
    F = _spectrum(X.to(work), n, -2)
    return torch.fft.irfft(C * F, n=n, dim=-2)[..., :d, :].to(out_dtype)


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
    def eye(cls, dim, dtype=None, device=None):
        dtype = _resolve(dtype)
        one = torch.ones(1, dtype=dtype, device=device)
        return cls(torch.cat([one, torch.zeros(dim - 1, dtype=dtype, device=device)]))

    @classmethod
    def zeros(cls, dim, dtype=None, device=None):
        return cls(torch.zeros(dim, dtype=_resolve(dtype), device=device))

    @classmethod
    def from_dense(cls, sym: Tensor):
        d = sym.shape[-1]
        dtype = sym.dtype
        M = sym.to(_work_dtype(dtype))
        # Skew trick: left-pad rows with d-1 zeros ([d, 2d-1]), flatten, pad to d*2d and
        # reshape to [d, 2d]: entry (i, j) lands in column d-1 + (j - i), so column sums
        # are the diagonal sums (super-diagonals right of d-1, sub-diagonals left).
        A = torch.nn.functional.pad(M, (d - 1, 0))
        A = A.reshape(*A.shape[:-2], d * (2 * d - 1))
        A = torch.nn.functional.pad(A, (0, d))
        cols = A.reshape(*A.shape[:-1], d, 2 * d).sum(-2)
        two_sided = cols[..., d - 1 : 2 * d - 1] + cols[..., :d].flip(-1)  # k=0 counted twice
        w = _diag_weights(d, M.dtype, M.device)
        return cls((0.5 * two_sided * w).to(dtype))

    @classmethod
    def project_outer(cls, Y: Tensor):
        # A_k = sum_r sum_i Y[i, r] Y[i + k, r]: the column-summed autocorrelation.
        d = Y.shape[-2]
        dtype = Y.dtype
        work = _work_dtype(dtype)
        n = _fft_size(2 * d - 1)
        F = _spectrum(Y.to(work), n, -2)
        power = (F.real.square() + F.imag.square()).sum(-1)
        A = torch.fft.irfft(power, n=n, dim=-1)[..., :d]
        return cls((A * _diag_weights(d, work, Y.device)).to(dtype))

    # ----------------------------------------------------------------- algebra
    def to_dense(self) -> Tensor:
        d = self.dim
        i = torch.arange(d, device=self.coeffs.device)
        offset = i[:, None] - i[None, :]
        if not self.lower:
            offset = -offset
        vals = self.coeffs[..., offset.clamp(min=0)]
        return torch.where(offset >= 0, vals, vals.new_zeros(()))

    def matmat(self, X: Tensor) -> Tensor:
        return _lower_apply(self.coeffs, X, transpose=not self.lower)

    def rmatmat(self, X: Tensor) -> Tensor:
        return _lower_apply(self.coeffs, X, transpose=self.lower)

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

"""Family-specific tests for the triangular Toeplitz and the four arrowhead structures.

The generic property tests live in test_structures.py; here: large d against the dense
oracle in float64, the lower/upper transpose relations, leading batch dimensions, half
precisions, d = 1, and a check that no operation forms a d x d intermediate.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from singd_functional import structures
from tests._dense_projection import project

TOEPLITZ = ["triltoeplitz", "triutoeplitz"]
ARROWHEADS = ["triltopleftdiag", "trilbottomrightdiag", "triutopleftdiag", "triubottomrightdiag"]
ALL = TOEPLITZ + ARROWHEADS


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def close(actual, expected, tol):
    actual, expected = actual.double(), expected.double()
    scale = max(expected.norm().item(), 1.0)
    err = (actual - expected).norm().item()
    assert err <= tol * scale, f"relative error {err / scale:.3e} > {tol:.1e}"


def random_member(T, d, dtype=torch.float64, batch=()):
    zero = T.zeros(d, dtype=torch.float64)
    return T(*(torch.randn(*batch, *leaf.shape, dtype=torch.float64) for leaf in zero.leaves)).to(
        dtype
    )


# ---------------------------------------------------------------------- large d, float64
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("d", [300, 257, 64])
def test_large_d_matches_dense_float64(name, d):
    T = structures.get(name)
    K, L = random_member(T, d), random_member(T, d)
    Kd, Ld = K.to_dense(), L.to_dense()
    X = torch.randn(d, 7, dtype=torch.float64)
    A = torch.randn(d, d, dtype=torch.float64)
    M = A + A.T
    tol = 1e-12
    close(T.from_dense(M).to_dense(), project(name, M), tol)
    close(T.project_outer(X).to_dense(), project(name, X @ X.T), tol)
    close(K.project_inner(X).to_dense(), project(name, Kd.T @ X @ X.T @ Kd), tol)
    close(K.gram().to_dense(), project(name, Kd.T @ Kd), tol)
    close(K.matmat(X), Kd @ X, tol)
    close(K.rmatmat(X), Kd.T @ X, tol)
    close(K.matmul(L).to_dense(), Kd @ Ld, tol)
    close(K.add_diag(0.7).to_dense(), Kd + 0.7 * torch.eye(d, dtype=torch.float64), tol)
    close(K.trace(), torch.trace(Kd), tol)


@pytest.mark.parametrize("name", ALL)
def test_projection_is_idempotent_and_keeps_the_trace(name):
    T = structures.get(name)
    d = 40
    A = torch.randn(d, d, dtype=torch.float64)
    M = A + A.T
    P = T.from_dense(M)
    close(P.trace(), torch.trace(M), 1e-12)
    # Pi of the symmetrized member reproduces the member
    Pd = P.to_dense()
    close(T.from_dense((Pd + Pd.T) / 2).to_dense(), Pd, 1e-12)


# ------------------------------------------------------------------- Toeplitz specifics
@pytest.mark.parametrize("d", [1, 2, 5, 100])
def test_upper_toeplitz_is_the_transpose_of_lower(d):
    c = torch.randn(d, dtype=torch.float64)
    Lo, Up = structures.TrilToeplitz(c), structures.TriuToeplitz(c)
    Ld = Lo.to_dense()
    assert torch.equal(Up.to_dense(), Ld.T)
    assert torch.equal(Ld, torch.tril(Ld))
    for i in range(d):
        for j in range(i + 1):
            assert Ld[i, j] == c[i - j]
    X = torch.randn(d, 3, dtype=torch.float64)
    close(Up.matmat(X), Lo.rmatmat(X), 1e-13)
    close(Up.rmatmat(X), Lo.matmat(X), 1e-13)
    # both share the projection coefficients and the Gram coefficients
    close(
        structures.TriuToeplitz.project_outer(X).coeffs,
        structures.TrilToeplitz.project_outer(X).coeffs,
        0,
    )
    close(Up.gram().coeffs, Lo.gram().coeffs, 0)
    c2 = torch.randn(d, dtype=torch.float64)
    close(
        Up.matmul(structures.TriuToeplitz(c2)).coeffs,
        Lo.matmul(structures.TrilToeplitz(c2)).coeffs,
        0,
    )


def test_toeplitz_coefficients_by_hand():
    d = 4
    Y = torch.arange(1.0, 9.0, dtype=torch.float64).reshape(d, 2)
    got = structures.TrilToeplitz.project_outer(Y).coeffs
    want = [(Y * Y).sum() / d]
    for k in range(1, d):
        want.append(2 * (Y[:-k] * Y[k:]).sum() / (d - k))
    close(got, torch.stack(want), 1e-14)
    c = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    # (1 + 2x + 3x^2 + 4x^3)^2 = 1 + 4x + 10x^2 + 20x^3 + ...
    prod = structures.TrilToeplitz(c).matmul(structures.TrilToeplitz(c)).coeffs
    close(prod, torch.tensor([1.0, 4.0, 10.0, 20.0], dtype=torch.float64), 1e-14)


@pytest.mark.parametrize("name", TOEPLITZ)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_toeplitz_low_precision_keeps_dtype(name, dtype):
    T = structures.get(name)
    d = 33
    K = random_member(T, d, dtype)
    X = torch.randn(d, 4).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    Kd, Xd = K.to_dense().double(), X.double()
    for out, ref in [
        (K.matmat(X), Kd @ Xd),
        (K.rmatmat(X), Kd.T @ Xd),
        (T.project_outer(X).to_dense(), project(name, Xd @ Xd.T)),
        (K.gram().to_dense(), project(name, Kd.T @ Kd)),
        (K.matmul(K).to_dense(), Kd @ Kd),
        (T.from_dense((Xd @ Xd.T).to(dtype)).to_dense(), project(name, Xd @ Xd.T)),
    ]:
        assert out.dtype == dtype
        close(out, ref, tol)


# Every product of the natural gradient goes through one of two paths, picked by d: GEMMs
# with the d x d triangular matrix (d <= _DENSE_MAX) or FFTs (eager, in place; or
# functional under autograd / vmap), in row batches. Each is checked against dense
# products on non-symmetric inputs, in float64, with inputs laid out both ways.
def _products(K, X, Y):
    """The six products of a structure: X [d, m] for the column forms, Y [r, d] rows."""
    return {
        "matmat": K.matmat(X),
        "rmatmat": K.rmatmat(X),
        "outer_matmat": K.outer_matmat(X),
        "matmat_right": K.matmat_right(Y),
        "rmatmat_right": K.rmatmat_right(Y),
        "outer_matmat_right": K.outer_matmat_right(Y),
    }


def _dense_products(Kd, X, Y):
    return {
        "matmat": Kd @ X,
        "rmatmat": Kd.mT @ X,
        "outer_matmat": Kd @ Kd.mT @ X,
        "matmat_right": Y @ Kd,
        "rmatmat_right": Y @ Kd.mT,
        "outer_matmat_right": Y @ Kd @ Kd.mT,
    }


@pytest.mark.parametrize("name", TOEPLITZ)
@pytest.mark.parametrize("d", [40, 96, 97, 200, 785])  # 200 and 785: FFT lengths 400, 1600
def test_toeplitz_products_both_paths_match_dense_float64(name, d):
    from singd_functional.structures.toeplitz import _DENSE_MAX, _chunk_rows, _fft_size

    assert (d <= _DENSE_MAX) == (d in (40, 96))
    T = structures.get(name)
    K = random_member(T, d)
    Kd = K.to_dense()
    rows = _chunk_rows(_fft_size(2 * d - 1)) + 3  # more than one FFT batch of rows
    for X, Y in [
        (torch.randn(d, rows, dtype=torch.float64), torch.randn(rows, d, dtype=torch.float64)),
        # transposed views: the layout the natural gradient hands to the other side
        (torch.randn(rows, d, dtype=torch.float64).mT, torch.randn(d, rows, dtype=torch.float64).mT),
    ]:
        got, want = _products(K, X, Y), _dense_products(Kd, X, Y)
        for op in want:
            assert got[op].shape == want[op].shape, op
            close(got[op], want[op], 1e-12)
        # the projections take the same two paths (a d x d Gram for small d)
        close(T.project_outer(X).to_dense(), project(name, X @ X.T), 1e-12)
        close(K.project_inner(X).to_dense(), project(name, Kd.T @ X @ X.T @ Kd), 1e-12)
    # the column forms of a contiguous X come back contiguous (no strided rows downstream)
    X = torch.randn(d, 5, dtype=torch.float64)
    assert K.outer_matmat(X).is_contiguous() and K.matmat(X).is_contiguous()


@pytest.mark.parametrize("name", TOEPLITZ)
@pytest.mark.parametrize("d", [40, 200])
def test_toeplitz_products_under_vmap_autograd_and_batch_dims(name, d):
    # vmap and autograd take the functional FFT path, leading batch dimensions the
    # eager one: all equal to dense products
    T = structures.get(name)
    b, m = 3, 6
    K = random_member(T, d, batch=(b,))
    Kd = K.to_dense()
    X = torch.randn(b, d, m, dtype=torch.float64)
    Y = torch.randn(b, m, d, dtype=torch.float64)
    want = _dense_products(Kd, X, Y)
    batched = _products(K, X, Y)
    mapped = torch.func.vmap(lambda c, x, y: _products(T(c), x, y))(K.coeffs, X, Y)
    for op in want:
        close(batched[op], want[op], 1e-12)
        close(mapped[op], want[op], 1e-12)
    stats = torch.func.vmap(lambda c, x: (T.project_outer(x).coeffs, T(c).project_inner(x).coeffs))
    for outer, inner in [(T.project_outer(X).coeffs, K.project_inner(X).coeffs),
                         stats(K.coeffs, X)]:
        for i in range(b):
            close(T(outer[i]).to_dense(), project(name, X[i] @ X[i].T), 1e-12)
            close(T(inner[i]).to_dense(), project(name, Kd[i].T @ X[i] @ X[i].T @ Kd[i]), 1e-12)
    c = K.coeffs[0].clone().requires_grad_(True)
    out = _products(T(c), X[0], Y[0])
    for op in want:
        close(out[op].detach(), want[op][0], 1e-12)
    # gradient of sum(K K^T X) wrt the coefficients, against the dense form's
    sum(o.sum() for o in out.values()).backward()
    cd = K.coeffs[0].clone().requires_grad_(True)
    sum(o.sum() for o in _dense_products(T(cd).to_dense(), X[0], Y[0]).values()).backward()
    close(c.grad, cd.grad, 1e-12)


@pytest.mark.parametrize("name", TOEPLITZ)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_toeplitz_fft_path_low_precision(name, dtype):
    T = structures.get(name)
    d = 130
    K = random_member(T, d, dtype)
    X, Y = torch.randn(d, 4).to(dtype), torch.randn(4, d).to(dtype)
    got = _products(K, X, Y)
    want = _dense_products(K.to_dense().double(), X.double(), Y.double())
    for op in want:
        assert got[op].dtype == dtype
        close(got[op], want[op], 3e-2)


# ---------------------------------------------------------------------- arrowheads
@pytest.mark.parametrize(
    ("lower", "upper"),
    [("triltopleftdiag", "triutopleftdiag"), ("trilbottomrightdiag", "triubottomrightdiag")],
)
def test_arrowhead_lower_is_transpose_of_upper(lower, upper):
    d = 6
    a, r = torch.randn(d, dtype=torch.float64), torch.randn(d - 1, dtype=torch.float64)
    Lo, Up = structures.get(lower)(a, r), structures.get(upper)(a, r)
    assert torch.equal(Lo.to_dense(), Up.to_dense().T)
    X = torch.randn(d, 3, dtype=torch.float64)
    close(Lo.matmat(X), Up.rmatmat(X), 0)


def test_arrowhead_patterns():
    d = 5
    a = torch.arange(1.0, d + 1, dtype=torch.float64)
    r = torch.arange(10.0, 10.0 + d - 1, dtype=torch.float64)
    D = torch.diag(a)
    M = structures.TrilTopLeftDiag(a, r).to_dense() - D
    assert torch.equal(M[d - 1, : d - 1], r) and M[: d - 1].abs().sum() == 0
    M = structures.TrilBottomRightDiag(a, r).to_dense() - D
    assert torch.equal(M[1:, 0], r) and M[:, 1:].abs().sum() == 0
    M = structures.TriuTopLeftDiag(a, r).to_dense() - D
    assert torch.equal(M[: d - 1, d - 1], r) and M[:, : d - 1].abs().sum() == 0
    M = structures.TriuBottomRightDiag(a, r).to_dense() - D
    assert torch.equal(M[0, 1:], r) and M[1:].abs().sum() == 0


@pytest.mark.parametrize("name", ARROWHEADS)
def test_arrowhead_d1(name):
    T = structures.get(name)
    K = T.eye(1, dtype=torch.float64)
    assert K.vec.shape == (0,)
    K = T(torch.tensor([3.0], dtype=torch.float64), torch.zeros(0, dtype=torch.float64))
    X = torch.randn(1, 2, dtype=torch.float64)
    close(K.matmat(X), 3 * X, 0)
    close(K.gram().to_dense(), torch.tensor([[9.0]]), 0)
    close(T.project_outer(X).to_dense(), (X @ X.T), 0)


# ----------------------------------------------------------- batch dims, no d x d temps
@pytest.mark.parametrize("name", ALL)
def test_leading_batch_dimensions(name):
    T = structures.get(name)
    d, b = 9, 3
    K, L = random_member(T, d, batch=(b,)), random_member(T, d, batch=(b,))
    X = torch.randn(b, d, 4, dtype=torch.float64)
    A = torch.randn(b, d, d, dtype=torch.float64)
    M = A + A.mT
    Kd, Ld = K.to_dense(), L.to_dense()
    assert Kd.shape == (b, d, d)
    close(K.matmat(X), Kd @ X, 1e-12)
    close(K.rmatmat(X), Kd.mT @ X, 1e-12)
    close(K.matmul(L).to_dense(), Kd @ Ld, 1e-12)
    close(K.trace(), torch.diagonal(Kd, dim1=-2, dim2=-1).sum(-1), 1e-12)
    close(K.add_diag(2.0).to_dense(), Kd + 2 * torch.eye(d, dtype=torch.float64), 1e-12)
    for i in range(b):
        close(K.gram().to_dense()[i], project(name, Kd[i].T @ Kd[i]), 1e-12)
        close(T.project_outer(X).to_dense()[i], project(name, X[i] @ X[i].T), 1e-12)
        close(T.from_dense(M).to_dense()[i], project(name, M[i]), 1e-12)


class _LargestResult(TorchDispatchMode):
    """Records the largest numel of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", ALL)
def test_no_d_by_d_intermediates(name):
    T = structures.get(name)
    d, n = 400, 3
    K, L = random_member(T, d), random_member(T, d)
    X = torch.randn(d, n, dtype=torch.float64)
    ops = {
        "eye": lambda: T.eye(d),
        "project_outer": lambda: T.project_outer(X),
        "project_inner": lambda: K.project_inner(X),
        "matmat": lambda: K.matmat(X),
        "rmatmat": lambda: K.rmatmat(X),
        "matmul": lambda: K.matmul(L),
        "gram": lambda: K.gram(),
        "add_diag": lambda: K.add_diag(1.0),
        "trace": lambda: K.trace(),
        "combo": lambda: (K @ L) * 0.5 + K.gram() - K.add_diag(torch.tensor(2.0)),
    }
    for op, fn in ops.items():
        with _LargestResult() as mode:
            fn()
        assert mode.largest <= 8 * d * n, f"{op} made a tensor of {mode.largest} entries"

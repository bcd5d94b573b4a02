"""The products used on the optimizer's hot path, against the dense forms.

``matmat_right`` (X K), ``rmatmat_right`` (X K^T), ``outer_matmat`` (K K^T X) and
``outer_matmat_right`` (X K K^T) for every structure, with contiguous and transposed
(non-contiguous) operands, leading batch dimensions, ``torch.func.vmap`` and
``torch.compile(fullgraph=True)``; plus the fast paths of the older operations
(``project_inner``, ``add_diag``, ``max_abs``) at sizes where they take them.
"""

from __future__ import annotations

import optree
import pytest
import torch

from singd_functional import PYTREE_NAMESPACE as NS
from singd_functional import structures
from singd_functional.precondition import natural_gradient, outer_products
from tests._dense_projection import project
from tests.test_structures import CASES, IDS, SIZES, TOL, close, random_member


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _operands(d, n, dtype):
    """X [d, n] and Z [n, d], once contiguous and once as transposed views."""
    X = torch.randn(d, n, dtype=torch.float64).to(dtype)
    Z = torch.randn(n, d, dtype=torch.float64).to(dtype)
    return [("contiguous", X, Z), ("transposed", Z.mT, X.mT)]


@pytest.mark.parametrize(("name", "d"), CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 6])
def test_hot_path_products_match_dense(name, d, dtype, n):
    T = structures.get(name)
    tol = TOL[dtype]
    K = random_member(T, d, dtype)
    Kd = K.to_dense().double()
    for _layout, X, Z in _operands(d, n, dtype):
        Xd, Zd = X.double(), Z.double()
        outs = {
            "matmat": (K.matmat(X), Kd @ Xd),
            "rmatmat": (K.rmatmat(X), Kd.T @ Xd),
            "matmat_right": (K.matmat_right(Z), Zd @ Kd),
            "rmatmat_right": (K.rmatmat_right(Z), Zd @ Kd.T),
            "outer_matmat": (K.outer_matmat(X), Kd @ Kd.T @ Xd),
            "outer_matmat_right": (K.outer_matmat_right(Z), Zd @ Kd @ Kd.T),
        }
        for op, (actual, expected) in outs.items():
            assert actual.dtype == dtype, op
            assert actual.shape == expected.shape, op
            close(actual, expected, tol)
        close(K.project_inner(X).to_dense(), project(name, Kd.T @ Xd @ Xd.T @ Kd), tol)


# sizes where the block / hierarchical / Toeplitz fast paths (no trailing block, block
# wider than X, FFT lengths that are not 2d - 1, ...) are taken
LARGE = [
    ("dense", 70),
    ("diagonal", 70),
    ("block30diagonal", 90),
    ("block30diagonal", 97),
    ("block64diagonal", 70),
    ("hierarchical15_15", 100),
    ("triltoeplitz", 257),
    ("triutoeplitz", 300),
    ("triltopleftdiag", 70),
    ("trilbottomrightdiag", 70),
    ("triutopleftdiag", 70),
    ("triubottomrightdiag", 70),
]


@pytest.mark.parametrize(("name", "d"), LARGE, ids=[f"{n}-d{d}" for n, d in LARGE])
@pytest.mark.parametrize("n", [3, 40, 130])
def test_larger_sizes_float64(name, d, n):
    T = structures.get(name)
    K, L = random_member(T, d), random_member(T, d)
    Kd, Ld = K.to_dense(), L.to_dense()
    for _layout, X, Z in _operands(d, n, torch.float64):
        close(K.matmat(X), Kd @ X, 1e-12)
        close(K.rmatmat(X), Kd.T @ X, 1e-12)
        close(K.matmat_right(Z), Z @ Kd, 1e-12)
        close(K.rmatmat_right(Z), Z @ Kd.T, 1e-12)
        close(K.outer_matmat(X), Kd @ Kd.T @ X, 1e-12)
        close(K.outer_matmat_right(Z), Z @ Kd @ Kd.T, 1e-12)
        close(K.project_inner(X).to_dense(), project(name, Kd.T @ X @ X.T @ Kd), 1e-12)
        close(T.project_outer(X).to_dense(), project(name, X @ X.T), 1e-12)
    close(K.gram().to_dense(), project(name, Kd.T @ Kd), 1e-12)
    close(K.matmul(L).to_dense(), Kd @ Ld, 1e-12)
    close(K.add_diag(0.25).to_dense(), Kd + 0.25 * torch.eye(d, dtype=torch.float64), 1e-12)
    close(K.max_abs(), Kd.abs().max(), 0)
    close(K.average_trace(), torch.trace(Kd) / d, 1e-12)


@pytest.mark.parametrize("name", list(SIZES))
def test_hot_path_products_with_leading_batch_dims(name):
    T = structures.get(name)
    d, b, n = SIZES[name][-1], 3, 4
    Ks = [random_member(T, d) for _ in range(b)]
    K = T(*(torch.stack(ts) for ts in zip(*(k.leaves for k in Ks))))
    Z = torch.randn(b, n, d, dtype=torch.float64)
    X = torch.randn(b, d, n, dtype=torch.float64)
    dense = torch.stack([k.to_dense() for k in Ks])
    close(K.matmat_right(Z), Z @ dense, 1e-12)
    close(K.rmatmat_right(Z), Z @ dense.mT, 1e-12)
    close(K.outer_matmat(X), dense @ dense.mT @ X, 1e-12)
    close(K.outer_matmat_right(Z), Z @ dense @ dense.mT, 1e-12)
    # one member times a batch of operands
    close(Ks[0].matmat_right(Z), Z @ dense[0], 1e-12)
    close(Ks[0].outer_matmat(X), dense[0] @ dense[0].T @ X, 1e-12)


@pytest.mark.parametrize("name", list(SIZES))
def test_hot_path_products_under_vmap(name):
    T = structures.get(name)
    d, b = SIZES[name][-1], 3
    members = [random_member(T, d) for _ in range(b)]
    stacked = optree.tree_map(lambda *ts: torch.stack(ts), *members, namespace=NS)
    Z = torch.randn(b, 5, d, dtype=torch.float64)
    X = torch.randn(b, d, 5, dtype=torch.float64)

    def step(K, X, Z):
        return (
            K.matmat_right(Z),
            K.rmatmat_right(Z),
            K.outer_matmat(X),
            K.outer_matmat_right(Z),
            K.add_diag(0.5).max_abs(),
        )

    out = torch.func.vmap(step)(stacked, X, Z)
    for i in range(b):
        for a, r in zip(out, step(members[i], X[i], Z[i])):
            close(a[i], r, 1e-12)


COMPILED = [
    "dense",
    "diagonal",
    "block3diagonal",
    "hierarchical3_2",
    "triltoeplitz",
    "triubottomrightdiag",
]


@pytest.mark.parametrize("name", COMPILED)
def test_hot_path_compiles_without_graph_breaks(name):
    """fullgraph=True fails on any graph break (data-dependent Python, .item(), ...)."""
    T = structures.get(name)
    d = SIZES[name][-1]
    K = random_member(T, d)
    X = torch.randn(d, 5, dtype=torch.float64)
    G = torch.randn(4, d, dtype=torch.float64)

    def step(K, X, G):
        H = K.project_inner(X)
        # `M.scale(t)` for `M * t`: dynamo cannot trace `structured * tensor` (see
        # singd_functional/factors.py)
        M = (K.matmul(K) * 0.5 + H.add_diag(1.0) - K.gram()).scale(K.average_trace())
        M = M.scale(1.0 / torch.clamp(M.max_abs(), min=1.0))
        return M.leaves, K.outer_matmat(X), K.outer_matmat_right(G), K.matmat_right(G)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for a, r in zip(optree.tree_leaves(compiled(K, X, G), namespace=NS),
                    optree.tree_leaves(step(K, X, G), namespace=NS)):
        close(a, r, 1e-12)


# dense from 64 rows on: X K comes out column-major there (Dense.matmat_right)
@pytest.mark.parametrize(("name", "d"), [*CASES, ("dense", 70)], ids=[*IDS, "dense-d70"])
def test_natural_gradient_matches_dense_and_comes_out_in_row_order(name, d):
    """precondition.natural_gradient (C C^T G K K^T, cached products and fused ones)
    equals the dense product; D is row-major (contiguous) like the weights it updates,
    where the structure's products allow (a column-major D made every later
    elementwise pass stride across rows). The Toeplitz products are not yet in row
    order and are only checked for their values."""
    T = structures.get(name)
    K, C = random_member(T, d + 1), random_member(T, d)
    G = torch.randn(d, d + 1, dtype=torch.float64)
    Kd, Cd = K.to_dense(), C.to_dense()
    expected = Cd @ Cd.mT @ G @ Kd @ Kd.mT
    for cached in ({}, outer_products(K, C)):
        D = natural_gradient(K, C, G, cached)
        close(D, expected, 1e-12)
        if "toeplitz" not in name:
            assert D.is_contiguous(), (name, bool(cached), D.stride())

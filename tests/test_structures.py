"""Property tests: every structure operation equals the same operation on to_dense().

Operands are RANDOM members of the structure (so K is not symmetric), sizes include 1,
2 and every boundary of the structure's shape. float64 to 1e-12 relative (norm-wise);
float32 and bfloat16 with loose tolerances.
"""

from __future__ import annotations

import pickle

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree

from singd_functional import PYTREE_NAMESPACE as NS
from singd_functional import structures
from singd_functional.structures import _base
from tests._dense_projection import project, storage

SIZES = {
    "dense": [1, 2, 5],
    "diagonal": [1, 2, 5],
    "block3diagonal": [1, 2, 3, 4, 6, 7],  # B-1, B, B+1, 2B, 2B+1
    "block30diagonal": [29, 30, 31],
    "block1diagonal": [1, 3],
    "hierarchical3_2": [1, 2, 3, 4, 5, 6, 9],  # K1, K1+1, K1+K2, K1+K2+1
    "hierarchical15_15": [14, 15, 16, 30, 31, 40],
    "triltoeplitz": [1, 2, 3, 8, 17],
    "triutoeplitz": [1, 2, 3, 8, 17],
    "triltopleftdiag": [1, 2, 3, 7],
    "trilbottomrightdiag": [1, 2, 3, 7],
    "triutopleftdiag": [1, 2, 3, 7],
    "triubottomrightdiag": [1, 2, 3, 7],
}
CASES = [(name, d) for name, sizes in SIZES.items() for d in sizes]
IDS = [f"{n}-d{d}" for n, d in CASES]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}


def random_member(T, d, dtype=torch.float64, gen=None):
    """A random (non-symmetric) member of structure T: random stored parameters."""
    zero = T.zeros(d, dtype=torch.float64)
    leaves = [torch.randn(leaf.shape, dtype=torch.float64, generator=gen) for leaf in zero.leaves]
    return T(*leaves).to(dtype)


def close(actual, expected, tol):
    actual, expected = actual.double(), expected.double()
    scale = max(expected.norm().item(), 1.0)
    err = (actual - expected).norm().item()
    assert err <= tol * scale, f"relative error {err / scale:.3e} > {tol:.1e}"


def symmetric(d, dtype=torch.float64):
    A = torch.randn(d, d, dtype=torch.float64)
    return (A + A.T).to(dtype)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize(("name", "d"), CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_operations_match_dense(name, d, dtype):
    T = structures.get(name)
    tol = TOL[dtype]
    K, L = random_member(T, d, dtype), random_member(T, d, dtype)
    Kd, Ld = K.to_dense().double(), L.to_dense().double()
    X = torch.randn(d, 6, dtype=torch.float64).to(dtype)
    Xd = X.double()
    M = symmetric(d, dtype)

    assert K.dim == d and K.dtype == dtype
    close(T.eye(d, dtype=dtype).to_dense(), torch.eye(d), 0)
    close(T.zeros(d, dtype=dtype).to_dense(), torch.zeros(d, d), 0)
    close(T.from_dense(M).to_dense(), project(name, M.double()), tol)
    close(T.project_outer(X).to_dense(), project(name, Xd @ Xd.T), tol)
    close(K.project_inner(X).to_dense(), project(name, Kd.T @ Xd @ Xd.T @ Kd), tol)
    close(K.gram().to_dense(), project(name, Kd.T @ Kd), tol)
    close(K.matmat(X), Kd @ Xd, tol)
    close(K.rmatmat(X), Kd.T @ Xd, tol)
    close((K @ X), Kd @ Xd, tol)
    close((K @ L).to_dense(), Kd @ Ld, tol)
    close(K.matmul(L).to_dense(), Kd @ Ld, tol)
    close((K + L).to_dense(), Kd + Ld, tol)
    close((K - L).to_dense(), Kd - Ld, tol)
    close((K * 0.5).to_dense(), Kd * 0.5, tol)
    close((torch.tensor(-2.0, dtype=dtype) * K).to_dense(), -2 * Kd, tol)
    close((K / 4).to_dense(), Kd / 4, tol)
    close((-K).to_dense(), -Kd, tol)
    close(K.add_diag(1.5).to_dense(), Kd + 1.5 * torch.eye(d, dtype=torch.float64), tol)
    close(K.add_diag(torch.tensor(0.3, dtype=dtype)).to_dense(), Kd + 0.3 * torch.eye(d, dtype=torch.float64), tol)
    close(K.trace(), torch.trace(Kd), tol)
    close(K.average_trace(), torch.trace(Kd) / d, tol)
    close(K.max_abs(), Kd.abs().max(), tol)


def dense_basis(T, d):
    """[p, d, d]: the dense form of each stored parameter's unit vector (p = storage)."""
    zero = T.zeros(d, dtype=torch.float64)
    p = zero.storage_numel()
    unit, offset, leaves = torch.eye(p, dtype=torch.float64), 0, []
    for leaf in zero.leaves:
        leaves.append(unit[:, offset : offset + leaf.numel()].reshape(p, *leaf.shape))
        offset += leaf.numel()
    return T(*leaves).to_dense()


@pytest.mark.parametrize(("name", "d"), CASES, ids=IDS)
def test_closure_and_structure_pattern(name, d):
    """Products and sums of members are members, and our result is that member.

    The dense product Kd @ Ld (computed without the structure) must lie in the span of
    the structure's dense basis, and the least-squares coordinates of it must be the
    stored parameters of the structured result ``K @ L``.
    """
    T = structures.get(name)
    K, L = random_member(T, d), random_member(T, d)
    Kd, Ld = K.to_dense(), L.to_dense()
    basis = dense_basis(T, d).reshape(-1, d * d).T  # [d*d, p]
    eye = torch.eye(d, dtype=torch.float64)
    cases = {
        "K @ L": (K @ L, Kd @ Ld),
        "K + L": (K + L, Kd + Ld),
        "K.add_diag": (K.add_diag(2.0), Kd + 2.0 * eye),
        "K.gram": (K.gram(), project(name, Kd.T @ Kd)),
    }
    for what, (R, expected) in cases.items():
        assert type(R) is T, what
        coords = torch.linalg.lstsq(basis, expected.reshape(-1, 1)).solution
        residual = (basis @ coords).reshape(d, d) - expected
        assert residual.norm() <= 1e-10 * max(expected.norm().item(), 1.0), (
            f"{what}: the dense result is not in {name}"
        )
        close(torch.cat([leaf.reshape(-1) for leaf in R.leaves]), coords.reshape(-1), 1e-10)
    # the pattern: entries that are zero for every member stay zero in products
    pattern = (random_member(T, d).to_dense() != 0) | (random_member(T, d).to_dense() != 0)
    prod = (K @ L).to_dense()
    assert torch.all(prod[~pattern] == 0)


@pytest.mark.parametrize(("name", "d"), CASES, ids=IDS)
def test_storage_formula(name, d):
    T = structures.get(name)
    assert T.eye(d).storage_numel() == storage(name, d)
    assert sum(leaf.numel() for leaf in optree.tree_leaves(T.zeros(d), namespace=NS)) == storage(name, d)


@pytest.mark.parametrize("name", list(SIZES))
def test_pytree_round_trips(name):
    T = structures.get(name)
    d = SIZES[name][-1]
    K = random_member(T, d)
    leaves, spec = optree.tree_flatten(K, namespace=NS)
    assert all(isinstance(x, torch.Tensor) for x in leaves)
    assert len(leaves) == len(K.leaves)
    back = optree.tree_unflatten(spec, leaves)
    assert type(back) is T
    close(back.to_dense(), K.to_dense(), 0)
    tleaves, tspec = torch_pytree.tree_flatten(K)
    assert len(tleaves) == len(K.leaves)
    back = torch_pytree.tree_unflatten(tleaves, tspec)
    assert type(back) is T
    close(back.to_dense(), K.to_dense(), 0)
    mapped = optree.tree_map(lambda t: 2 * t, K, namespace=NS)
    close(mapped.to_dense(), 2 * K.to_dense(), 0)
    assert type(pickle.loads(pickle.dumps(K))) is T


@pytest.mark.parametrize("name", list(SIZES))
def test_vmap_over_a_batch_of_structures(name):
    T = structures.get(name)
    d = SIZES[name][-1]
    n = 3
    members = [random_member(T, d) for _ in range(n)]
    others = [random_member(T, d) for _ in range(n)]
    stacked = optree.tree_map(lambda *ts: torch.stack(ts), *members, namespace=NS)
    stacked_o = optree.tree_map(lambda *ts: torch.stack(ts), *others, namespace=NS)
    X = torch.randn(n, d, 4, dtype=torch.float64)
    s = torch.rand(n, dtype=torch.float64)

    def step(K, L, X, s):
        H = K.project_inner(X)
        M = (K @ L) * s + H.add_diag(s) - K.gram()
        return M, K.rmatmat(X), K.matmat(X), M.average_trace(), M.max_abs()

    out = torch.func.vmap(step)(stacked, stacked_o, X, s)
    for i in range(n):
        ref = step(members[i], others[i], X[i], s[i])
        close(out[0].to(torch.float64).leaves[0][i], ref[0].leaves[0], 1e-12)
        for a, b in zip(out[0].leaves, ref[0].leaves):
            close(a[i], b, 1e-12)
        for a, b in zip(out[1:], ref[1:]):
            close(a[i], b, 1e-12)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="block\\{B\\}diagonal"):
        structures.get("blockdiagonal")
    with pytest.raises(ValueError, match="triltoeplitz"):
        structures.get("toeplitz")
    with pytest.raises(ValueError):
        structures.get("block0diagonal")


def test_parametrized_types_are_cached_and_immutable():
    assert structures.get("block30diagonal") is structures.get("block30diagonal")
    assert structures.get("hierarchical15_15") is structures.get("hierarchical15_15")
    K = structures.get("dense").eye(3)
    with pytest.raises(AttributeError):
        K.mat = torch.zeros(3, 3)


@pytest.mark.parametrize("name", list(SIZES))
def test_no_dense_storage_for_sparse_structures(name):
    """A sparse structure never stores a d x d tensor."""
    if name == "dense":
        return
    d = 64
    T = structures.get(name)
    for leaf in T.eye(d).leaves:
        assert leaf.numel() < d * d / 2


@pytest.mark.parametrize(("name", "d"), CASES, ids=IDS)
def test_outer_self_where_closed(name, d):
    """K K^T stays in dense, diagonal and block-diagonal; others say it does not."""
    T = structures.get(name)
    K = random_member(T, d)
    expected = name == "dense" or name == "diagonal" or name.startswith("block")
    assert T.closed_under_outer == expected
    if expected:
        close(K.outer_self().to_dense(), K.to_dense() @ K.to_dense().T, 1e-12)
    else:
        with pytest.raises(TypeError):
            K.outer_self()


# sizes on the blocked path of the symmetric products (its threshold, and one not a
# multiple of the number of blocks)
BLOCKED = [_base._SYMMETRIC_MIN, _base._SYMMETRIC_MIN + 7]


def _symmetric_of(X, how):
    """X^T X by ``_symmetric_product``, in place (eager), through autograd or under vmap."""
    if how == "eager":
        return _base._symmetric_product(X.mT, X)
    if how == "autograd":
        return _base._symmetric_product(X.mT, X.clone().requires_grad_()).detach()
    return torch.func.vmap(lambda Y: _base._symmetric_product(Y.mT, Y))(X[None])[0]


@pytest.mark.parametrize("n", BLOCKED)
@pytest.mark.parametrize("how", ["eager", "autograd", "vmap"])
def test_symmetric_product_equals_the_product_and_is_exactly_symmetric(n, how):
    X = torch.randn(n + 3, n, dtype=torch.float64)
    P = _symmetric_of(X, how)
    close(P, X.mT @ X, 1e-14)
    assert torch.equal(P, P.mT)


def test_symmetric_product_below_the_threshold_is_one_product():
    X = torch.randn(_base._SYMMETRIC_MIN - 1, 40, dtype=torch.float64)
    assert torch.equal(_base._symmetric_product(X.mT, X), X.mT @ X)


@pytest.mark.parametrize("d", BLOCKED)
def test_dense_symmetric_products_on_the_blocked_path(d):
    K = random_member(structures.get("dense"), d)
    D, A = K.to_dense(), symmetric(d)
    Y = torch.randn(d, d + 5, dtype=torch.float64)
    for result, expected in ((K.gram(), D.T @ D), (K.outer_self(), D @ D.T),
                             (K.project_inner_gram(A), D.T @ A @ D),
                             (type(K).project_outer(Y), Y @ Y.T)):
        close(result.to_dense(), expected, 1e-13)
        assert torch.equal(result.to_dense(), result.to_dense().mT)

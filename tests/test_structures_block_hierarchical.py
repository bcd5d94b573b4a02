"""Family-specific tests for block{B}diagonal and hierarchical{K1}_{K2}.

The generic property tests live in test_structures.py; here: the degenerate sizes where a
family collapses to dense (and must then agree with Dense exactly, including for a
non-symmetric K, which the official package's block-diagonal got wrong), empty blocks,
leading batch dimensions, purity (inputs never mutated) and the type factories.
"""

from __future__ import annotations

import pytest
import torch

from singd_functional import structures
from singd_functional.structures import BlockDiagonal, Dense, Hierarchical

DT = torch.float64


def _rand(T, d, gen=None):
    return T(*(torch.randn(leaf.shape, dtype=DT, generator=gen) for leaf in T.zeros(d).leaves))


def _close(a, b, tol=1e-12):
    scale = max(b.norm().item(), 1.0)
    assert (a - b).norm().item() <= tol * scale


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -------------------------------------------------------------- collapse to dense
COLLAPSE = [("block30diagonal", d) for d in (1, 7, 29, 30)] + [
    ("block5diagonal", 5),
    ("hierarchical15_15", 1),
    ("hierarchical15_15", 9),
    ("hierarchical15_15", 15),
    ("hierarchical3_2", 3),
]


@pytest.mark.parametrize(("name", "d"), COLLAPSE, ids=[f"{n}-d{d}" for n, d in COLLAPSE])
def test_small_sizes_equal_dense(name, d):
    """With d <= B (block) or d <= K1 (hierarchical) every member is a full matrix."""
    T = structures.get(name)
    K, L = _rand(T, d), _rand(T, d)
    Kd, Ld = Dense(K.to_dense()), Dense(L.to_dense())
    assert d == 1 or not torch.allclose(Kd.mat, Kd.mat.T)  # genuinely non-symmetric
    X = torch.randn(d, 5, dtype=DT)
    M = torch.randn(d, d, dtype=DT)
    M = M + M.T
    _close(T.from_dense(M).to_dense(), M)
    _close(T.project_outer(X).to_dense(), Dense.project_outer(X).mat)
    _close(K.project_inner(X).to_dense(), Kd.project_inner(X).mat)
    _close(K.gram().to_dense(), Kd.gram().mat)
    _close(K.matmul(L).to_dense(), Kd.matmul(Ld).mat)
    _close(K.matmat(X), Kd.matmat(X))
    _close(K.rmatmat(X), Kd.rmatmat(X))
    _close(K.add_diag(0.7).to_dense(), Kd.add_diag(0.7).mat)
    _close(K.trace(), Kd.trace())


def test_block_transpose_products_use_block_transpose():
    """The official package's bug: K^T X computed as K X and K^T K as K K^T."""
    T = structures.get("block2diagonal")
    blocks = torch.tensor([[[1.0, 2.0], [0.0, 1.0]]], dtype=DT)
    K = T(blocks, torch.zeros(0, 0, dtype=DT))
    X = torch.tensor([[0.0], [1.0]], dtype=DT)
    _close(K.rmatmat(X), torch.tensor([[0.0], [1.0]], dtype=DT))  # K X would be [2, 1]
    _close(K.gram().blocks[0], blocks[0].T @ blocks[0])
    assert not torch.allclose(K.gram().blocks[0], blocks[0] @ blocks[0].T)


# ----------------------------------------------------------------- empty pieces
EDGE = [
    ("block30diagonal", 30),  # last is 0 x 0
    ("block30diagonal", 60),
    ("block30diagonal", 12),  # no full block
    ("hierarchical3_2", 3),  # B, c, D, E empty
    ("hierarchical3_2", 5),  # n = 0: c and D empty, B = B2
    ("hierarchical3_2", 4),  # n = 0, k2 = 1
]


@pytest.mark.parametrize(("name", "d"), EDGE, ids=[f"{n}-d{d}" for n, d in EDGE])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_empty_pieces_work_in_every_op(name, d, dtype):
    T = structures.get(name)
    K, L = _rand(T, d).to(dtype), _rand(T, d).to(dtype)
    assert any(leaf.numel() == 0 for leaf in K.leaves)
    Kd, Ld = K.to_dense().double(), L.to_dense().double()
    X = torch.randn(d, 3, dtype=DT).to(dtype)
    Xd = X.double()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    assert K.dim == d and K.to_dense().shape == (d, d)
    assert T.eye(d, dtype=dtype).dtype == dtype and T.zeros(d).dim == d
    _close(K.matmat(X).double(), Kd @ Xd, tol)
    _close(K.rmatmat(X).double(), Kd.T @ Xd, tol)
    _close(K.matmul(L).to_dense().double(), Kd @ Ld, tol)
    _close(
        K.add_diag(torch.tensor(0.5, dtype=dtype)).to_dense().double(),
        Kd + 0.5 * torch.eye(d, dtype=DT),
        tol,
    )
    _close(K.trace().double(), torch.trace(Kd), tol)
    _close(K.max_abs().double(), Kd.abs().max(), tol)
    for H in (K.gram(), K.project_inner(X), T.project_outer(X), T.from_dense(Kd.to(dtype))):
        assert type(H) is T and H.dim == d
        assert [t.shape for t in H.leaves] == [t.shape for t in K.leaves]


def test_block_zero_dim():
    T = structures.get("block4diagonal")
    K = T.eye(0)
    assert K.dim == 0 and K.to_dense().shape == (0, 0)
    assert K.matmat(torch.zeros(0, 3)).shape == (0, 3)
    assert K.rmatmat(torch.zeros(0, 3)).shape == (0, 3)
    assert K.matmul(K).dim == 0 and K.gram().dim == 0 and K.trace().item() == 0


def test_storage_shapes():
    K = structures.get("block30diagonal").eye(100)
    assert K.blocks.shape == (3, 30, 30) and K.last.shape == (10, 10)
    H = structures.get("hierarchical15_15").eye(100)
    assert [tuple(t.shape) for t in H.leaves] == [(15, 15), (15, 85), (70,), (15, 70), (15, 15)]


# ---------------------------------------------------------------- batches, purity
@pytest.mark.parametrize("name", ["block3diagonal", "hierarchical3_2"])
def test_leading_batch_dims_without_vmap(name):
    """Stacked members work directly (broadcast over leading dims) and match per-member."""
    T = structures.get(name)
    d, n = 8, 3
    Ks = [_rand(T, d) for _ in range(n)]
    Ls = [_rand(T, d) for _ in range(n)]
    K = T(*(torch.stack(ts) for ts in zip(*(k.leaves for k in Ks))))
    L = T(*(torch.stack(ts) for ts in zip(*(k.leaves for k in Ls))))
    X = torch.randn(n, d, 4, dtype=DT)
    M = torch.randn(n, d, d, dtype=DT)
    M = M + M.mT
    assert K.dim == d
    _close(K.to_dense(), torch.stack([k.to_dense() for k in Ks]))
    _close(K.matmat(X), torch.stack([k.to_dense() @ x for k, x in zip(Ks, X)]))
    _close(K.rmatmat(X), torch.stack([k.to_dense().T @ x for k, x in zip(Ks, X)]))
    _close(K.matmul(L).to_dense(), torch.stack([(k @ m).to_dense() for k, m in zip(Ks, Ls)]))
    _close(K.gram().to_dense(), torch.stack([k.gram().to_dense() for k in Ks]))
    _close(K.trace(), torch.stack([k.trace() for k in Ks]))
    _close(T.project_outer(X).to_dense(), torch.stack([T.project_outer(x).to_dense() for x in X]))
    _close(T.from_dense(M).to_dense(), torch.stack([T.from_dense(m).to_dense() for m in M]))
    # an unbatched member times a batch of X
    _close(Ks[0].matmat(X), torch.stack([Ks[0].to_dense() @ x for x in X]))


@pytest.mark.parametrize("d", [2, 10])  # 2: a single (last) block, no hierarchical middle
@pytest.mark.parametrize("name", ["block3diagonal", "hierarchical3_2"])
def test_operations_do_not_touch_inputs(name, d):
    T = structures.get(name)
    K, L = _rand(T, d), _rand(T, d)
    X = torch.randn(d, 4, dtype=DT)
    M = torch.randn(d, d, dtype=DT)
    M = M + M.T
    before = [t.clone() for t in (*K.leaves, *L.leaves, X, M)]
    outs = [
        K.matmat(X), K.rmatmat(X), K.matmul(L), K.gram(), K.add_diag(1.0), K.trace(),
        K.project_inner(X), T.project_outer(X), T.from_dense(M), K.to_dense(),
    ]  # fmt: skip
    for t, b in zip((*K.leaves, *L.leaves, X, M), before):
        assert torch.equal(t, b)
    # results never alias an input, except that a structured result may share a leaf
    # it passes through unchanged (immutable pytrees: B and D of a hierarchical
    # K.add_diag); writing into every other result leaves the inputs alone
    inputs = {t.untyped_storage().data_ptr(): t for t in (*K.leaves, *L.leaves, X, M) if t.numel()}
    fresh = []
    for i, out in enumerate(outs):
        structured = isinstance(out, structures.StructuredMatrix)
        for t in out.leaves if structured else (out,):
            shared = inputs.get(t.untyped_storage().data_ptr()) if t.numel() else None
            if shared is None:
                fresh.append(t)
                continue
            assert structured, f"result {i} (a tensor) aliases an input"
            assert t.shape == shared.shape and torch.equal(t, shared), (
                f"result {i} is a view of an input"
            )
    for t in fresh:
        t.add_(1.0)
    for t, b in zip((*K.leaves, *L.leaves, X, M), before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("name", ["block3diagonal", "hierarchical3_2"])
def test_grad_through_operations(name):
    """torch.func.grad sees through the types; the gradient matches the dense one."""
    T = structures.get(name)
    d = 8
    K = _rand(T, d)
    X = torch.randn(d, 3, dtype=DT)

    def loss(K):
        return K.project_inner(X).gram().trace() + K.matmat(X).square().sum()

    g = torch.func.grad(loss)(K)
    assert type(g) is T
    # finite-difference check on a random direction
    V = _rand(T, d)
    eps = 1e-6
    fd = (loss(K + V * eps) - loss(K - V * eps)) / (2 * eps)
    an = sum((a * b).sum() for a, b in zip(g.leaves, V.leaves))
    _close(an, fd, 1e-6)


@pytest.mark.parametrize("name", ["block4diagonal", "hierarchical3_2"])
def test_products_eager_equal_joined_under_vmap_and_autograd(name):
    """The eager products that write their parts into one output (out=) equal the joined
    ones that vmap and autograd take, on both column and row forms."""
    T = structures.get(name)
    K = _rand(T, 11)
    X = torch.randn(11, 5, dtype=DT)
    for op in ("matmat", "rmatmat", "outer_matmat", "outer_matmat_right"):
        if op == "outer_matmat_right":
            X = X.mT.contiguous()
        eager = getattr(K, op)(X)
        batched = torch.func.vmap(lambda x, op=op: getattr(K, op)(x))(X[None])[0]
        assert torch.allclose(eager, batched, rtol=0, atol=1e-13)
        _close(eager, getattr(Dense(K.to_dense()), op)(X), 1e-12)
    X = X.mT.contiguous()
    Xg = X.clone().requires_grad_(True)
    K.outer_matmat(Xg).square().sum().backward()
    M = K.to_dense() @ K.to_dense().T
    _close(Xg.grad, 2 * M.T @ (M @ X), 1e-12)
    assert torch.allclose(K.matmat_right(X.T), X.T @ K.to_dense(), rtol=0, atol=1e-13)


# ------------------------------------------------------------------- factories
def test_specialize_caches_and_validates():
    assert BlockDiagonal.specialize(7) is structures.get("block7diagonal")
    assert Hierarchical.specialize(4, 6) is structures.get("hierarchical4_6")
    T = BlockDiagonal.specialize(7)
    assert T.name == "block7diagonal" and T.block_size == 7 and T._fields == ("blocks", "last")
    H = Hierarchical.specialize(4, 6)
    assert H.name == "hierarchical4_6" and (H.K1, H.K2) == (4, 6)
    assert H._fields == ("A", "B", "c", "D", "E")
    assert issubclass(T, BlockDiagonal) and issubclass(H, Hierarchical)
    for bad in (lambda: BlockDiagonal.specialize(0), lambda: Hierarchical.specialize(0, 3)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(TypeError):
        BlockDiagonal(torch.zeros(1, 1, 1), torch.zeros(0, 0))
    with pytest.raises(TypeError):
        BlockDiagonal.eye(4)
    with pytest.raises(TypeError):
        structures.get("block3diagonal").eye(4) @ structures.get("block4diagonal").eye(4)


@pytest.mark.parametrize("d", [1, 3, 5, 6, 11, 20])
def test_hierarchical_outer_cache_is_K_Kt(d):
    """Hierarchical.outer_cache(): its dense form is K K^T, its products (eager, under
    vmap, under autograd, and their transposes) equal the dense ones, it survives a
    pickle round trip, and precondition.outer_products keeps it for K and C."""
    import pickle

    from singd_functional.precondition import outer_products

    T = structures.get("hierarchical3_2")
    K = _rand(T, d)
    KKt = K.to_dense() @ K.to_dense().T
    cache = K.outer_cache()
    _close(cache.to_dense(), KKt, 1e-12)
    assert cache.dim == d and cache.dtype == DT
    X, Z = torch.randn(d, 4, dtype=DT), torch.randn(4, d, dtype=DT)
    for op in ("matmat", "rmatmat"):
        _close(getattr(cache, op)(X), KKt @ X, 1e-12)
        _close(getattr(cache, op)(Z.mT), KKt @ Z.mT, 1e-12)  # a transposed operand
    for op in ("matmat_right", "rmatmat_right"):
        _close(getattr(cache, op)(Z), Z @ KKt, 1e-12)
    batched = torch.func.vmap(cache.matmat_right)(Z[None])[0]
    assert torch.allclose(batched, cache.matmat_right(Z), rtol=0, atol=1e-13)
    Zg = Z.clone().requires_grad_(True)
    cache.matmat_right(Zg).sum().backward()
    _close(Zg.grad, torch.ones_like(Z) @ KKt, 1e-12)
    again = pickle.loads(pickle.dumps(cache))
    assert type(again) is type(cache)
    assert all(torch.equal(a, b) for a, b in zip(again.leaves, cache.leaves))
    products = outer_products(K, K)
    assert set(products) == {"K", "C"}
    _close(products["K"].to_dense(), KKt, 1e-12)

"""nn.Embedding as a Kronecker layer (singd_functional/_embedding.py).

The oracle: the same model with the embedding written as ``nn.Linear(V, d,
bias=False)`` applied to one-hot rows (weight = the table transposed) and a diagonal K.
SINGD on both must give the same parameters after several steps (float64, 1e-10), on
the pure face (hooks, fx, vmapped sweep) and on the drop-in optimizer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import singd_functional as sf

V, D, N, T_LEN = 13, 6, 4, 5
HP = dict(lr=0.05, momentum=0.9, damping=1e-3, alpha1=0.5, weight_decay=0.0, lr_cov=0.05)


class OneHotEmbedding(nn.Module):
    """``nn.Embedding`` as a Linear on one-hot rows.

    With ``padding_idx`` the padding column of the weight is frozen, as PyTorch freezes
    that row of the table: a padding token is still a one-hot row of the Linear (it
    counts in A), and a correction term with the same value cancels that column's
    gradient (the Linear's own call, and so its captured rows, are unchanged).
    """

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        self.lin = nn.Linear(emb.num_embeddings, emb.embedding_dim, bias=False).double()
        with torch.no_grad():
            self.lin.weight.copy_(emb.weight.T)
        self.padding_idx = emb.padding_idx

    def forward(self, ids):
        a = F.one_hot(ids, self.lin.in_features).to(self.lin.weight.dtype)
        z = self.lin(a)
        if self.padding_idx is not None:
            w, p = self.lin.weight[:, self.padding_idx], self.padding_idx
            z = z + a[..., p:p + 1] * (w.detach() - w)
        return z


class Model(nn.Module):
    """emb -> tanh -> Linear head over the vocabulary, per position."""

    def __init__(self, emb, tied=False):
        super().__init__()
        self.emb = emb
        self.head = nn.Linear(D, V, bias=not tied).double()
        if tied:
            self.head.weight = emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def make_pair(padding_idx=None, seed=0):
    torch.manual_seed(seed)
    emb = nn.Embedding(V, D, padding_idx=padding_idx).double()
    a, b = Model(emb), Model(OneHotEmbedding(emb))
    with torch.no_grad():
        b.head.load_state_dict(a.head.state_dict())
    return a, b


def batches(steps, seed=1, padding_idx=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, V, (N, T_LEN), generator=g)
        if padding_idx is not None:
            ids[:, -1] = padding_idx
        out.append((ids, torch.randint(0, V, (N, T_LEN), generator=g)))
    return out


def lm_loss(logits, y):
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def structures_for(model, C):
    """K diagonal for the embedding side of the oracle, (dense, C) for the head."""
    names = [i.name for i in sf.find_layers(model)]
    return {n: ("diagonal", C) if n.startswith("emb") else ("dense", "dense") for n in names}


def run_pure(model, data, C, method, kfac_approx="expand", structures=None):
    layers = sf.find_layers(model)
    tx = sf.singd(layers, structures=structures or structures_for(model, C),
                  kfac_approx=kfac_approx, **HP)
    capture = sf.make_capture(model, lm_loss, layers, method=method)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = tx.init(params)
    for ids, y in data:
        _, grads, caps = capture(params, ids, y)
        updates, state = tx.update(grads, state, params, captures=caps)
        params = sf.apply_updates(params, updates)
    return params, state


def oracle_view(params_b):
    """The oracle's parameters named and shaped as the embedding model's."""
    return {("emb.weight" if k == "emb.lin.weight" else k): (v.T if k == "emb.lin.weight" else v)
            for k, v in params_b.items()}


def assert_same(pa, pb, tol=1e-10):
    worst = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    assert worst < tol, worst


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("C", ["dense", "hierarchical2_2"])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_pure_face_equals_one_hot_linear(padding_idx, C, kfac_approx):
    data = batches(4, padding_idx=padding_idx)
    a, b = make_pair(padding_idx)
    ref, _ = run_pure(b, data, C, "hooks", kfac_approx)
    for method in ("hooks", "fx"):
        # K forced diagonal whatever the user passes: ask for dense
        got, state = run_pure(a, data, C, method, kfac_approx,
                              structures={"emb": ("dense", C), "head": ("dense", "dense")})
        assert state.factors["emb"].K.name == "diagonal"
        assert_same(got, oracle_view(ref))
    if padding_idx is not None:
        assert torch.equal(got["emb.weight"][padding_idx], a.emb.weight[padding_idx])


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_drop_in_equals_one_hot_linear(padding_idx):
    data = batches(4, padding_idx=padding_idx)
    a, b = make_pair(padding_idx)
    start_pad = None if padding_idx is None else a.emb.weight[padding_idx].clone()
    opt_a = sf.SINGD(a, structures=("dense", "hierarchical2_2"), T=1, **HP)  # K: diagonal
    opt_b = sf.SINGD(b, [{"params": [b.emb.lin.weight],
                          "structures": ("diagonal", "hierarchical2_2")},
                         {"params": list(b.head.parameters()),
                          "structures": ("dense", "hierarchical2_2")}], T=1, **HP)
    for opt, model in ((opt_a, a), (opt_b, b)):
        for ids, y in data:
            opt.zero_grad()
            lm_loss(model(ids), y).backward()
            opt.step()
    assert_same(dict(a.named_parameters()), oracle_view(dict(b.named_parameters())))
    if padding_idx is not None:
        assert torch.equal(a.emb.weight[padding_idx], start_pad)  # its row never moved


def test_statistics_never_build_one_hot_rows():
    """A 50k vocabulary: H_K from the indices (a [V] vector), no [rows, V] tensor."""
    big = nn.Sequential(nn.Embedding(50_000, 8), nn.Linear(8, 3))
    layers = sf.find_layers(big)
    ids = torch.randint(0, 50_000, (16, 32))
    y = torch.randint(0, 3, (16, 32))
    capture = sf.make_capture(big, lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten()),
                              layers)
    params = {k: v.detach() for k, v in big.named_parameters()}
    tx = sf.singd(layers)
    state = tx.init(params)
    assert state.factors["0"].K.values.shape == (50_000,)  # diagonal: V numbers, not V^2
    _, grads, caps = capture(params, ids, y)
    sizes = []

    class Sizes(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                sizes.append(out.numel())
            return out

    with Sizes():
        tx.update(grads, state, params, captures=caps)
    assert max(sizes) == 50_000 * 8  # the table; one-hot rows would be 16 * 32 * 50,000


def test_tied_head_owns_the_weight():
    """head.weight is emb.weight: one layer (the head's), one preconditioner, and its
    factors precondition the summed gradient (the same as an untied Linear head fed
    the summed gradient)."""
    torch.manual_seed(0)
    emb = nn.Embedding(V, D).double()
    model = Model(emb, tied=True)
    layers = sf.find_layers(model)
    assert [(i.name, i.kind, i.weight) for i in layers] == [("head", "linear", "emb.weight")]
    opt = sf.SINGD(model, T=1, **HP)
    assert [l.name for g in opt._groups for l in g.layers] == ["head"]
    # the pure face with the same rule gives the drop-in's numbers
    data = batches(3)
    params, _ = run_pure(Model(_copy(emb), tied=True), data, "dense", "fx",
                         structures=("dense", "dense"))
    for ids, y in data:
        opt.zero_grad()
        lm_loss(model(ids), y).backward()
        opt.step()
    assert_same(dict(model.named_parameters()), params)
    # tying in the other order (the head first in named_modules) gives the same rule
    flipped = nn.ModuleDict({"head": nn.Linear(D, V), "emb": nn.Embedding(V, D)})
    flipped["emb"].weight = flipped["head"].weight
    assert [i.name for i in sf.find_layers(flipped)] == ["head"]


def _copy(emb):
    new = nn.Embedding(V, D).double()
    with torch.no_grad():
        new.weight.copy_(emb.weight)
    return new


def test_sparse_is_refused_with_the_fix():
    model = nn.Sequential(nn.Embedding(V, D, sparse=True), nn.Linear(D, 2))
    with pytest.raises(ValueError, match="sparse=True.*sparse=False"):
        sf.find_layers(model)
    with pytest.raises(ValueError, match="sparse=True"):
        sf.SINGD(model)
    # left out of SINGD, the rest trains
    assert [i.name for i in sf.find_layers(model, params=model[1].parameters())] == ["1"]


def test_vmapped_sweep_equals_one_hot_linear_per_member():
    data = batches(3)
    a, _ = make_pair()
    layers = sf.find_layers(a)
    hp = {k: v for k, v in HP.items() if k != "lr"}
    tx = sf.singd(layers, structures=("dense", "dense"), **hp)
    lrs = (0.05, 0.01)
    sweep = sf.make_sweep(tx, sf.make_capture(a, lm_loss, layers, method="fx"),
                          sf.HyperParams(lr=torch.tensor(lrs, dtype=torch.float64)))
    state = sweep.init({k: v.detach() for k, v in a.named_parameters()})
    for ids, y in data:
        state, _ = sweep.step(state, ids, y)
    for i, lr in enumerate(lrs):
        _, b = make_pair()
        layers_b = sf.find_layers(b)
        tx_b = sf.singd(layers_b, lr=lr, structures=structures_for(b, "dense"), **hp)
        capture = sf.make_capture(b, lm_loss, layers_b, method="hooks")
        params = {k: v.detach().clone() for k, v in b.named_parameters()}
        st = tx_b.init(params)
        for ids, y in data:
            _, grads, caps = capture(params, ids, y)
            updates, st = tx_b.update(grads, st, params, captures=caps)
            params = sf.apply_updates(params, updates)
        assert_same({k: v[i] for k, v in state.params.items()}, oracle_view(params))


def test_a_param_group_without_layers_steps():
    """A group of only fallback parameters (here the table, its kind switched off)
    keeps no Riemannian momenta, and that is no reason to refuse its alpha1 (was a
    ValueError at the first step)."""
    model = Model(nn.Embedding(V, D).double())
    with sf.register_layer_kind(nn.Embedding, None):
        opt = sf.SINGD(model, [{"params": list(model.head.parameters())},
                               {"params": [model.emb.weight], "lr": 0.2}], **HP)
    before = model.emb.weight.detach().clone()
    ids, y = batches(1)[0]
    lm_loss(model(ids), y).backward()
    opt.step()
    assert not torch.equal(model.emb.weight, before)

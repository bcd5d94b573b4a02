"""The layer rule and the layer-kind registry (layers.py), on both faces.

- subclasses of the built-in kinds are layers (``NonDynamicallyQuantizableLinear``, a
  user's ``CastedLinear`` that overrides ``forward``), the most specific registered
  class wins, ``None`` opts a class out, ``nn.MultiheadAttention`` is opaque;
- the drop-in trains the same tensors as the official package on a model with a
  ``Linear`` subclass, with the same numbers (float64);
- a registered kind (GPT-2's ``Conv1D``, weight stored transposed, written here) gives
  the same parameters as the equal ``nn.Linear`` model after several SINGD steps
  (float64, 1e-10): pure face with hooks and with fx capture, and the drop-in face;
- describe() / summary() list exactly the preconditioned layers;
- the drop-in: ``opt.layers`` / ``opt.describe()``, the INFO summary, one warning for
  parameters without preconditioner and one for layers it cannot record; a kind with
  its own ``forward`` trains as on the pure face and as its ``nn.Linear`` twin.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import singd_functional as sf
from singd_functional.layers import OPAQUE, LayerInfo, kind_of_module, layer_kind, summary
from tests.models import LinearUsedByWeight


class CastedLinear(nn.Linear):
    """A Linear that casts its weight to the input's dtype (as in modded-nanoGPT)."""

    def forward(self, x):
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), b)


class Conv1D(nn.Module):
    """GPT-2's ``Conv1D``: ``y = x @ W + b`` with W stored [in, out] (transposed)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(
            *x.shape[:-1], self.nf
        )


def _describe_conv1d(name, mod, param_keys):
    weight = param_keys.get(id(mod.weight))
    if weight is None:
        return None
    d_in, d_out = mod.weight.shape
    return LayerInfo(name, "gpt2_conv1d", weight, param_keys.get(id(mod.bias)), d_in, d_out)


CONV1D_KIND = sf.LayerKind(
    "gpt2_conv1d",
    describe=_describe_conv1d,
    rows=layer_kind("linear").rows,  # rows are those of a Linear: x and dL/dy per position
    weight_matrix=lambda info, W: W.T,
    weight_from_matrix=lambda info, M, W: M.T,
)


class Block(nn.Module):
    """Two projections over a sequence, ``make`` decides the projection class."""

    def __init__(self, make):
        super().__init__()
        self.up = make(6, 8)
        self.down = make(8, 3)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x))).mean(1)


def linear(d_in, d_out):
    return nn.Linear(d_in, d_out)


def conv1d(d_in, d_out):
    return Conv1D(d_out, d_in)


def conv1d_copy_of(reference: Block) -> Block:
    """A Conv1D block holding exactly the weights of a Linear block (transposed)."""
    model = Block(conv1d).double()
    with torch.no_grad():
        for name in ("up", "down"):
            getattr(model, name).weight.copy_(getattr(reference, name).weight.T)
            getattr(model, name).bias.copy_(getattr(reference, name).bias)
    return model


def batches(steps):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (8,), generator=g)) for _ in range(steps)]


HP = dict(lr=0.1, momentum=0.9, damping=1e-3, alpha1=0.5, lr_cov=0.1)


def pure_run(model, structures, method, steps=6, T=2):
    layers = sf.find_layers(model)
    capture = sf.make_capture(model, F.cross_entropy, layers, method=method)
    tx = sf.singd(layers, structures=structures, **HP)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = tx.init(params)
    for t, (x, y) in enumerate(batches(steps)):
        _, grads, caps = capture(params, x, y)
        updates, state = tx.update(grads, state, params, captures=caps if t % T == 0 else None)
        params = sf.apply_updates(params, updates)
    return params, state, capture


def dropin_run(model, structures, steps=6, T=2, cls=None):
    cls = cls or sf.SINGD
    opt = cls(model, structures=structures, T=T, **HP)
    for x, y in batches(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}


def assert_close(ours: dict, ref: dict, rename=lambda k: k, transpose=(), tol=1e-10):
    for k, p in ref.items():
        q = ours[rename(k)]
        q = q.T if k.endswith(".weight") and k.split(".")[0] in transpose else q
        err = ((q - p).norm() / p.norm()).item()
        assert err <= tol, f"{k}: relative error {err:.2e}"


# ------------------------------------------------------------------ the layer rule
def test_subclasses_are_layers_and_the_most_specific_entry_wins():
    class MyConv(nn.Conv2d):
        pass

    model = nn.ModuleDict({
        "mha_out": nn.modules.linear.NonDynamicallyQuantizableLinear(4, 4),
        "casted": CastedLinear(4, 3),
        "conv": MyConv(2, 3, 3),
        "conv1d": type("C1", (nn.Conv1d,), {})(2, 3, 3),
    })
    kinds = {info.name: info.kind for info in sf.find_layers(model)}
    assert kinds == {"mha_out": "linear", "casted": "linear", "conv": "conv2d",
                     "conv1d": "conv1d"}

    with sf.register_layer_kind(CastedLinear, None):  # opted out: not a layer
        assert {i.name for i in sf.find_layers(model)} == {"mha_out", "conv", "conv1d"}
        assert kind_of_module(model["mha_out"]) is layer_kind("linear")  # base unaffected
    assert "casted" in {i.name for i in sf.find_layers(model)}  # the entry is restored

    class Sub(CastedLinear):
        pass

    with sf.register_layer_kind(CastedLinear, CONV1D_KIND):  # more specific than Linear
        assert kind_of_module(Sub(2, 2)) is CONV1D_KIND  # inherited by subclasses
        with sf.register_layer_kind(Sub, layer_kind("linear")):  # most specific again
            assert kind_of_module(Sub(2, 2)).name == "linear"
        assert kind_of_module(nn.Linear(2, 2)).name == "linear"


def test_registry_errors_name_the_fix():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        sf.register_layer_kind(int, CONV1D_KIND)
    with pytest.raises(TypeError, match="LayerKind or None"):
        sf.register_layer_kind(Conv1D, "linear")
    other = sf.LayerKind("linear", _describe_conv1d, layer_kind("linear").rows)
    with pytest.raises(ValueError, match="another name"):
        sf.register_layer_kind(Conv1D, other)
    with pytest.raises(KeyError, match="register_layer_kind"):
        layer_kind("no-such-kind")


def test_multihead_attention_owns_out_proj_and_ties_are_refused():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    model = nn.ModuleDict({"attn": mha, "ff": nn.Linear(8, 8)})
    # out_proj is a Linear subclass, but MHA never calls it: the attention kind owns it
    names = ["attn.in_proj", "attn.out_proj", "ff"]
    assert [i.name for i in sf.find_layers(model)] == names
    with sf.register_layer_kind(nn.MultiheadAttention, OPAQUE):  # nothing below it
        assert [i.name for i in sf.find_layers(model)] == ["ff"]

    tied = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3)})
    tied["b"].weight = tied["a"].weight
    with pytest.raises(ValueError, match="one layer per weight"):
        sf.find_layers(tied)


def test_casted_linear_matches_the_official_package():
    """The official SINGD trains Linear subclasses: same tensors, same numbers."""
    official = pytest.importorskip("singd.optim.optimizer")

    def make():
        torch.manual_seed(0)
        return nn.Sequential(CastedLinear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()

    def run(cls):
        model = make()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = cls(model, structures=("dense", "dense"), T=2, **HP)
        trained = {id(p) for g in opt.param_groups for p in g["params"]}
        names = [k for k, p in model.named_parameters() if id(p) in trained]
        for x, y in batches(6):
            opt.zero_grad()
            F.cross_entropy(model(x.mean(1)), y).backward()
            opt.step()
        return names, dict(model.named_parameters()), caught

    names_official, p_official, _ = run(official.SINGD)
    names_ours, p_ours, caught = run(sf.SINGD)
    assert names_ours == names_official == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert not [w for w in caught if "NOT be trained" in str(w.message)]
    start = dict(make().named_parameters())
    for k, p in p_official.items():
        err = ((p_ours[k] - p).norm() / p.norm()).item()
        assert err <= 1e-10, f"{k}: {err:.2e}"
        assert (p - start[k]).abs().max() > 1e-3, f"{k} did not move"


# ------------------------------------------------------------- a registered kind
@pytest.fixture
def gpt2_conv1d():
    with sf.register_layer_kind(Conv1D, CONV1D_KIND):
        yield


@pytest.mark.parametrize("structures", [("dense", "dense"), ("diagonal", "hierarchical3_2")])
@pytest.mark.parametrize("method", ["hooks", "fx"])
def test_registered_conv1d_equals_linear_pure_face(gpt2_conv1d, structures, method):
    torch.manual_seed(0)
    reference = Block(linear).double()
    model = conv1d_copy_of(reference)
    layers = sf.find_layers(model)
    assert [(i.name, i.kind, i.d_in, i.d_out) for i in layers] == [
        ("up", "gpt2_conv1d", 6, 8), ("down", "gpt2_conv1d", 8, 3)]

    ref_params, ref_state, _ = pure_run(reference, structures, "hooks")
    params, state, capture = pure_run(model, structures, method)
    assert capture.method == method
    assert_close(params, ref_params, transpose=("up", "down"))
    for name, (K, C) in ref_state.factors.items():
        assert torch.allclose(state.factors[name].K.to_dense(), K.to_dense(), atol=1e-12)
        assert torch.allclose(state.factors[name].C.to_dense(), C.to_dense(), atol=1e-12)
    start = dict(reference.named_parameters())
    assert all((ref_params[k] - p).abs().max() > 1e-3 for k, p in start.items())


def test_registered_conv1d_equals_linear_drop_in(gpt2_conv1d):
    torch.manual_seed(0)
    reference = Block(linear).double()
    model = conv1d_copy_of(reference)
    structures = ("dense", "triltoeplitz")
    ref = dropin_run(reference, structures)
    ours = dropin_run(model, structures)
    assert_close(ours, ref, transpose=("up", "down"))
    torch.manual_seed(0)  # the pure face on the same start gives the same numbers too
    pure, _, _ = pure_run(conv1d_copy_of(Block(linear).double()), structures, "hooks")
    assert_close(ours, pure)


# ---------------------------------------------------------------------- describe
def test_describe_lists_what_is_preconditioned():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Conv1d(6, 2, 3, bias=False))
    layers = sf.find_layers(model)
    table = sf.describe(layers, structures={"0": ("diagonal", "dense")})
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "kind", "d_K", "d_C", "K", "C", "parameters"]
    assert lines[2].split() == ["0", "linear", "5", "6", "diagonal", "dense", "0.weight,",
                                "0.bias"]
    assert lines[3].split() == ["2", "conv1d", "18", "2", "dense", "dense", "2.weight"]
    assert summary(layers) == "2 preconditioned layers (1 linear, 1 conv1d), 66 parameters"


# ------------------------------------------- a kind's own statistic and structure
class Lookup(nn.Module):
    """An embedding table ``z = W[ids]``: ``z = W^T onehot(ids)``, W stored [vocab, dim]."""

    def __init__(self, vocab=7, dim=4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, dim))

    def forward(self, ids):
        return self.weight[ids]


def _describe_lookup(kind_name):
    def describe(name, mod, param_keys):
        weight = param_keys.get(id(mod.weight))
        vocab, dim = mod.weight.shape
        return None if weight is None else LayerInfo(name, kind_name, weight, None, vocab, dim)

    return describe


def _one_hot_rows(info, ids, g):
    a = F.one_hot(ids, info.d_in).to(g.dtype)
    return a.reshape(ids.shape[0], -1, info.d_in), g.reshape(ids.shape[0], -1, info.d_out)


def _count_statistics(info, K, C, capture, *, kfac_approx, loss_average, grad_scale):
    """H_K from token counts (A is diagonal: no one-hot rows); H_C as the default."""
    from singd_functional.statistics import LayerStatistics, loss_scale

    assert kfac_approx == "expand" and K.name == "diagonal"
    ids = torch.cat([x.reshape(-1) for x in capture.inputs])
    counts = torch.bincount(ids, minlength=info.d_in).to(K.dtype)
    H_K = type(K)(K.values**2 * counts / ids.numel())
    g = torch.cat([g.reshape(-1, info.d_out) for g in capture.output_grads]).to(C.dtype)
    N = capture.inputs[0].shape[0]
    S = ids.numel() // N
    H_C = C.project_inner(g.mT).scale(loss_scale(loss_average, N, S) / grad_scale**2)
    return LayerStatistics(H_K, H_C)


def _lookup_kind(name, statistics):
    return sf.LayerKind(name, _describe_lookup(name), _one_hot_rows,
                        weight_matrix=lambda info, W: W.T,
                        weight_from_matrix=lambda info, M, W: M.T,
                        statistics=statistics, structures=("diagonal", None))


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.lookup = Lookup()
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.lookup(ids))).mean(1)


@pytest.mark.parametrize("method", ["hooks", "fx"])
def test_kind_statistics_and_forced_structure(method):
    """A kind's own statistic (token counts) equals the rows-based one; its K is forced."""

    def run(kind):
        with sf.register_layer_kind(Lookup, kind):
            torch.manual_seed(0)
            model = Tokens().double()
            layers = sf.find_layers(model)
            assert layers[0].kind == kind.name
            capture = sf.make_capture(model, F.cross_entropy, layers, method=method)
            tx = sf.singd(layers, structures=("dense", "dense"), **HP)
            params = {k: v.detach().clone() for k, v in model.named_parameters()}
            state = tx.init(params)
            g = torch.Generator().manual_seed(2)
            for _ in range(4):
                ids = torch.randint(0, 7, (5, 6), generator=g)
                y = torch.randint(0, 3, (5,), generator=g)
                _, grads, caps = capture(params, ids, y)
                updates, state = tx.update(grads, state, params, captures=caps)
                params = sf.apply_updates(params, updates)
            return params, state

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return _count_statistics(*args, **kwargs)

    rows_params, rows_state = run(_lookup_kind("lookup_rows", None))
    count_params, count_state = run(_lookup_kind("lookup_counts", counting))
    assert len(calls) == 4  # the kind's statistic was used, once per step
    assert rows_state.factors["lookup"].K.name == "diagonal"  # forced over ("dense", ...)
    assert rows_state.factors["lookup"].C.name == "dense"
    assert_close(count_params, rows_params, tol=1e-12)
    K_rows, K_counts = rows_state.factors["lookup"].K, count_state.factors["lookup"].K
    assert torch.allclose(K_counts.to_dense(), K_rows.to_dense(), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(K_rows.to_dense(), torch.eye(7, dtype=torch.float64))


# ------------------------------------------------------------------ the drop-in face
class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = CastedLinear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.fc(x))).mean(1)


def test_dropin_lists_what_it_preconditions_and_logs_it(caplog):
    torch.manual_seed(0)
    model = Mixed().double()
    with caplog.at_level("INFO", logger="singd_functional"), warnings.catch_warnings(
            record=True) as caught:
        warnings.simplefilter("always")
        opt = sf.SINGD(model, [{"params": list(model.fc.parameters()),
                                "structures": ("diagonal", "dense")},
                               {"params": list(model.norm.parameters())
                                + list(model.head.parameters())}])
    assert opt.layers == sf.find_layers(model)
    assert [r.getMessage() for r in caplog.records] == [
        "SINGD: 2 preconditioned layers (2 linear), 83 parameters; "
        "2 parameter tensors without preconditioner"]
    assert len(caught) == 1 and "norm.weight, norm.bias" in str(caught[0].message)
    lines = opt.describe().splitlines()
    assert lines[2].split()[:6] == ["fc", "linear", "7", "8", "diagonal", "dense"]
    assert lines[3].split()[:6] == ["head", "linear", "9", "3", "dense", "dense"]
    assert lines[4] == "not preconditioned (SGD with momentum): norm.weight, norm.bias"


def test_dropin_kind_forward_equals_pure_face_and_linear_twin():
    from tests.test_capture_containers import (
        TWIN_NAMES,
        TWO,
        TwoProjections,
        linear_twin,
        two_model,
    )

    def batches_two(steps=5):
        g = torch.Generator().manual_seed(3)
        return [(torch.randn(6, 4, 5, generator=g, dtype=torch.float64),
                 torch.randint(0, 3, (6,), generator=g)) for _ in range(steps)]

    def dropin(model):
        opt = sf.SINGD(model, T=2, structures=("dense", "diagonal"), **HP)
        for x, y in batches_two():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return opt, {k: v.detach() for k, v in model.named_parameters()}

    twin_opt, twin = dropin(linear_twin(two_model()))
    with sf.register_layer_kind(TwoProjections, TWO):
        model = two_model()
        opt, ours = dropin(model)
        assert [i.name for i in opt.layers] == ["core.inner", "core.outer"]
        assert len(model.core._forward_hooks) == 1  # one hook for the module's two layers
        clone = copy.deepcopy(model)  # a copy's hook is inert
        x = torch.randn(2, 4, 5, dtype=torch.float64)
        assert torch.equal(clone(x), model(x))

        layers = sf.find_layers(model := two_model())
        capture = sf.make_capture(model, F.cross_entropy, layers, method="hooks")
        tx = sf.singd(layers, structures=("dense", "diagonal"), **HP)
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        state = tx.init(params)
        for t, (x, y) in enumerate(batches_two()):
            _, grads, caps = capture(params, x, y)
            updates, state = tx.update(grads, state, params,
                                       captures=caps if t % 2 == 0 else None)
            params = sf.apply_updates(params, updates)
    assert_close(ours, params)
    start = dict(two_model().named_parameters())
    for k, name in TWIN_NAMES.items():
        err = ((ours[name] - twin[k]).norm() / twin[k].norm()).item()
        assert err <= 1e-10, f"{name}: {err:.2e}"
        assert (ours[name] - start[name]).abs().max() > 1e-3


def test_dropin_warns_once_for_a_layer_it_cannot_record():
    model = LinearUsedByWeight()
    opt = sf.SINGD(model, T=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(torch.randn(4, 3)), torch.tensor([0, 1, 1, 0])).backward()
            opt.step()
    ours = [str(w.message) for w in caught if "SINGD" in str(w.message)]
    assert len(ours) == 1 and "layers ['b'] have gradients but recorded no statistics" in ours[0]


def test_dropin_refuses_a_kind_split_across_groups():
    from tests.test_capture_containers import TWO, TwoProjections, two_model

    with sf.register_layer_kind(TwoProjections, TWO):
        model = two_model()
        core = model.core
        with pytest.raises(ValueError, match=r"layer 'core.inner' is split across param groups "
                                             r"\(core.w_in in group 0, core.b_in in group 1\)"):
            sf.SINGD(model, [{"params": [core.w_in, core.w_out]}, {"params": [core.b_in]}])

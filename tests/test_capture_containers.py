"""The fx capture sees through containers, checks its coverage, and runs kinds' forwards.

- a GPT built from ``nn.TransformerEncoderLayer`` blocks: fx traces each block's
  attention and ``linear1``/``linear2`` (fx's default leaf rule stopped at the block), and its
  capture equals the hook capture exactly; a compiled step (``fullgraph=True``) equals
  the eager step;
- stock ``nn.TransformerEncoder`` and ``nn.TransformerDecoder`` are traced the same;
  stock ``nn.Transformer`` cannot be: ``method="fx"`` raises a clear error, ``"auto"``
  warns once, runs hooks, and its captures are exact;
- a kind with its own ``forward`` (two raw projection weights inside one module call)
  is captured through its taps with hooks, with fx and compiled, and trains exactly
  like the equal ``nn.Linear`` model (float64, 1e-10);
- error messages never advise dropping a layer that is called.

The attention inside the blocks is the MultiheadAttention kind's (its own tests are in
tests/test_layers_attention.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import singd_functional as sf
from singd_functional.layers import LayerInfo
from tests.models import LinearUsedByWeight

VOCAB, WIDTH, CONTEXT = 11, 16, 6


class GPT(nn.Module):
    """Character GPT of ``nn.TransformerEncoderLayer`` blocks with a causal mask."""

    def __init__(self, blocks=2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(WIDTH, 2, 2 * WIDTH, dropout=0.0, batch_first=True)
            for _ in range(blocks)
        )
        self.head = nn.Linear(WIDTH, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT))

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h, src_mask=self.mask, is_causal=True)
        return self.head(h)


class StockEncoder(nn.Module):
    """The same through stock ``nn.TransformerEncoder``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, 2, 2 * WIDTH, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT))

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens), mask=self.mask, is_causal=True))


class StockDecoder(nn.Module):
    """Stock ``nn.TransformerDecoder`` over a fixed memory, sequence-first."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerDecoderLayer(WIDTH, 2, 2 * WIDTH, dropout=0.0, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, 2)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.memory = nn.Parameter(torch.randn(3, 1, WIDTH))
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT))

    def forward(self, tokens):
        h = self.embed(tokens).transpose(0, 1)  # [S, N, d]
        memory = self.memory.expand(-1, tokens.shape[0], -1)
        out = self.decoder(h, memory, tgt_mask=self.mask, tgt_is_causal=True)
        return self.head(out.transpose(0, 1))


class FullTransformer(nn.Module):
    """Stock ``nn.Transformer``: its forward branches on tensor sizes (fx cannot trace)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.transformer = nn.Transformer(WIDTH, 2, 1, 1, 2 * WIDTH, dropout=0.0,
                                          batch_first=True)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens):
        h = self.embed(tokens)
        return self.head(self.transformer(h, h))


def lm_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def tokens(t, n=3):
    g = torch.Generator().manual_seed(t)
    x = torch.randint(0, VOCAB, (n, CONTEXT + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def assert_same_capture(a, b):
    """Two (loss, grads, captures) triples are identical."""
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k
    assert a[2].keys() == b[2].keys()
    for name, cap in a[2].items():
        for u, v in zip(cap.inputs + cap.output_grads, b[2][name].inputs + b[2][name].output_grads):
            assert torch.equal(u, v), name


def block_layers(blocks, cross=False):
    """The layers of transformer blocks: their attention projections, then linear1/2."""
    attention = ["self_attn", "multihead_attn"] if cross else ["self_attn"]
    return [name for b in blocks for name in (
        *(f"{b}.{a}.{p}" for a in attention for p in ("in_proj", "out_proj")),
        f"{b}.linear1", f"{b}.linear2")]


MODELS = {
    "blocks": (GPT, ["embed", *block_layers(["blocks.0", "blocks.1"])]),
    "encoder": (StockEncoder, ["embed", *block_layers(["encoder.layers.0", "encoder.layers.1"])]),
    "decoder": (StockDecoder,
                ["embed", *block_layers(["decoder.layers.0", "decoder.layers.1"], cross=True)]),
}


@pytest.mark.parametrize("case", list(MODELS))
def test_fx_traces_through_transformer_modules(case):
    make, feed_forward = MODELS[case]
    torch.manual_seed(0)
    model = make().double()
    layers = sf.find_layers(model)
    names = [info.name for info in layers]
    assert names == [*feed_forward, "head"]
    fx = sf.make_capture(model, lm_loss, layers, method="fx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto traces it: no fallback warning
        auto = sf.make_capture(model, lm_loss, layers)
    assert fx.method == auto.method == "fx"
    hooks = sf.make_capture(model, lm_loss, layers, method="hooks")
    assert hooks.method == "hooks"
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = tokens(0)
    a, b = fx(params, x, y), hooks(params, x, y)
    assert a[2].keys() == set(names)
    assert_same_capture(a, b)
    # the capture's gradients are autograd's
    lm_loss(model(x), y).backward()
    for k, p in model.named_parameters():
        assert torch.allclose(a[1][k], p.grad, rtol=1e-12, atol=1e-14), k


def test_untraceable_transformer_falls_back_with_one_warning():
    torch.manual_seed(0)
    model = FullTransformer().double()
    layers = sf.find_layers(model)
    # the embedding, the encoder block (2 projections, 2 feed-forward), the decoder block
    # (4 projections, 2 feed-forward), the head
    assert len(layers) == 1 + 4 + 6 + 1
    with pytest.raises(ValueError, match=r"method='fx': torch.fx could not trace "
                                         r"FullTransformer .*Use method='hooks'"):
        sf.make_capture(model, lm_loss, layers, method="fx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        capture = sf.make_capture(model, lm_loss, layers)
    assert len(caught) == 1 and "using forward hooks" in str(caught[0].message)
    assert capture.method == "hooks"
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = tokens(1)
    loss, grads, caps = capture(params, x, y)
    assert caps.keys() == {i.name for i in layers}
    lm_loss(model(x), y).backward()
    for k, p in model.named_parameters():
        assert torch.allclose(grads[k], p.grad, rtol=1e-12, atol=1e-14), k


def test_no_error_advises_dropping_a_called_layer():
    """A layer whose weight is used without calling its module is named, with the fix."""

    model = LinearUsedByWeight()
    layers = sf.find_layers(model)
    with pytest.raises(ValueError, match=r"never calls the modules of layers \['b'\].*"
                                         r"F.linear\(x, m.weight\), is no layer call"):
        sf.make_capture(model, lm_loss, layers, method="fx")
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    capture = sf.make_capture(model, F.cross_entropy, layers, method="hooks")
    params = dict(model.named_parameters())
    _, grads, caps = capture(params, x, y)
    tx = sf.singd(layers)
    with pytest.raises(ValueError, match=r"missing layers \['b'\]: the forward pass did not "
                                         r"call their modules") as err:
        tx.update(grads, tx.init(params), params, captures=caps)
    assert "Drop unused" not in str(err.value)


# ------------------------------------------------------------ a kind with forward
class TwoProjections(nn.Module):
    """Raw weights used inside one call: ``out = W_o tanh(W_i x + b_i)``."""

    def __init__(self):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(7, 5) * 0.4)
        self.b_in = nn.Parameter(torch.randn(7) * 0.1)
        self.w_out = nn.Parameter(torch.randn(3, 7) * 0.4)

    def forward(self, x):
        return F.linear(torch.tanh(F.linear(x, self.w_in, self.b_in)), self.w_out)


def _describe_two(name, mod, keys):
    if id(mod.w_in) not in keys or id(mod.w_out) not in keys:
        return None
    return (LayerInfo(f"{name}.inner", "two_projections", keys[id(mod.w_in)],
                      keys.get(id(mod.b_in)), 5, 7, module=name),
            LayerInfo(f"{name}.outer", "two_projections", keys[id(mod.w_out)], None, 7, 3,
                      module=name))


def _forward_two(mod, infos, tap, args, kwargs):
    (x,) = args
    inner, outer = (info.name for info in infos)
    h = tap(inner, x, F.linear(x, mod.w_in, mod.b_in))
    a = torch.tanh(h)
    return tap(outer, a, F.linear(a, mod.w_out))


TWO = sf.LayerKind("two_projections", _describe_two, sf.layers.layer_kind("linear").rows,
                   forward=_forward_two)


class Wrapped(nn.Module):
    def __init__(self, core):
        super().__init__()
        self.core = core

    def forward(self, x):
        return self.core(x).mean(1)


def two_model():
    torch.manual_seed(0)
    return Wrapped(TwoProjections()).double()


def linear_twin(model):
    """The equal model of nn.Linear layers (same weights)."""
    core = model.core
    twin = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3, bias=False)).double()
    with torch.no_grad():
        twin[0].weight.copy_(core.w_in)
        twin[0].bias.copy_(core.b_in)
        twin[2].weight.copy_(core.w_out)
    return Wrapped(twin)


TWIN_NAMES = {"core.0.weight": "core.w_in", "core.0.bias": "core.b_in",
              "core.2.weight": "core.w_out"}


def train(model, method, steps=5, compiled=False):
    layers = sf.find_layers(model)
    capture = sf.make_capture(model, F.cross_entropy, layers, method=method)
    tx = sf.singd(layers, lr=0.1, lr_cov=0.1, structures=("dense", "diagonal"))
    step = sf.make_step(tx, capture)
    if compiled:
        step = [torch.compile(f, fullgraph=True, backend="eager") for f in step]
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = tx.init(params)
    g = torch.Generator().manual_seed(3)
    for t in range(steps):
        x = torch.randn(6, 4, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (6,), generator=g)
        params, state, _ = step[t % 2](params, state, x, y)
    return params, layers, capture


@pytest.fixture
def two_kind():
    with sf.register_layer_kind(TwoProjections, TWO):
        yield


@pytest.mark.parametrize("method", ["hooks", "fx"])
def test_kind_forward_taps_equal_linear_layers(two_kind, method):
    model = two_model()
    ref, ref_layers, _ = train(linear_twin(model), "hooks")
    params, layers, capture = train(model, method)
    assert [(i.name, i.site, i.d_K, i.d_C) for i in layers] == [
        ("core.inner", "core", 6, 7), ("core.outer", "core", 7, 3)]
    assert capture.method == method
    assert [i.d_K for i in ref_layers] == [6, 7]
    start = dict(two_model().named_parameters())
    for k, name in TWIN_NAMES.items():
        err = ((params[name] - ref[k]).norm() / ref[k].norm()).item()
        assert err <= 1e-10, f"{name}: {err:.2e}"
        assert (params[name] - start[name]).abs().max() > 1e-3
    # nothing is left behind on the module
    assert "forward" not in model.core.__dict__ and not model.core._forward_hooks


def test_kind_forward_compiles_fullgraph(two_kind):
    torch._dynamo.reset()
    model = two_model()
    eager, _, _ = train(model, "fx")
    compiled, _, capture = train(model, "auto", compiled=True)
    assert capture.method == "fx"
    for k, p in eager.items():
        assert torch.allclose(compiled[k], p, rtol=1e-10, atol=1e-12), k


def test_compiled_gpt_step_fullgraph_equals_eager():
    """The blocks' feed-forward layers are captured inside one compiled graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(blocks=1).double()
    layers = sf.find_layers(model)
    capture = sf.make_capture(model, lm_loss, layers)  # auto: fx under compile
    tx = sf.singd(layers, lr=0.05, lr_cov=0.05, structures=("dense", "diagonal"))
    eager = sf.make_step(tx, capture)
    compiled = [torch.compile(f, fullgraph=True, backend="eager") for f in eager]
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    p_e, s_e, p_c, s_c = params, tx.init(params), params, tx.init(params)
    for t in range(3):
        x, y = tokens(t)
        p_e, s_e, _ = eager[t % 2](p_e, s_e, x, y)
        p_c, s_c, _ = compiled[t % 2](p_c, s_c, x, y)
    for k, p in p_e.items():
        assert torch.allclose(p_c[k], p, rtol=1e-10, atol=1e-12), k
    for info in layers:
        K, K_c = s_e.factors[info.name].K, s_c.factors[info.name].K
        assert not torch.equal(K.to_dense(), torch.eye(info.d_K, dtype=K.dtype))
        assert torch.allclose(K_c.to_dense(), K.to_dense(), rtol=1e-10, atol=1e-12)


def test_kind_forward_taps_under_vmap(two_kind):
    """Two parameter sets vmapped through the tapped forward equal a loop over them."""
    model = two_model()
    layers = sf.find_layers(model)
    capture = sf.make_capture(model, F.cross_entropy, layers, method="hooks")
    base = {k: v.detach() for k, v in model.named_parameters()}
    stacked = {k: torch.stack([v, v * 1.5]) for k, v in base.items()}
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    loss, grads, caps = torch.func.vmap(lambda p: capture(p, x, y))(stacked)
    for i in range(2):
        one = capture({k: v[i] for k, v in stacked.items()}, x, y)
        assert torch.allclose(loss[i], one[0], rtol=1e-12)
        for name in ("core.inner", "core.outer"):
            for u, v in zip(caps[name].output_grads, one[2][name].output_grads):
                assert torch.allclose(u[i], v, rtol=1e-12, atol=1e-15), name
        assert torch.allclose(grads["core.w_in"][i], one[1]["core.w_in"], rtol=1e-12)


@pytest.mark.parametrize("case", ["blocks", "encoder"])
def test_transformer_both_faces_same_numbers(case):
    """Drop-in (hooks) and pure core (fx, and hooks) train a stock-block GPT alike."""
    make, _ = MODELS[case]
    hp = dict(lr=0.05, momentum=0.9, damping=1e-3, alpha1=0.5, lr_cov=0.05)
    structures = ("dense", "hierarchical3_2")

    def fresh():
        torch.manual_seed(0)
        return make().double()

    model = fresh()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the parameters without preconditioner are named
        opt = sf.SINGD(model, model.parameters(), T=2, structures=structures, **hp)
    assert opt.layers == sf.find_layers(model)
    for t in range(4):
        x, y = tokens(t)
        opt.zero_grad()
        lm_loss(model(x), y).backward()
        opt.step()
    dropin = dict(model.named_parameters())

    for method in ("fx", "hooks"):
        ref = fresh()
        layers = sf.find_layers(ref)
        capture = sf.make_capture(ref, lm_loss, layers, method=method)
        tx = sf.singd(layers, structures=structures, **hp)
        params = {k: v.detach().clone() for k, v in ref.named_parameters()}
        state = tx.init(params)
        for t in range(4):
            x, y = tokens(t)
            _, grads, caps = capture(params, x, y)
            updates, state = tx.update(grads, state, params, captures=caps if t % 2 == 0 else None)
            params = sf.apply_updates(params, updates)
        start = dict(fresh().named_parameters())
        for k, p in params.items():
            err = ((dropin[k] - p).norm() / p.norm()).item()
            assert err <= 1e-10, f"{method} {k}: {err:.2e}"
        assert all((params[i.weight] - start[i.weight]).abs().max() > 1e-3 for i in layers)


def test_transformer_capture_under_vmap():
    """Two parameter sets of the block GPT, vmapped (hooks and fx), equal a loop."""
    torch.manual_seed(0)
    model = GPT(blocks=1).double()
    layers = sf.find_layers(model)
    base = {k: v.detach() for k, v in model.named_parameters()}
    stacked = {k: torch.stack([v, v * 0.8]) for k, v in base.items()}
    x, y = tokens(4)
    for method in ("hooks", "fx"):
        capture = sf.make_capture(model, lm_loss, layers, method=method)
        loss, grads, caps = torch.func.vmap(lambda p, c=capture: c(p, x, y))(stacked)
        for i in range(2):
            one = capture({k: v[i] for k, v in stacked.items()}, x, y)
            assert torch.allclose(loss[i], one[0], rtol=1e-12), method
            for k in base:
                assert torch.allclose(grads[k][i], one[1][k], rtol=1e-10, atol=1e-13), k
            for info in layers:
                for u, v in zip(caps[info.name].output_grads, one[2][info.name].output_grads):
                    assert torch.allclose(u[i], v, rtol=1e-10, atol=1e-14), info.name

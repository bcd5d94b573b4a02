"""nn.MultiheadAttention as Kronecker layers (singd_functional/_attention.py).

The oracle: the same attention written with plain ``nn.Linear`` layers holding the
same weights (q/k/v as ONE ``Linear(E, 3E)`` when packed, called once per distinct
input, its unused output columns dropped). SINGD on both models must give the same
parameters after several steps (float64, 1e-10): dense and a structured family, on
the pure face (hooks, fx, vmapped sweep) and on the drop-in optimizer.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import singd_functional as sf
from singd_functional._attention import attention_forward

E, H, N, L, S = 8, 2, 3, 4, 5
HP = dict(lr=0.05, momentum=0.9, damping=1e-3, alpha1=0.5, weight_decay=1e-3, lr_cov=0.05)
STRUCTURES = {"dense": ("dense", "dense"), "hierarchical": ("hierarchical2_3", "block4diagonal")}


def _additive(mask, dtype):
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


class PlainAttention(nn.Module):
    """Multi-head attention from plain nn.Linear layers, with the weights of ``mha``."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.batch_first, self.heads = mha.batch_first, mha.num_heads
        self.packed = mha._qkv_same_embed_dim
        bias = mha.in_proj_bias is not None
        with torch.no_grad():
            if self.packed:
                self.in_proj = nn.Linear(E, 3 * E, bias=bias).double()
                self.in_proj.weight.copy_(mha.in_proj_weight)
                if bias:
                    self.in_proj.bias.copy_(mha.in_proj_bias)
            else:
                for slot, d in (("q", E), ("k", mha.kdim), ("v", mha.vdim)):
                    lin = nn.Linear(d, E, bias=False).double()
                    lin.weight.copy_(getattr(mha, f"{slot}_proj_weight"))
                    setattr(self, f"{slot}_proj", lin)
                self.in_proj_bias = nn.Parameter(mha.in_proj_bias.detach().clone())
            self.out_proj = nn.Linear(E, E).double()
            self.out_proj.weight.copy_(mha.out_proj.weight)
            self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # the oracle decides the calls on the shapes the model passes, as MHA on identity
        same_kv, same_qk = self._same
        if self.packed and same_kv and same_qk:
            q, k, v = self.in_proj(query).chunk(3, -1)
        elif self.packed and same_kv:
            q = self.in_proj(query)[..., :E]
            k, v = self.in_proj(key)[..., E:].chunk(2, -1)
        elif self.packed:
            q, k, v = (self.in_proj(x)[..., i * E:(i + 1) * E]
                       for i, x in enumerate((query, key, value)))
        else:
            b = self.in_proj_bias
            q, k, v = (self.q_proj(query) + b[:E], self.k_proj(key) + b[E:2 * E],
                       self.v_proj(value) + b[2 * E:])
        n, lq, lk, hd = q.shape[0], q.shape[1], k.shape[1], E // self.heads
        q, k, v = (t.reshape(n, -1, self.heads, hd).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
        if attn_mask is not None:
            mask = _additive(attn_mask, q.dtype)
            scores = scores + (mask if mask.dim() == 2 else mask.reshape(n, self.heads, lq, lk))
        if key_padding_mask is not None:
            scores = scores + _additive(key_padding_mask, q.dtype).reshape(n, 1, 1, lk)
        weights = torch.softmax(scores, -1)
        out = self.out_proj((weights @ v).transpose(1, 2).reshape(n, lq, E))
        if unbatched:
            return out.squeeze(0), weights.mean(1).squeeze(0) if need_weights else None
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights


class Net(nn.Module):
    """``attn`` on (x, m1, m2) as ``pattern`` says, then a mean and a Linear head."""

    def __init__(self, attn, pattern="self", batch_first=True, unbatched=False, **kwargs):
        super().__init__()
        self.attn, self.head, self.pattern = attn, nn.Linear(E, 3).double(), pattern
        self.seq = 0 if unbatched or not batch_first else 1
        self.options = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
        self.masks = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        for k in self.masks:
            self.register_buffer(k, kwargs[k])
        if isinstance(attn, PlainAttention):
            attn._same = (pattern != "three", pattern == "self")

    def forward(self, x, m1, m2):
        q, k, v = {"self": (x, x, x), "kv": (x, m1, m1), "three": (x, m1, m2)}[self.pattern]
        masks = {name: getattr(self, name) for name in self.masks}
        h, w = self.attn(q, k, v, **masks, **self.options)
        out = self.head(h.mean(self.seq))
        if self.options.get("need_weights", True):
            out = out + w.mean()  # the weights feed the loss too
        return out


def make_pair(pattern="self", batch_first=True, kdim=None, bias=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=kdim,
                                bias=bias).double()
    plain = PlainAttention(mha)
    unbatched = kwargs.pop("unbatched", False)
    a = Net(mha, pattern, batch_first, unbatched, **kwargs)
    b = Net(plain, pattern, batch_first, unbatched, **kwargs)
    with torch.no_grad():
        b.head.load_state_dict(a.head.state_dict())
    return a, b


def key_map(a: nn.Module, b: nn.Module) -> dict[str, str]:
    """The oracle's name of each MHA parameter (raw tensors become Linear weights)."""
    keys_b = dict(b.named_parameters())
    out = {}
    for k in dict(a.named_parameters()):
        for raw in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                    "in_proj_bias"):
            if k.endswith(raw) and k not in keys_b:
                k_b = k[: -len(raw)] + raw.replace("_weight", ".weight").replace("_bias", ".bias")
                break
        else:
            k_b = k
        assert k_b in keys_b, (k, sorted(keys_b))
        out[k] = k_b
    return out


def batches(steps, batch_first=True, kdim=None, unbatched=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        def t(length, d):
            if unbatched:
                return torch.randn(length, d, generator=g, dtype=torch.float64)
            shape = (N, length, d) if batch_first else (length, N, d)
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        y = torch.randint(0, 3, (1 if unbatched else N,), generator=g)
        x, m1, m2 = t(L, E), t(S, kdim or E), t(S, kdim or E)
        out.append((x, m1, m2, y.squeeze(0) if unbatched else y))
    return out


def loss_fn(out, y):
    return F.cross_entropy(out, y)


def run_pure(model, data, structures, method):
    layers = sf.find_layers(model)
    tx = sf.singd(layers, structures=structures, **HP)
    capture = sf.make_capture(model, loss_fn, layers, method=method)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = tx.init(params)
    for x, m1, m2, y in data:
        _, grads, caps = capture(params, x, m1, m2, y)
        updates, state = tx.update(grads, state, params, captures=caps)
        params = sf.apply_updates(params, updates)
    return params, layers


def run_drop_in(model, data, structures):
    opt = sf.SINGD(model, list(model.parameters()), structures=structures, T=1, **HP)
    for x, m1, m2, y in data:
        opt.zero_grad()
        loss_fn(model(x, m1, m2), y).backward()
        opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}


def assert_same(pa, pb, mapping, tol=1e-10):
    worst = max((pa[k] - pb[mapping[k]]).abs().max().item() for k in pa)
    assert worst < tol, worst
    return worst


CASES = {
    # name: (pattern, make_pair options, batches options)
    "self-causal": ("self", dict(need_weights=False, is_causal=True,
                                 attn_mask=nn.Transformer.generate_square_subsequent_mask(
                                     L, dtype=torch.float64)), {}),
    "self-weights-seqfirst": ("self", dict(batch_first=False, need_weights=True), {}),
    "kv-padding-seqfirst": ("kv", dict(batch_first=False, need_weights=True,
                                       key_padding_mask=torch.tensor([[False] * 4 + [True]] * N)),
                            {}),
    "kv-boolmask-noweights": ("kv", dict(need_weights=False,
                                         attn_mask=torch.eye(L, S, dtype=torch.bool)), {}),
    "three-floatmask": ("three", dict(need_weights=True, average_attn_weights=False,
                                      attn_mask=torch.randn(N * H, L, S, dtype=torch.float64)),
                        {}),
    "separate-kdim": ("three", dict(kdim=6, need_weights=False), dict(kdim=6)),
    "unbatched-kv": ("kv", dict(unbatched=True, need_weights=True), dict(unbatched=True)),
}


def _case(name):
    pattern, options, data_options = CASES[name]
    options = dict(options)
    data_options = {"batch_first": options.get("batch_first", True), **data_options}
    return pattern, options, data_options


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_equal_torch(name):
    """The kind's forward is nn.MultiheadAttention's (outputs, weights, gradients)."""
    pattern, options, data_options = _case(name)
    model, _ = make_pair(pattern, **options)
    x, m1, m2, y = batches(1, **data_options)[0]
    ref = loss_fn(model(x, m1, m2), y)
    ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    def through_kind(q, k, v, **kw):
        return attention_forward(model.attn, q, k, v, **kw)

    plain = model.attn.forward
    model.attn.forward = through_kind
    try:
        loss = loss_fn(model(x, m1, m2), y)
    finally:
        model.attn.forward = plain
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-12
    for k, p in model.named_parameters():
        assert (p.grad - ref_grads[k]).abs().max() < 1e-12, k


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("name", list(CASES))
def test_pure_face_equals_plain_linear_oracle(name, structure):
    """hooks and fx captures: the same parameters as the plain-Linear model after 4 steps."""
    pattern, options, data_options = _case(name)
    data = batches(4, **data_options)
    a, b = make_pair(pattern, **options)
    mapping = key_map(a, b)
    ref, oracle_layers = run_pure(b, data, STRUCTURES[structure], "hooks")
    for method in ("hooks", "fx"):
        params, layers = run_pure(a, data, STRUCTURES[structure], method)
        assert [i.name for i in layers] == [i.name for i in oracle_layers]
        assert_same(params, ref, mapping)


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("name", ["self-causal", "kv-padding-seqfirst", "three-floatmask",
                                  "separate-kdim"])
def test_drop_in_equals_plain_linear_oracle(name, structure):
    pattern, options, data_options = _case(name)
    data = batches(4, **data_options)
    a, b = make_pair(pattern, **options)
    mapping = key_map(a, b)
    ref = run_drop_in(b, data, STRUCTURES[structure])
    got = run_drop_in(a, data, STRUCTURES[structure])
    assert_same(got, ref, mapping)


def test_vmapped_sweep_equals_the_oracle_per_member():
    """Two learning rates in one vmapped step (fx capture) vs the oracle run per member."""
    pattern, options, data_options = _case("kv-padding-seqfirst")
    data = batches(3, **data_options)
    a, b = make_pair(pattern, **options)
    mapping = key_map(a, b)
    layers = sf.find_layers(a)
    hp = {k: v for k, v in HP.items() if k != "lr"}
    tx = sf.singd(layers, **hp)
    sweep = sf.make_sweep(tx, sf.make_capture(a, loss_fn, layers, method="fx"),
                          sf.HyperParams(lr=torch.tensor([0.05, 0.02], dtype=torch.float64)))
    state = sweep.init({k: v.detach() for k, v in a.named_parameters()})
    for x, m1, m2, y in data:
        state, _ = sweep.step(state, x, m1, m2, y)
    for i, lr in enumerate((0.05, 0.02)):
        _, b = make_pair(pattern, **options)
        layers_b = sf.find_layers(b)
        tx_b = sf.singd(layers_b, lr=lr, **hp)
        capture = sf.make_capture(b, loss_fn, layers_b, method="hooks")
        params = {k: v.detach().clone() for k, v in b.named_parameters()}
        st = tx_b.init(params)
        for x, m1, m2, y in data:
            _, grads, caps = capture(params, x, m1, m2, y)
            updates, st = tx_b.update(grads, st, params, captures=caps)
            params = sf.apply_updates(params, updates)
        assert_same({k: v[i] for k, v in state.params.items()}, params, mapping)


def test_cross_attention_in_proj_rows_pool_the_distinct_inputs():
    """Key is value: one tap with the query's and the key's positions, 3E output
    columns, zero where that input does not feed (as the plain Linear's two calls)."""
    a, b = make_pair("kv")
    x, m1, m2, y = batches(1)[0]
    params = {k: v.detach() for k, v in a.named_parameters()}
    caps = sf.make_capture(a, loss_fn, sf.find_layers(a), method="fx")(params, x, m1, m2, y)[2]
    cap = caps["attn.in_proj"]
    assert [tuple(t.shape) for t in cap.inputs] == [(N, L + S, E)]
    g = cap.output_grads[0]
    assert g.shape == (N, L + S, 3 * E)
    assert (g[:, :L, E:] == 0).all() and (g[:, L:, :E] == 0).all()
    assert g[:, :L, :E].abs().sum() > 0 and g[:, L:, E:].abs().sum() > 0
    params_b = {k: v.detach() for k, v in b.named_parameters()}
    ref = sf.make_capture(b, loss_fn, sf.find_layers(b), method="hooks")(
        params_b, x, m1, m2, y)[2]["attn.in_proj"]
    assert torch.allclose(cap.inputs[0], torch.cat(ref.inputs, 1), atol=0)
    assert torch.allclose(g, torch.cat(ref.output_grads, 1), atol=1e-14)


@pytest.mark.parametrize("option", ["add_bias_kv", "add_zero_attn"])
def test_unsupported_options_are_refused_with_the_fix(option):
    model = nn.Sequential(nn.MultiheadAttention(E, H, **{option: True}))
    with pytest.raises(ValueError, match=f"{option}=True.*leave its parameters out"):
        sf.find_layers(model)
    with pytest.raises(ValueError, match=f"{option}=True"):
        sf.SINGD(model)
    # its parameters left out: nothing to describe, no error
    assert sf.find_layers(model, params=[]) == ()


def test_frozen_projections_are_left_out():
    mha = nn.MultiheadAttention(E, H)
    mha.in_proj_weight.requires_grad_(False)
    names = [i.name for i in sf.find_layers(nn.ModuleDict({"attn": mha}))]
    assert names == ["attn.out_proj"]
    mha.out_proj.weight.requires_grad_(False)
    assert sf.find_layers(nn.ModuleDict({"attn": mha})) == ()


def test_drop_in_ignores_eval_and_no_grad_and_deep_copies():
    """Only due steps with grad recompute through the kind; a deep copy stays inert."""
    import copy

    a, _ = make_pair("self", need_weights=False)
    opt = sf.SINGD(a, T=1, **HP)
    x, m1, m2, y = batches(1)[0]
    twin = copy.deepcopy(a)
    with torch.no_grad():
        a(x, m1, m2)
    loss_fn(twin(x, m1, m2), y).backward()  # the copy's hooks feed nothing
    assert not any(layer.reached or layer.parts for g in opt._groups for layer in g.layers)
    loss_fn(a(x, m1, m2), y).backward()
    assert all(layer.parts for g in opt._groups for layer in g.layers)


# ----------------------------------------------------------------- stock transformer models
class CharTransformer(nn.Module):
    """The issue's model: nn.Embedding, learned positions, two nn.TransformerEncoderLayer,
    LayerNorm, a Linear head; 115,560 parameters in 30 tensors."""

    def __init__(self, vocab=104, width=64, heads=4, ff=256, context=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, ff, dropout=0.0, batch_first=True)
            for _ in range(2)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h, src_mask=self.mask, is_causal=True)
        return self.head(self.norm(h))


class Seq2Seq(nn.Module):
    """Stock nn.TransformerDecoder (self- and cross-attention), sequence-first, over an
    encoded source; the memory is key and value of every cross-attention."""

    def __init__(self, vocab=11, width=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.source = nn.Linear(5, width)
        layer = nn.TransformerDecoderLayer(width, 2, 2 * width, dropout=0.0)
        self.decoder = nn.TransformerDecoder(layer, 2)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens, source):
        memory = self.source(source)  # [S, N, width]
        h = self.embed(tokens).transpose(0, 1)  # [T, N, width]
        mask = nn.Transformer.generate_square_subsequent_mask(h.shape[0], dtype=h.dtype)
        return self.head(self.decoder(h, memory, tgt_mask=mask, tgt_is_causal=True))


def lm_loss(logits, y):
    return F.cross_entropy(logits.flatten(0, -2), y.flatten())


def seq2seq_batches(steps, n=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 11, (n, 6), generator=g),
             torch.randn(7, n, 5, generator=g, dtype=torch.float64),
             torch.randint(0, 11, (6, n), generator=g)) for _ in range(steps)]


def char_batches(steps, n=4, seed=3, vocab=104, context=32):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randint(0, vocab, (n, context + 1), generator=g)
        out.append((x[:, :-1], x[:, 1:]))
    return out


def pure_run(model, data, method, structures=("dense", "dense")):
    layers = sf.find_layers(model)
    tx = sf.singd(layers, structures=structures, **HP)
    capture = sf.make_capture(model, lm_loss, layers, method=method)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = tx.init(params)
    for *inputs, y in data:
        _, grads, caps = capture(params, *inputs, y)
        assert caps.keys() == {i.name for i in layers}
        updates, state = tx.update(grads, state, params, captures=caps)
        params = sf.apply_updates(params, updates)
    return params


def drop_in_run(model, data, structures=("dense", "dense")):
    opt = sf.SINGD(model, list(model.parameters()), structures=structures, T=1, **HP)
    for *inputs, y in data:
        opt.zero_grad()
        lm_loss(model(*inputs), y).backward()
        opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}


def fresh(cls, seed=0):
    torch.manual_seed(seed)
    return cls().double()


def test_issue_model_preconditions_19_of_its_30_tensors():
    model = CharTransformer()
    assert sum(p.numel() for p in model.parameters()) == 115_560
    params = dict(model.named_parameters())
    assert len(params) == 30
    covered = {k for info in sf.find_layers(model) for k in info.params}
    assert len(covered) == 19  # was 10: linear1/linear2 of both blocks and the head
    left = sorted(set(params) - covered)
    assert left == sorted(["pos", "norm.weight", "norm.bias"]
                          + [f"blocks.{b}.norm{j}.{w}" for b in (0, 1) for j in (1, 2)
                             for w in ("weight", "bias")])
    with pytest.warns(UserWarning, match="will NOT be trained: pos, blocks.0.norm1.weight"):
        opt = sf.SINGD(model)
    assert {k for k, p in params.items() if any(p is q for g in opt.param_groups
                                                 for q in g["params"])} == covered


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_issue_model_both_faces_give_the_same_parameters(structure):
    """The drop-in (hooks in backward) and the pure face (hooks, fx) after 3 steps."""
    data = char_batches(3)
    ref = drop_in_run(fresh(CharTransformer), data, STRUCTURES[structure])
    for method in ("hooks", "fx"):
        got = pure_run(fresh(CharTransformer), data, method, STRUCTURES[structure])
        worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
        assert worst < 1e-10, (method, worst)


def test_transformer_decoder_cross_attention_both_faces():
    data = seq2seq_batches(3)
    model = fresh(Seq2Seq)
    names = [i.name for i in sf.find_layers(model)]
    assert "decoder.layers.1.multihead_attn.in_proj" in names and len(names) == 2 + 2 * 6 + 1
    ref = drop_in_run(model, data)
    for method in ("hooks", "fx"):
        got = pure_run(fresh(Seq2Seq), data, method)
        assert max((got[k] - ref[k]).abs().max().item() for k in ref) < 1e-10, method


def test_transformer_decoder_vmapped_sweep_equals_runs_per_member():
    data = seq2seq_batches(2)
    model = fresh(Seq2Seq)
    layers = sf.find_layers(model)
    hp = {k: v for k, v in HP.items() if k != "lr"}
    lrs = (0.05, 0.01)
    sweep = sf.make_sweep(sf.singd(layers, **hp), sf.make_capture(model, lm_loss, layers),
                          sf.HyperParams(lr=torch.tensor(lrs, dtype=torch.float64)))
    state = sweep.init({k: v.detach() for k, v in model.named_parameters()})
    for *inputs, y in data:
        state, _ = sweep.step(state, *inputs, y)
    for i, lr in enumerate(lrs):
        one = fresh(Seq2Seq)
        opt = sf.SINGD(one, list(one.parameters()), T=1, lr=lr, **hp)
        for *inputs, y in data:
            opt.zero_grad()
            lm_loss(one(*inputs), y).backward()
            opt.step()
        worst = max((state.params[k][i] - p).abs().max().item()
                    for k, p in one.named_parameters())
        assert worst < 1e-10, (lr, worst)


def test_transformer_decoder_compiled_fullgraph_equals_eager():
    """Self- and cross-attention (two distinct inputs) inside one compiled graph."""
    import torch._dynamo

    torch._dynamo.reset()
    model = fresh(Seq2Seq)
    layers = sf.find_layers(model)
    capture = sf.make_capture(model, lm_loss, layers)  # auto: fx under compile
    assert capture.method == "fx"
    tx = sf.singd(layers, structures=("dense", "diagonal"), **HP)
    eager = sf.make_step(tx, capture)
    compiled = [torch.compile(f, fullgraph=True, backend="eager") for f in eager]
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    p_e, s_e, p_c, s_c = params, tx.init(params), params, tx.init(params)
    for t, (*inputs, y) in enumerate(seq2seq_batches(3)):
        p_e, s_e, _ = eager[t % 2](p_e, s_e, *inputs, y)
        p_c, s_c, _ = compiled[t % 2](p_c, s_c, *inputs, y)
    for k, p in p_e.items():
        assert torch.allclose(p_c[k], p, rtol=1e-10, atol=1e-12), k
    for info in layers:
        assert not torch.equal(s_c.factors[info.name].K.to_dense(),
                               torch.eye(info.d_K, dtype=torch.float64)), info.name


def test_views_of_one_input_are_one_input():
    """``mha(x, x.view_as(x), x)`` (how fully_shard hands a module its inputs: one alias
    per argument) is self-attention: one tapped in_proj call, as ``mha(x, x, x)``."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2, batch_first=True).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    calls = []

    def tap(slot, a, z):
        calls.append((slot, tuple(a.shape)))
        return z

    one, two = [(2, 3, 4)], [(2, 6, 4)]  # one input; query and key/value concatenated
    for args, expected in (((x, x, x), one), ((x, x.view_as(x), x[:, :]), one),
                           ((x, x.clone(), x), [(2, 9, 4)]), ((x, x[:, :2], x[:, :2]), [(2, 5, 4)]),
                           ((x, x.clone(), None), two)):
        key, value = args[1], args[2] if args[2] is not None else args[1]
        calls.clear()
        out, _ = attention_forward(mha, args[0], key, value, need_weights=False, tap=tap)
        assert [shape for slot, shape in calls if slot == "in_proj"] == expected
        assert torch.allclose(out, mha(args[0], key, value, need_weights=False)[0], atol=1e-14)

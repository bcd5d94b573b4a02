"""singd_functional.examples.chargpt: the corpus, both model families, the three loops."""

from __future__ import annotations

import pytest
import torch

import singd_functional as sf
from singd_functional.examples import chargpt

SMALL = dict(layers=1, width=16, heads=2, context=8)


@pytest.fixture(scope="module")
def data():
    return chargpt.load_corpus(20_000)


def test_corpus_is_deterministic_and_split_90_10(data):
    again = chargpt.load_corpus(20_000)
    assert torch.equal(data.train, again.train) and torch.equal(data.val, again.val)
    assert len(data.train) == 18_000 and len(data.val) == 2_000
    assert data.vocab == bytes(sorted(data.vocab)) and 20 < len(data.vocab) < 256
    assert int(data.train.max()) < len(data.vocab)
    text = bytes(data.vocab[i] for i in data.train[:2000].tolist())
    first = chargpt.stdlib_sources()[0].read_bytes()
    assert text == first[:2000]  # the first file, read as bytes


def test_budget_is_checked():
    with pytest.raises(ValueError, match="at least 1000 bytes"):
        chargpt.load_corpus(10)


def test_batches_are_next_byte_windows(data):
    x, y = chargpt.random_batch(data.train, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])
    a = chargpt.batch_stream(data, 3, 4, 8, seed=1)
    b = chargpt.batch_stream(data, 3, 4, 8, seed=1)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))


@pytest.mark.parametrize("family", chargpt.FAMILIES)
def test_models_are_causal(family, data):
    model = chargpt.make_model(family, len(data.vocab), **SMALL)
    x = data.train[:8][None]
    changed = x.clone()
    changed[0, -1] = (changed[0, -1] + 1) % len(data.vocab)
    out, out2 = model(x), model(changed)
    assert out.shape == (1, 8, len(data.vocab))
    torch.testing.assert_close(out[:, :-1], out2[:, :-1])  # the past ignores the future
    assert not torch.allclose(out[:, -1], out2[:, -1])


def test_nanogpt_linear_maps_are_all_singd_layers(data):
    model = chargpt.make_model("nanogpt", len(data.vocab), **SMALL)
    names = [info.name for info in sf.find_layers(model)]
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.fc",
                       "blocks.0.out", "head"]
    assert set(linears) <= set(names)  # every linear map (with main's kinds: embeddings too)
    others = {n for n in names if n not in linears}
    assert all(isinstance(model.get_submodule(n), torch.nn.Embedding) for n in others)


def test_family_is_checked():
    with pytest.raises(ValueError, match="family must be one of"):
        chargpt.make_model("lstm", 10)


def test_sweep_members_equal_their_own_runs(data):
    """sweep_core's members are train_core's runs (same weights, batches, hyperparameters)."""
    model = chargpt.make_model("nanogpt", len(data.vocab), **SMALL)
    batches = chargpt.batch_stream(data, 4, 4, 8, seed=0)
    windows = chargpt.val_windows(data, 8, n=8)
    lrs = [1e-2, 3e-2]
    tx, capture, T = chargpt.core_optimizer(model, structures="diagonal", lr=lrs[0], T=2)
    # {"singd": ...}: SINGD's lr only; a plain HyperParams would sweep the AdamW fallback's too
    members, _ = chargpt.sweep_core(model, tx, capture, T, {"singd": sf.grid(lr=lrs)}, batches,
                                    windows, eval_every=2)
    for lr, member in zip(lrs, members):
        tx, capture, T = chargpt.core_optimizer(model, structures="diagonal", lr=lr, T=2)
        curve, state = chargpt.train_core(model, tx, capture, T, batches, windows, eval_every=2)
        assert member.steps == curve.steps == [2, 4]
        assert member.val == pytest.approx(curve.val, rel=1e-5)
        assert chargpt.tree_bytes(state) > 0
    assert members[0].val[-1] != members[1].val[-1]


def test_adamw_run_lowers_the_loss(data):
    model = chargpt.make_model("stock", len(data.vocab), **SMALL)
    batches = chargpt.batch_stream(data, 30, 8, 8, seed=0)
    windows = chargpt.val_windows(data, 8, n=16)
    before = chargpt.val_loss(model, windows)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    curve = chargpt.train_torch(model, [opt], batches, windows, eval_every=10)
    assert curve.steps == [10, 20, 30] and curve.val[-1] < before - 0.5
    assert not curve.diverged and curve.seconds > 0


def test_cli_prints_curve(capsys):
    args = ["--steps", "4", "--eval-every", "2", "--budget", "20000", "--width", "16",
            "--context", "8", "--layers", "1", "--optimizer", "singd", "--structure", "diagonal"]
    assert chargpt.main(args) == 0
    out = capsys.readouterr().out
    assert "step     2" in out and "step     4" in out and "nanogpt with" in out


@pytest.mark.parametrize("family", chargpt.FAMILIES)
def test_fx_traces_both_families(family, data):
    """The traced capture (what torch.compile uses) sees every layer; no hooks fallback."""
    model = chargpt.make_model(family, len(data.vocab), **SMALL)
    layers = sf.find_layers(model)
    assert sf.make_capture(model, chargpt.loss_fn, layers, method="fx").method == "fx"

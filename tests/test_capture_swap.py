"""The eager lean swap of capture's forward: the same results as functional_call."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

import singd_functional as sf
import singd_functional.capture as capture_module
from singd_functional.capture import _call


def _state(model):
    return {k: torch.randn_like(v) for k, v in model.named_parameters()}


def _own(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.emb(idx))


def test_tied_weights_filled_through_every_alias():
    torch.manual_seed(0)
    model, idx = Tied(), torch.tensor([0, 3, 4])
    new = torch.randn(5, 4)
    for key in ("emb.weight", "head.weight"):
        want = functional_call(model, {key: new}, (idx,))
        torch.testing.assert_close(_call(model, {key: new}, (idx,)), want, rtol=0, atol=0)
    assert model.head.weight is model.emb.weight
    assert isinstance(model.emb.weight, nn.Parameter)


def test_buffers_updated_as_functional_call_updates_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    x = torch.randn(8, 3)
    params = _state(model)
    results = []
    for call in (functional_call, _call):
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        out = call(model, {**buffers, **params}, (x,))
        results.append((out, buffers))
    (want, want_buffers), (got, got_buffers) = results
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for k in want_buffers:
        torch.testing.assert_close(got_buffers[k], want_buffers[k], rtol=0, atol=0)
    assert int(got_buffers["1.num_batches_tracked"]) == 1
    assert int(model[1].num_batches_tracked) == 0  # the model's own buffer is untouched


def test_exception_in_forward_restores_the_module():
    class Boom(nn.Linear):
        def forward(self, x):
            raise RuntimeError("boom")

    model = Boom(3, 2)
    before = dict(model.named_parameters())
    with pytest.raises(RuntimeError, match="boom"):
        _call(model, _state(model), (torch.randn(1, 3),))
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    assert all(after[k] is before[k] for k in before)


def test_parametrized_module_falls_back(monkeypatch):
    class Symmetric(nn.Module):
        def forward(self, w):
            return w.triu() + w.triu(1).T

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3))
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    calls = []
    real = capture_module.functional_call
    monkeypatch.setattr(capture_module, "functional_call",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    state = {"0.parametrizations.weight.original": torch.randn(3, 3), "0.bias": torch.randn(3)}
    x = torch.randn(2, 3)
    torch.testing.assert_close(_call(model, state, (x,)), real(model, state, (x,)), rtol=0, atol=0)
    assert calls == [1]


def test_unknown_key_falls_back_to_functional_call():
    model = nn.Linear(3, 2)
    state = {**_state(model), "not_a_tensor_of_the_model": torch.zeros(1)}
    x = torch.randn(1, 3)
    torch.testing.assert_close(
        _call(model, state, (x,)), functional_call(model, state, (x,)), rtol=0, atol=0
    )


def test_structure_change_after_caching_is_seen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    x = torch.randn(2, 3)
    state = _state(model)
    _call(model, state, (x,))
    model[1] = nn.Linear(3, 2)  # a new module under the same name
    model[0].weight = nn.Parameter(torch.randn(3, 3))
    torch.testing.assert_close(
        _call(model, state, (x,)), functional_call(model, state, (x,)), rtol=0, atol=0
    )
    partial = {"1.bias": torch.randn(2)}
    torch.testing.assert_close(
        _call(model, partial, (x,)), functional_call(model, partial, (x,)), rtol=0, atol=0
    )


def test_capture_leaves_the_models_own_tensors_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    capture = sf.make_capture(model, F.cross_entropy, sf.find_layers(model))
    own = _own(model)
    objects = dict(model.state_dict(keep_vars=True))
    params = _state(model)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    for record in (True, False):
        loss, grads, _ = capture(params, x, y, buffers=buffers, record_layers=record)
        assert grads.keys() == params.keys()
    now = model.state_dict(keep_vars=True)
    assert all(now[k] is objects[k] for k in objects)
    for k, v in own.items():
        torch.testing.assert_close(now[k].detach(), v, rtol=0, atol=0)
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())

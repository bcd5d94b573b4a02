"""find_layers and make_capture: exact gradients, exotic models, vmap, no hooks left."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import singd_functional as sf
from singd_functional.statistics import layer_rows


def weight_grad_from_capture(info, cap):
    """Rebuild dL/dW~ from the captured rows: sum_i g_i a_i^T (expand, loss as is)."""
    a, g, _, _ = layer_rows(info, cap, "expand")
    return g.T @ a


def conv_model(padding_mode="zeros"):
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1, padding_mode=padding_mode),
        nn.ReLU(inplace=True),
        nn.Conv2d(6, 4, (3, 2), dilation=(2, 1), padding="same", groups=2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 2, padding="valid", bias=False),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
    ).double()


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2)
        self.l = nn.Linear(4, 2)

    def forward(self, x):
        return self.l(self.c(x).mean(-1))


class Reused(nn.Module):
    """A layer called three times, with different sequence lengths."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)                      # [N, 5, 4]
        h = self.lin(torch.tanh(h))          # [N, 5, 4]
        h2 = self.lin(x[:, :2])              # [N, 2, 4]
        return self.out(torch.cat([h, h2], 1).mean(1))


CASES = {
    "conv2d": (conv_model, lambda: torch.randn(4, 3, 7, 7, dtype=torch.float64)),
    "conv2d-reflect": (lambda: conv_model("reflect"), lambda: torch.randn(4, 3, 7, 7, dtype=torch.float64)),
    "conv2d-circular": (lambda: conv_model("circular"), lambda: torch.randn(4, 3, 7, 7, dtype=torch.float64)),
    "conv1d": (lambda: Conv1dNet().double(), lambda: torch.randn(4, 3, 11, dtype=torch.float64)),
    "reused": (lambda: Reused().double(), lambda: torch.randn(4, 5, 4, dtype=torch.float64)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_capture_reproduces_autograd_gradients(case):
    make, data = CASES[case]
    torch.manual_seed(0)
    model = make()
    model.eval()  # BatchNorm with running statistics (buffers)
    x = data()
    y = torch.randint(0, 2, (x.shape[0],))
    layers = sf.find_layers(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    capture = sf.make_capture(model, F.cross_entropy, layers)
    loss, grads, caps = capture(params, x, y)

    ref_loss = F.cross_entropy(model(x), y)
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss, rtol=0, atol=1e-14)
    for k, p in model.named_parameters():
        assert torch.allclose(grads[k], p.grad, rtol=1e-12, atol=1e-14), k
    assert {info.name for info in layers} == set(caps)
    for info in layers:
        Gw = weight_grad_from_capture(info, caps[info.name])
        expected = dict(model.named_parameters())[info.weight].grad.reshape(info.d_out, -1)
        if info.bias is not None:
            expected = torch.cat([expected, dict(model.named_parameters())[info.bias].grad[:, None]], 1)
        if info.groups == 1:  # with groups, the rows are group-averaged by definition
            assert torch.allclose(Gw, expected, rtol=1e-10, atol=1e-12), info.name
    # no hook is left behind
    assert all(not m._forward_hooks for m in model.modules())


def test_reused_layer_has_one_capture_per_call():
    model, data = CASES["reused"]
    model = model()
    layers = sf.find_layers(model)
    capture = sf.make_capture(model, lambda out, y: out.square().mean(), layers)
    params = {k: v.detach() for k, v in model.named_parameters()}
    _, _, caps = capture(params, data(), None)
    assert len(caps["lin"].inputs) == 3 and len(caps["lin"].output_grads) == 3
    assert caps["lin"].inputs[2].shape == (4, 2, 4)


def test_capture_under_vmap_matches_a_loop():
    torch.manual_seed(0)
    model = conv_model().eval()
    layers = sf.find_layers(model)
    capture = sf.make_capture(model, F.cross_entropy, layers)
    params = {k: v.detach() for k, v in model.named_parameters()}
    xs = torch.randn(3, 4, 3, 7, 7, dtype=torch.float64)
    ys = torch.randint(0, 5, (3, 4))
    loss, grads, caps = torch.func.vmap(capture, in_dims=(None, 0, 0))(params, xs, ys)
    for i in range(3):
        l_i, g_i, c_i = capture(params, xs[i], ys[i])
        assert torch.allclose(loss[i], l_i)
        for k in g_i:
            assert torch.allclose(grads[k][i], g_i[k], atol=1e-14)
        for name in c_i:
            assert torch.allclose(caps[name].output_grads[0][i], c_i[name].output_grads[0], atol=1e-14)


@pytest.mark.parametrize("record_layers", [True, False])
def test_eager_autograd_path_equals_torch_func_grad(record_layers):
    """Eagerly the capture differentiates with torch.autograd.grad; under a transform
    with torch.func.grad. Same numbers, no graph left on what it returns, a parameter
    the loss never uses gets zeros, and an outer no_grad does not stop it."""

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.idle = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    model = Unused().double()
    layers = tuple(i for i in sf.find_layers(model) if i.name != "idle")
    capture = sf.make_capture(model, F.cross_entropy, layers)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    with torch.no_grad():
        loss, grads, caps = capture(params, x, y, record_layers=record_layers)
    # a transform over a member axis of size 1 runs the torch.func.grad path
    ref = torch.func.vmap(lambda p: capture(p, x, y, record_layers=record_layers))(
        {k: v.unsqueeze(0) for k, v in params.items()}
    )
    assert torch.allclose(loss, ref[0][0], rtol=1e-14, atol=0)
    for k in params:
        assert torch.allclose(grads[k], ref[1][k][0], rtol=1e-12, atol=1e-15), k
        assert grads[k].grad_fn is None and not grads[k].requires_grad
    assert torch.equal(grads["idle.weight"], torch.zeros(2, 2, dtype=torch.float64))
    assert grads["a.weight"].abs().sum() > 0
    assert sorted(caps) == (["a", "b"] if record_layers else [])
    for name, cap in caps.items():
        for got, want in zip(cap.inputs + cap.output_grads, ref[2][name].inputs + ref[2][name].output_grads):
            assert torch.allclose(got, want[0], rtol=1e-12, atol=1e-15)
            assert got.grad_fn is None and not got.requires_grad
    assert loss.grad_fn is None


def test_update_runs_under_vmap_over_seeds():
    """Capture + update vmapped over per-member parameters equals a loop."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    layers = sf.find_layers(model)
    capture = sf.make_capture(model, F.cross_entropy, layers)
    tx = sf.singd(layers, lr=0.1, lr_cov=0.1, structures=("triltoeplitz", "dense"))
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append({k: v.detach().clone() for k, v in nn.Sequential(
            nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().named_parameters()})
    stacked = {k: torch.stack([m[k] for m in members]) for k in members[0]}
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))

    def step(params, state):
        _, grads, caps = capture(params, x, y)
        updates, state = tx.update(grads, state, params, captures=caps)
        return sf.apply_updates(params, updates), state

    out, _ = torch.func.vmap(step)(stacked, torch.func.vmap(tx.init)(stacked))
    for i, m in enumerate(members):
        ref, _ = step(m, tx.init(m))
        for k in ref:
            assert torch.allclose(out[k][i], ref[k], rtol=1e-12, atol=1e-14)


def test_find_layers_rules():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Conv1d(1, 1, 1), nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)  # frozen layer: left out
    model[0].bias.requires_grad_(False)    # frozen bias: layer kept, bias left out
    layers = {info.name: info for info in sf.find_layers(model)}
    assert set(layers) == {"0", "2"}
    assert layers["0"].bias is None and layers["0"].d_K == 3
    assert layers["2"].kind == "conv1d" and layers["2"].bias == "2.bias"
    hash(tuple(layers.values()))  # static and hashable
    only = sf.find_layers(model, params=[model[2].weight])
    assert [info.name for info in only] == ["2"]


def test_same_padding_even_kernel_is_asymmetric():
    info = sf.find_layers(nn.Conv2d(1, 1, (2, 4), padding="same"))[0]
    assert info.padding == (0, 1, 1, 2)


def test_params_may_leave_out_some_model_parameters():
    """Entries missing from params are the module's own tensors (functional_call rule)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    layers = sf.find_layers(model)
    keys = {k for info in layers for k in info.params}
    params = {k: v.detach() for k, v in model.named_parameters() if k in keys}
    capture = sf.make_capture(model, F.cross_entropy, layers)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    loss, grads, caps = capture(params, x, y)
    assert set(grads) == keys and set(caps) == {"0", "2"}
    F.cross_entropy(model(x), y).backward()
    for k in keys:
        assert torch.allclose(grads[k], dict(model.named_parameters())[k].grad, atol=1e-14)

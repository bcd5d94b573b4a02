"""Write the tutorial notebooks of this folder from the cells below (outputs stay empty).

    .venv/bin/python notebooks/build_notebooks.py

Edit the cells here, not in Jupyter, so that the committed notebooks carry no outputs
and no execution counts; ``tests/test_notebooks.py`` runs every notebook top to bottom.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# Shared by the digits notebooks: data split and a small MLP (kept in each notebook so
# that every notebook reads on its own).
DIGITS = '''\
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

torch.manual_seed(0)
torch.set_num_threads(1)

images, labels = load_digits(return_X_y=True)          # 1797 images of 8x8 pixels, 0..16
X = torch.tensor(images, dtype=torch.float32) / 16.0    # [1797, 64]
y = torch.tensor(labels)                                # [1797], classes 0..9
perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
train, test = perm[:1400], perm[1400:]


def epoch_batches(batch_size=64, seed=0):
    """Index tensors of one shuffled pass over the training set."""
    g = torch.Generator().manual_seed(seed)
    return train[torch.randperm(len(train), generator=g)].split(batch_size)


@torch.no_grad()
def test_accuracy(model):
    return (model(X[test]).argmax(-1) == y[test]).float().mean().item()'''


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


# --------------------------------------------------------------------- 1 quickstart
QUICKSTART = [
    md("""
# 1. Quickstart: SINGD as a drop-in `torch.optim` optimizer

`singd_functional.SINGD` takes the same arguments as the official package's
`singd.optim.optimizer.SINGD`, so switching is a one-line import change:

```python
# from singd.optim.optimizer import SINGD
from singd_functional import SINGD
```

It is a real `torch.optim.Optimizer`: the usual `zero_grad()` / `backward()` / `step()`
loop, param groups, learning-rate schedulers and `state_dict()` all work. Below: a small
MLP on scikit-learn's handwritten digits (shipped with scikit-learn, no download).
"""),
    code(DIGITS),
    md("""
## Train

SINGD preconditions every `nn.Linear`, `nn.Conv1d` and `nn.Conv2d` layer. Every `T` steps
it reads the layer inputs and output gradients during `backward()` (with hooks) and
updates its Kronecker factors `K` and `C`; every step it moves along the preconditioned
direction `C Cᵀ G K Kᵀ` with heavy-ball momentum.
"""),
    code('''
from singd_functional import SINGD

model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
opt = SINGD(model, lr=0.05, momentum=0.9, damping=1e-3, lr_cov=1e-2, T=2)

for epoch in range(4):
    for idx in epoch_batches(seed=epoch):
        opt.zero_grad()
        loss = F.cross_entropy(model(X[idx]), y[idx])
        loss.backward()
        opt.step()
    print(f"epoch {epoch}: last batch loss {loss.item():.3f}, test accuracy {test_accuracy(model):.3f}")
assert test_accuracy(model) > 0.9                       # measured 0.922
'''),
    md("""
## What the optimizer keeps

Per layer: the factors `K` (d_in+1 square, the bias is an extra input column) and `C`
(d_out square) in their *structure*, their Riemannian momenta `m_K`, `m_C`, and a
heavy-ball buffer per parameter. With `structures=("dense", "dense")` (the default) the
factors are full matrices.
"""),
    code('''
from singd_functional.structures import StructuredMatrix


def describe(value):
    if isinstance(value, StructuredMatrix):
        return f"{type(value).__name__} {value.dim}x{value.dim}"
    return f"tensor {tuple(value.shape)}"


for name, p in model.named_parameters():
    print(f"{name:>8}:", {k: describe(v) for k, v in opt.state[p].items()})
'''),
    md("""
## Structures, param groups and schedulers

Each param group may have its own hyperparameters and structures. Here the first layer
uses diagonal factors and the head dense ones, and a cosine schedule drives `lr` (the
optimizer reads `param_groups` at every step, like every `torch.optim` optimizer).
"""),
    code('''
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
opt = SINGD(
    model,
    params=[
        {"params": model[0].parameters(), "structures": ("diagonal", "diagonal")},
        {"params": model[2].parameters()},                 # the defaults below
    ],
    lr=0.05, T=2, structures=("dense", "dense"),
)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4 * 22)
for epoch in range(4):
    for idx in epoch_batches(seed=epoch):
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
        sched.step()
print("test accuracy", test_accuracy(model), "final lr", sched.get_last_lr())
print("K of layer 0:", opt.state[model[0].weight]["K"])
assert opt.state[model[0].weight]["K"].name == "diagonal" and opt.state[model[2].weight]["K"].name == "dense"
assert test_accuracy(model) > 0.9                       # measured 0.922
'''),
    md("""
## Checkpoints

`state_dict()` holds only tensors and plain Python values, so it loads with
`torch.load(..., weights_only=True)` (PyTorch's default).
"""),
    code('''
import io

buffer = io.BytesIO()
torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
buffer.seek(0)
checkpoint = torch.load(buffer, weights_only=True)

model2 = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
model2.load_state_dict(checkpoint["model"])
opt2 = SINGD(model2, params=[{"params": model2[0].parameters(), "structures": ("diagonal", "diagonal")},
                             {"params": model2[2].parameters()}], lr=0.05, T=2)
opt2.load_state_dict(checkpoint["opt"])

# one more identical step on both: the parameters stay equal
for m, o in ((model, opt), (model2, opt2)):
    o.zero_grad()
    F.cross_entropy(m(X[train[:64]]), y[train[:64]]).backward()
    o.step()
print("same after resuming:", all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters())))
assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
'''),
    md("""
## Parameters outside supported layers

With `params=None` SINGD trains the parameters of supported layers only and warns about
the others (here a `LayerNorm`). Either pass them explicitly (they then get the same
heavy-ball step without preconditioner) or train them with a second optimizer:
"""),
    code('''
import warnings

model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 10))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    SINGD(model)
print(caught[0].message)

norm_params = list(model[1].parameters())
singd = SINGD(model, lr=0.05, T=2, warn_unsupported=False)      # the Linear layers
adamw = torch.optim.AdamW(norm_params, lr=1e-3)                  # the LayerNorm
for idx in epoch_batches():
    singd.zero_grad()
    adamw.zero_grad()
    F.cross_entropy(model(X[idx]), y[idx]).backward()
    singd.step()
    adamw.step()
print("test accuracy after one epoch:", test_accuracy(model))
assert len(caught) == 1 and "1.weight" in str(caught[0].message)
assert test_accuracy(model) > 0.85                      # measured 0.924
'''),
]

# ------------------------------------------------------------------ 2 functional API
FUNCTIONAL = [
    md("""
# 2. The pure functional API

The drop-in optimizer is a thin shell around a **pure core** in the style of optax and
torchopt: parameters, gradients and optimizer state are plain dicts and pytrees, and
every function returns new values instead of mutating. That is what lets
`torch.func.vmap` and `torch.compile` see through the optimizer.

The data path: `find_layers` → `make_capture` (layer inputs and output gradients, via
`torch.func`) → `singd(...).update` (statistics, factor update, preconditioned step) →
`apply_updates`.
"""),
    code(DIGITS),
    md("""
## Layers and capture

`find_layers` describes the supported layers once (a hashable tuple). `make_capture`
builds a pure function that returns the loss, the gradient of every parameter and, per
layer, what the statistics need: its inputs and the gradient of the loss w.r.t. its
outputs. Nothing is left registered on the model.

The model below has a `LayerNorm`, which SINGD does not precondition.
"""),
    code('''
import singd_functional as sf

model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 10))
layers = sf.find_layers(model)
for info in layers:
    print(info.name, info.kind, "d_K =", info.d_K, "d_C =", info.d_C, "params:", info.params)

params = {k: v.detach().clone() for k, v in model.named_parameters()}
capture = sf.make_capture(model, F.cross_entropy, layers)
loss, grads, captures = capture(params, X[:32], y[:32])
print("loss", loss.item())
for name, c in captures.items():
    print(f"layer {name}: input {tuple(c.inputs[0].shape)}, output grad {tuple(c.output_grads[0].shape)}")
assert [info.name for info in layers] == list(captures) == ["0", "3"]   # not the LayerNorm
assert captures["3"].output_grads[0].shape == (32, 10)
'''),
    md("""
## A transform with a fallback

`sf.singd(layers, ...)` returns a `GradientTransformation(init, update)`. Parameters
outside `layers` (the LayerNorm's) go to the `fallback` transform, here AdamW.
`update` returns *updates* that `apply_updates` adds to the parameters.
"""),
    code('''
tx = sf.singd(layers, lr=0.05, damping=1e-3, lr_cov=1e-2, fallback=sf.adamw(lr=1e-3))
state = tx.init(params)
print("state fields:", state._fields)
print("K of layer 0:", state.factors["0"].K)

updates, state = tx.update(grads, state, params, captures=captures)
params = sf.apply_updates(params, updates)
print({k: f"{u.norm():.2e}" for k, u in updates.items()})
'''),
    md("""
## Your own training step

The caller decides when to pay for statistics: pass `captures` every `T` steps and
`captures=None` in between. Hyperparameters can change per call with
`sf.HyperParams(...)` (floats or 0-d tensors), so a schedule costs nothing. One
`HyperParams` reaches every transform that reads the field (`HyperParams(lr=0.0)`
freezes SINGD's parameters and the fallback's); the per-label form below gives SINGD
and the AdamW fallback their own cosine. Anything that fits the `init`/`update`
protocol composes with `sf.chain`: here gradients are clipped before SINGD sees them.
"""),
    code('''
tx = sf.chain(
    sf.clip_by_global_norm(5.0),
    sf.singd(layers, lr=0.05, damping=1e-3, lr_cov=1e-2, fallback=sf.adamw(lr=1e-3)),
)
params = {k: v.detach().clone() for k, v in model.named_parameters()}
state = tx.init(params)
T, steps, t = 2, 4 * 22, 0


def train_step(params, state, x, y, t):
    loss, grads, captures = capture(params, x, y)
    lr = 0.05 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * t / steps)))   # cosine schedule
    updates, state = tx.update(
        grads, state, params,
        captures=captures if t % T == 0 else None,
        hyperparams={"singd": sf.HyperParams(lr=lr), "fallback": sf.HyperParams(lr=lr / 50)},
    )
    return sf.apply_updates(params, updates), state, loss


for epoch in range(4):
    for idx in epoch_batches(seed=epoch):
        params, state, loss = train_step(params, state, X[idx], y[idx], t)
        t += 1
    with torch.no_grad():
        logits = torch.func.functional_call(model, params, (X[test],))
    print(f"epoch {epoch}: loss {loss.item():.3f}, test accuracy {(logits.argmax(-1) == y[test]).float().mean():.3f}")
assert (logits.argmax(-1) == y[test]).float().mean() > 0.9   # measured 0.962
'''),
    md("""
`sf.masked(inner, keys)` applies a transform to some entries only, e.g. weight decay
on the weights but not on the biases and norms (`sf.add_decayed_weights` is that
transform; written out here to show the protocol: an `update` declares its keyword
extras in the third field, none here). `sf.sgd` and `sf.adamw` are the first-order
rules of `torch.optim` in the same protocol, and `sf.partition` sends each parameter to
the transform of its label.
"""),
    code('''
def weight_decay(rate):
    return sf.GradientTransformation(
        lambda params: (),
        lambda updates, state, params=None: ({k: u + rate * params[k] for k, u in updates.items()}, state),
    )


weights = [k for k in params if k.endswith("weight") and k != "1.weight"]
tx = sf.chain(sf.masked(weight_decay(1e-4), weights), sf.singd(layers, lr=0.05, fallback=sf.sgd(lr=0.05)))
state = tx.init(params)
loss, grads, captures = capture(params, X[:64], y[:64])
updates, state = tx.update(grads, state, params, captures=captures)
print(sorted(updates))
assert sorted(updates) == sorted(params)
'''),
    md("""
## Both faces are one core

The drop-in `SINGD` calls the same `sf.singd` transform, so with the same weights and
batches the two faces give the same parameters.
"""),
    code('''
mlp = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
params = {k: v.detach().clone() for k, v in mlp.named_parameters()}
layers = sf.find_layers(mlp)
capture = sf.make_capture(mlp, F.cross_entropy, layers)
tx = sf.singd(layers, lr=0.05, damping=1e-3, lr_cov=1e-2)
state = tx.init(params)
opt = sf.SINGD(mlp, lr=0.05, damping=1e-3, lr_cov=1e-2, T=2)

for t, idx in enumerate(list(epoch_batches())[:10]):
    loss, grads, captures = capture(params, X[idx], y[idx])
    updates, state = tx.update(grads, state, params, captures=captures if t % 2 == 0 else None)
    params = sf.apply_updates(params, updates)

    opt.zero_grad()
    F.cross_entropy(mlp(X[idx]), y[idx]).backward()
    opt.step()

print("max |difference|:", max((params[k] - p).abs().max().item() for k, p in mlp.named_parameters()))
assert max((params[k] - p).abs().max().item() for k, p in mlp.named_parameters()) < 1e-5   # float32 rounding
'''),
]

# ------------------------------------------------------------------- 3 sweep grid
SWEEP = [
    md("""
# 3. A hyperparameter grid in one vmapped run

Because the core is pure, `torch.func.vmap` can train many configurations at once: every
member gets its own parameters, optimizer state and hyperparameters along a leading
axis, and one call trains them all. `sf.make_sweep` wraps exactly that (it adds nothing
to the math: each member's numbers are those of its own sequential run), and `sf.grid`
builds the Cartesian product of value lists.

Here: 4 learning rates × 3 dampings = 12 SINGD runs of an MLP on the digits.
"""),
    code(DIGITS),
    code('''
import singd_functional as sf

model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
layers = sf.find_layers(model)
capture = sf.make_capture(model, F.cross_entropy, layers)
tx = sf.singd(layers, momentum=0.9, lr_cov=1e-2)            # what is not swept

lrs = [0.01, 0.03, 0.1, 0.3]
dampings = [1e-3, 1e-2, 1e-1]
hp = sf.grid(lr=lrs, damping=dampings)                          # 12 members, damping fastest
sweep = sf.make_sweep(tx, capture, hp)
state = sweep.init({k: v.detach() for k, v in model.named_parameters()})
print("members:", state.diverged.shape[0], "| W of layer 0:", tuple(state.params["0.weight"].shape))
'''),
    md("""
`sweep.step` updates the preconditioner (statistics), `sweep.plain_step` does not; use
the first every `T` steps. Every member sees the same batch. A member whose step turns
non-finite is stopped (its parameters are kept) and marked in `state.diverged`.
"""),
    code('''
import time

T, t = 2, 0
start = time.perf_counter()
for epoch in range(3):
    for idx in epoch_batches(seed=epoch):
        step = sweep.step if t % T == 0 else sweep.plain_step
        state, loss = step(state, X[idx], y[idx])            # loss: [12]
        t += 1
print(f"{t} steps of 12 runs in {time.perf_counter() - start:.1f} s; diverged: {state.diverged.tolist()}")

with torch.no_grad():
    logits = torch.func.vmap(lambda p: torch.func.functional_call(model, p, (X[test],)))(state.params)
    test_loss = torch.stack([F.cross_entropy(out, y[test]) for out in logits])
test_loss = torch.where(state.diverged, torch.nan, test_loss)
'''),
    code('''
import matplotlib.pyplot as plt

grid_loss = test_loss.reshape(len(lrs), len(dampings))
fig, ax = plt.subplots(figsize=(5, 4))
im = ax.imshow(grid_loss.log10(), cmap="viridis_r")
ax.set_xticks(range(len(dampings)), [f"{d:g}" for d in dampings])
ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
ax.set_xlabel("damping")
ax.set_ylabel("learning rate")
for i in range(len(lrs)):
    for j in range(len(dampings)):
        value = grid_loss[i, j]
        ax.text(j, i, "diverged" if value.isnan() else f"{value:.3f}", ha="center", va="center",
                color="white" if value.isnan() or value > grid_loss.nanmedian() else "black")
fig.colorbar(im, label="log10 test loss")
ax.set_title("SINGD test loss after 3 epochs")
plt.show()
best = int(torch.nan_to_num(test_loss, nan=float("inf")).argmin())
print(f"best: lr={hp.lr[best].item():g}, damping={hp.damping[best].item():g}, test loss {test_loss[best]:.4f}")
assert test_loss[best] < 0.4                            # measured 0.327 (lr 0.1, damping 1e-3)
'''),
    md("""
## The same numbers as a sequential run

Member `best`, trained on its own with the same hyperparameters, lands on the same
parameters (up to floating-point reassociation inside batched kernels).
"""),
    code('''
params = {k: v.detach().clone() for k, v in model.named_parameters()}
single = tx.init(params)
hyper = sf.HyperParams(lr=hp.lr[best].float(), damping=hp.damping[best].float())
t = 0
for epoch in range(3):
    for idx in epoch_batches(seed=epoch):
        loss, grads, captures = capture(params, X[idx], y[idx])
        updates, single = tx.update(grads, single, params, captures=captures if t % T == 0 else None,
                                    hyperparams=hyper)
        params = sf.apply_updates(params, updates)
        t += 1
print("max |difference| to the vmapped member:",
      max((params[k] - state.params[k][best]).abs().max().item() for k in params))
assert max((params[k] - state.params[k][best]).abs().max().item() for k in params) < 1e-5  # float32 rounding
'''),
]

# ------------------------------------------------------------------- 4 structures
STRUCTURES = [
    md("""
# 4. Structures: memory against accuracy

SINGD keeps, per layer, two factors `K` (d_K × d_K, d_K = inputs + 1) and `C`
(d_C × d_C, d_C = outputs) and their momenta. Constraining them to a *structure* cuts
their memory and cost from d² to as little as d. The optimizer state per layer is
`2 × (storage(d_K) + storage(d_C))` numbers (factors and momenta) plus one momentum
buffer per parameter.

Below: the same MLP trained with each structure for the same epochs, batches and
initial weights, and how much optimizer state each kept.
"""),
    code(DIGITS),
    code('''
import time

import optree

import singd_functional as sf
from singd_functional import SINGD, structures


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def state_bytes(opt):
    leaves = optree.tree_leaves(list(opt.state.values()), namespace=sf.PYTREE_NAMESPACE)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def run(make_opt, epochs=4):
    model = make_model()
    opt = make_opt(model)
    start = time.perf_counter()
    for epoch in range(epochs):
        for idx in epoch_batches(seed=epoch):
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return test_accuracy(model), state_bytes(opt), time.perf_counter() - start


names = ["dense", "block16diagonal", "hierarchical8_8", "triltoeplitz", "triutopleftdiag", "diagonal"]
results = {}
for name in names:
    results[name] = run(lambda m: SINGD(m, lr=0.05, damping=0.1, T=2, structures=(name, name)))
results["SGD (momentum)"] = run(lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9))
results["AdamW"] = run(lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3))
for name, (acc, nbytes, seconds) in results.items():
    print(f"{name:>16}: test accuracy {acc:.3f}, optimizer state {nbytes / 1024:7.1f} KiB, {seconds:.1f} s")
assert all(acc > 0.9 for acc, _, _ in results.values())    # measured 0.929 to 0.947
assert results["diagonal"][1] < results["block16diagonal"][1] < results["dense"][1]
'''),
    md("""
The storage of one d × d factor, per structure ([docs/algorithm.md](../docs/algorithm.md#structures)):
"""),
    code('''
for name in names:
    T = structures.get(name)
    print(f"{name:>16}: d=65 -> {T.eye(65).storage_numel():5d} numbers, d=128 -> {T.eye(128).storage_numel():5d}")
assert [structures.get(n).eye(65).storage_numel() for n in ("dense", "block16diagonal", "diagonal")] == [65**2, 4 * 16**2 + 1, 65]
'''),
    code('''
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6.5, 4))
for i, (name, (acc, nbytes, _)) in enumerate(results.items()):
    marker = "o" if name in names else "s"
    ax.scatter(nbytes / 1024, 100 * acc, marker=marker, s=50)
    offset = (6, 4) if i % 2 == 0 else (6, -11)           # alternate: neighbours stay readable
    ax.annotate(name, (nbytes / 1024, 100 * acc), textcoords="offset points", xytext=offset, fontsize=8)
ax.set_xscale("log")
ax.set_xlabel("optimizer state [KiB] (log)")
ax.set_ylabel("test accuracy [%]")
ax.set_title("MLP 64-128-10 on digits, 4 epochs")
ax.grid(alpha=0.3, which="both")
plt.show()
'''),
]

# ---------------------------------------------------------------------- 5 GCN
GCN = [
    md("""
# 5. A graph convolutional network on the karate club

The official `singd` package lists graph networks as unsupported. Here a two-layer GCN
(Kipf & Welling) is written in plain PyTorch: `nn.Linear` layers and a matrix product
with the normalized adjacency Â = D^-1/2 (A + I) D^-1/2. SINGD sees only the `nn.Linear`
layers, so nothing special is needed, except one thing: the loss averages over the
**labelled nodes only**, not over the N nodes that each layer processes. Tell SINGD so
with `loss_average=<number of labelled nodes>` (a count of loss terms), which scales the
output-gradient statistics correctly.

The data is Zachary's karate club, shipped with `networkx`: 34 members, 78 friendships,
and the club each member joined after the split ('Mr. Hi' or 'Officer').
"""),
    code('''
import networkx as nx
import torch
import torch.nn.functional as F
from torch import nn

torch.manual_seed(0)
torch.set_num_threads(1)

graph = nx.karate_club_graph()
n = graph.number_of_nodes()
labels = torch.tensor([0 if graph.nodes[v]["club"] == "Mr. Hi" else 1 for v in graph.nodes])

A = torch.tensor(nx.to_numpy_array(graph, weight=None), dtype=torch.float32) + torch.eye(n)
d = A.sum(1).rsqrt()
A_hat = d[:, None] * A * d[None, :]                    # D^-1/2 (A + I) D^-1/2
features = torch.eye(n)                                # one-hot node ids

labelled = torch.tensor([0, 33, 1, 32])                # the two leaders and one follower each
unlabelled = torch.tensor([v for v in range(n) if v not in labelled.tolist()])
print(f"{n} nodes, {graph.number_of_edges()} edges; labelled {labelled.tolist()} -> {labels[labelled].tolist()}")
'''),
    code('''
class GCN(nn.Module):
    """Two graph convolutions: relu(Â X W1) -> Â H W2 (weights in nn.Linear)."""

    def __init__(self, a_hat, d_in, hidden, classes):
        super().__init__()
        self.register_buffer("a_hat", a_hat)
        self.lin1 = nn.Linear(d_in, hidden)
        self.lin2 = nn.Linear(hidden, classes)

    def forward(self, x):
        h = torch.relu(self.lin1(self.a_hat @ x))      # the Linear sees the aggregated features
        return self.lin2(self.a_hat @ h)


def masked_loss(logits):
    return F.cross_entropy(logits[labelled], labels[labelled])   # mean over labelled nodes


def accuracy(model, nodes):
    with torch.no_grad():
        return (model(features).argmax(-1)[nodes] == labels[nodes]).float().mean().item()
'''),
    md("""
## With the drop-in optimizer

Each layer processes all 34 nodes (its batch), but the loss is a mean over the 4
labelled ones, so `loss_average=len(labelled)`.
"""),
    code('''
from singd_functional import SINGD

torch.manual_seed(0)
model = GCN(A_hat, n, 16, 2)
opt = SINGD(model, lr=0.05, damping=1e-3, lr_cov=1e-2, T=1, loss_average=len(labelled))
for step in range(60):
    opt.zero_grad()
    loss = masked_loss(model(features))
    loss.backward()
    opt.step()
    if step % 20 == 19:
        print(f"step {step + 1}: loss {loss.item():.4f}, accuracy on unlabelled nodes {accuracy(model, unlabelled):.3f}")
'''),
    md("""
## With the pure core

The same count goes to `sf.singd(..., loss_average=...)`; the capture function handles
the buffer `a_hat` and the matrix products like any other part of the forward pass.
"""),
    code('''
import singd_functional as sf

torch.manual_seed(0)
model_f = GCN(A_hat, n, 16, 2)
layers = sf.find_layers(model_f)
capture = sf.make_capture(model_f, lambda logits, _: masked_loss(logits), layers)
tx = sf.singd(layers, lr=0.05, damping=1e-3, lr_cov=1e-2, loss_average=len(labelled))
params = {k: v.detach().clone() for k, v in model_f.named_parameters()}
state = tx.init(params)
for step in range(60):
    loss, grads, captures = capture(params, features, labels)
    updates, state = tx.update(grads, state, params, captures=captures)
    params = sf.apply_updates(params, updates)
model_f.load_state_dict(params, strict=False)
print(f"loss {loss.item():.4f}, accuracy on unlabelled nodes {accuracy(model_f, unlabelled):.3f}")
print("same as the drop-in run:", max((params[k] - p).abs().max().item() for k, p in model.named_parameters()))
assert max((params[k] - p).abs().max().item() for k, p in model.named_parameters()) < 1e-5
assert accuracy(model_f, unlabelled) > 0.9              # measured 0.967
'''),
    md("""
Why the count matters: with `loss_average="batch"` SINGD would assume the loss is a mean
over the N = 34 rows each layer sees and scale the output-gradient statistics by 34
instead of 4, i.e. mis-estimate the curvature by a factor 8.5.
"""),
    code('''
import matplotlib.pyplot as plt

pred = model(features).argmax(-1).detach()
colors = ["tab:blue" if p == 0 else "tab:orange" for p in pred.tolist()]
edgecolors = ["black" if v in labelled.tolist() else "none" for v in graph.nodes]
wrong = [v for v in graph.nodes if pred[v] != labels[v]]
fig, ax = plt.subplots(figsize=(6, 4.5))
pos = nx.spring_layout(graph, seed=0)
nx.draw_networkx_edges(graph, pos, ax=ax, alpha=0.3)
nx.draw_networkx_nodes(graph, pos, ax=ax, node_color=colors, edgecolors=edgecolors, linewidths=2, node_size=180)
nx.draw_networkx_labels(graph, pos, ax=ax, font_size=7)
ax.set_title(f"predicted club (blue: Mr. Hi); labelled nodes outlined; wrong: {wrong}")
ax.axis("off")
plt.show()
'''),
]

# --------------------------------------------------------------------- 6 transformer
TRANSFORMER = [
    md("""
# 6. A character transformer on the standard library's sources

A GPT-style model (2 pre-norm blocks, width 64, 4 heads, context 64; attention written
with plain `nn.Linear` layers as in nanoGPT) learns to predict the next byte of Python's
own standard library (the `.py` files that ship with every Python: no download). The
last 10 % of the text is held out. `singd_functional.examples.chargpt` holds the data,
the models and two small training loops.

SINGD preconditions every `nn.Linear` (q/k/v, the attention output, the MLP, the head);
the token and position embeddings and the LayerNorms are not SINGD layers, so they get
AdamW (a second optimizer on the drop-in face, a `fallback` in the pure core).

`SINGD_NOTEBOOK_QUICK=1` (set by the test suite) shortens every run.
"""),
    code('''
import os

import matplotlib.pyplot as plt
import torch

import singd_functional as sf
from singd_functional.examples import chargpt

torch.set_num_threads(1)
QUICK = os.environ.get("SINGD_NOTEBOOK_QUICK") == "1"
STEPS = 12 if QUICK else 300

data = chargpt.load_corpus(100_000 if QUICK else 1_000_000)
print(f"{len(data.train):,} training / {len(data.val):,} validation bytes from {data.files} files; "
      f"vocabulary of {len(data.vocab)} byte values")
print(repr(bytes(data.vocab[i] for i in data.train[:120].tolist()).decode()))

model = chargpt.make_model("nanogpt", len(data.vocab), seed=0)
print(f"{sum(p.numel() for p in model.parameters()):,} parameters")
print("SINGD layers:", [info.name for info in sf.find_layers(model)])
batches = chargpt.batch_stream(data, STEPS, batch_size=32, context=64, seed=0)
windows = chargpt.val_windows(data, 64, n=64 if QUICK else 256)
'''),
    md("""
## The drop-in face: SINGD for the layers, AdamW for the rest

`loss_average="batch+sequence"`: the loss is a mean over every position of every
window, and the statistics are scaled to match. Both runs start from the same weights
and see the same batches.
"""),
    code('''
def singd_and_adamw(model, structure="dense"):
    singd = sf.SINGD(model, lr=3e-2, damping=1e-3, lr_cov=1e-2, T=5, structures=structure,
                     loss_average="batch+sequence", warn_unsupported=False)
    mine = {id(p) for g in singd.param_groups for p in g["params"]}
    rest = [p for p in model.parameters() if id(p) not in mine]
    return [singd, torch.optim.AdamW(rest, lr=3e-3, weight_decay=0.0)]


curves = {}
for name, make in {
    "AdamW": lambda m: [torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)],
    "SINGD dense": singd_and_adamw,
    "SINGD block16diagonal": lambda m: singd_and_adamw(m, "block16diagonal"),
}.items():
    m = chargpt.make_model("nanogpt", len(data.vocab), seed=0)
    opts = make(m)
    curves[name] = chargpt.train_torch(m, opts, batches, windows, eval_every=max(1, STEPS // 6))
    state = sum(chargpt.tree_bytes(list(o.state.values())) for o in opts)
    print(f"{name:22s} val loss {curves[name].val[-1]:.4f}   state {state:,} bytes   "
          f"{curves[name].seconds:.1f} s")

fig, ax = plt.subplots(figsize=(6, 3.8))
for name, c in curves.items():
    ax.plot(c.steps, c.val, marker="o", label=name)
ax.set_xlabel("step"); ax.set_ylabel("validation loss (nats per byte)"); ax.grid(alpha=0.3)
ax.legend(); plt.show()
'''),
    md("""
## The pure core: three learning rates in one vmapped run

`core_optimizer` builds `sf.singd(..., fallback=sf.adamw(...))` and the capture; `sweep_core`
trains every member of `sf.grid(lr=...)` in ONE `torch.func.vmap`-ed run
(`sf.make_sweep`), same weights and batches. A member that diverges is stopped. The
`"singd"` label sweeps SINGD's lr only; a plain `sf.grid(lr=...)` would set the AdamW
fallback's lr to the same values.
"""),
    code('''
tx, capture, T = chargpt.core_optimizer(model, structures="dense", lr=3e-2)
members, _ = chargpt.sweep_core(model, tx, capture, T, {"singd": sf.grid(lr=[1e-2, 3e-2, 1e-1])},
                                batches, windows, eval_every=max(1, STEPS // 6))
for lr, c in zip([1e-2, 3e-2, 1e-1], members):
    print(f"lr {lr:g}: val loss {c.val[-1]:.4f}" + (" (diverged)" if c.diverged else ""))
'''),
    md("""
The full comparison (600 steps, two seeds, both model families, AdamW, Muon, SOAP and
four SINGD structures, each with a tuned learning rate) is
`python -m benchmarks.transformer_bench`; its results are in
`benchmarks/results/transformer_bench.md` and in the README.
"""),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_functional_api.ipynb": FUNCTIONAL,
    "03_sweep_grid.ipynb": SWEEP,
    "04_structures.ipynb": STRUCTURES,
    "05_gcn_karate_club.ipynb": GCN,
    "06_transformer.ipynb": TRANSFORMER,
}


def build(folder: Path = HERE) -> list[Path]:
    """Write every notebook into ``folder``; returns their paths."""
    paths = []
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells)
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        for i, cell in enumerate(nb.cells):
            cell["id"] = f"{Path(name).stem[:2]}-{i:02d}"  # stable ids: no diff noise on rebuild
        nbformat.validate(nb)
        path = folder / name
        nbformat.write(nb, path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in build():
        print("wrote", p.relative_to(HERE.parent))

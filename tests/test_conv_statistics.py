"""The convolution statistics' fast paths against the formulas they replace (issue 14).

- ``layers._patches`` (a strided view of the input and one copy) holds exactly the
  numbers of ``F.unfold``, for every conv setting;
- ``project_inner_gram(X X^T)`` equals ``project_inner(X)`` for every structure;
- ``layer_part`` of conv layers (Gram route for patches, copies only where needed)
  equals the pre-issue-14 formula: ``F.unfold`` rows copied to [R, d], the bias column
  appended, ``project_inner`` (float64, 1e-10), and the Gram route is really taken.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import singd_functional as sf
from benchmarks.conv_stats import legacy_patches as unfold_patches
from singd_functional import structures
from singd_functional.capture import LayerCapture
from singd_functional.layers import _patches
from singd_functional.statistics import _gram, layer_part, loss_scale
from tests.test_structures import CASES, IDS, close, random_member

CONV2D = [
    dict(kernel_size=k, stride=s, padding=p, dilation=d, groups=g, padding_mode=m)
    for k, s, p, d, g, m in itertools.product(
        [1, 3, (2, 3)], [1, 2, (1, 3)], [0, 1, "same", (2, 1)], [1, 2], [1, 2],
        ["zeros", "reflect", "circular"])
    if not (p == "same" and s != 1)
]


@pytest.mark.parametrize("batch", [0, 3])
def test_patches_equal_unfold_exactly_conv2d(batch):
    x = torch.randn(batch, 4, 9, 11, dtype=torch.float64)
    for kw in CONV2D:
        info = sf.find_layers(nn.Conv2d(4, 6, **kw).double())[0]
        assert torch.equal(_patches(info, x), unfold_patches(info, x)), kw


@pytest.mark.parametrize("kw", [dict(kernel_size=k, stride=s, padding=p, dilation=d)
                                for k, s, p, d in itertools.product(
                                    [1, 3], [1, 2], [0, 1, "same"], [1, 2])
                                if not (p == "same" and s != 1)])
def test_patches_equal_unfold_exactly_conv1d(kw):
    info = sf.find_layers(nn.Conv1d(4, 6, **kw))[0]
    x = torch.randn(3, 4, 13)
    assert torch.equal(_patches(info, x), unfold_patches(info, x))


@pytest.mark.parametrize("name,d", CASES, ids=IDS)
def test_project_inner_gram_equals_project_inner(name, d):
    gen = torch.Generator().manual_seed(d)
    T = structures.get(name)
    K = random_member(T, d, gen=gen)
    X = torch.randn(d, 3 * d + 2, dtype=torch.float64, generator=gen)
    close(K.project_inner_gram(X @ X.T).to_dense(), K.project_inner(X).to_dense(), 1e-10)


@pytest.mark.parametrize("layout", ["contiguous", "columns", "per-sample"])
@pytest.mark.parametrize("bias", [False, True])
def test_gram_of_rows_in_every_layout(layout, bias):
    N, S, d = 3, 5, 4
    base = torch.randn(N, S, d, dtype=torch.float64)
    rows = {"contiguous": base,
            "columns": base.permute(2, 0, 1).contiguous().permute(1, 2, 0),
            "per-sample": base.transpose(1, 2).contiguous().transpose(1, 2)}[layout]
    X = base.reshape(N * S, d)
    if bias:
        X = torch.cat([X, X.new_ones(N * S, 1)], 1)
    close(_gram(rows, bias), X.T @ X, 1e-12)


STRUCTURES = ["dense", "diagonal", "block3diagonal", "hierarchical3_2", "triltoeplitz",
              "triutoeplitz", "triltopleftdiag"]


def legacy_part(info, K, C, capture, kfac_approx, loss_average):
    """H_K, H_C of one call as main computed them before issue 14."""
    x, g = capture.inputs[0], capture.output_grads[0]
    a = unfold_patches(info, x).transpose(1, 2)
    g = g.flatten(2).transpose(1, 2)
    N, S = a.shape[0], a.shape[1]
    if kfac_approx == "expand":
        a, g = a.reshape(N * S, a.shape[-1]), g.reshape(N * S, g.shape[-1])
    else:
        a, g = a.mean(1), g.sum(1)
    if info.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
    H_K = K.project_inner(a.mT).scale(1.0 / a.shape[0])
    H_C = C.project_inner(g.mT).scale(loss_scale(loss_average, N, S))
    return H_K, H_C


def conv_capture(module, x):
    x = x.requires_grad_(False)
    out = module(x)
    g = torch.randn_like(out)
    return LayerCapture((x,), (g,))


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("conv", ["conv2d", "conv2d-nobias", "conv2d-strided", "conv1d"])
def test_conv_layer_part_equals_the_legacy_formula(structure, kfac_approx, conv, monkeypatch):
    torch.manual_seed(0)
    module, x = {
        "conv2d": (nn.Conv2d(3, 5, 3, padding=1), torch.randn(4, 3, 8, 8)),
        "conv2d-nobias": (nn.Conv2d(3, 5, 3, bias=False), torch.randn(4, 3, 8, 8)),
        "conv2d-strided": (nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2,
                                     padding_mode="reflect", padding=2),
                           torch.randn(4, 4, 11, 9)),
        "conv1d": (nn.Conv1d(3, 5, 3, padding=1), torch.randn(4, 3, 20)),
    }[conv]
    module, x = module.double(), x.double()
    info = sf.find_layers(module)[0]
    T = structures.get(structure)
    K, C = random_member(T, info.d_K), random_member(T, info.d_C)
    capture = conv_capture(module, x)
    grams = []
    original = T.project_inner_gram
    monkeypatch.setattr(T, "project_inner_gram",
                        lambda self, A: grams.append(A.shape) or original(self, A))
    part = layer_part(info, K, C, capture, kfac_approx=kfac_approx, loss_average="batch")
    H_K, H_C = legacy_part(info, K, C, capture, kfac_approx, "batch")
    close(part.stats.H_K.to_dense(), H_K.to_dense(), 1e-10)
    close(part.stats.H_C.to_dense(), H_C.to_dense(), 1e-10)
    # many more patches than d for "expand": both sides take the Gram, except for a
    # diagonal factor (its own sums of squares are cheaper); "reduce" has N rows
    expected = 2 if kfac_approx == "expand" and structure != "diagonal" else 0
    assert len(grams) == expected

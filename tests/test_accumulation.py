"""Gradient accumulation through the pure core (docs/algorithm.md#gradient-accumulation): k micro-batches == one batch.

Recipe: per micro-batch, layer_statistics(...) from its captures; combine with
statistics.accumulate(...); pass `statistics=` and the summed gradients to update.
"""

from __future__ import annotations

import pytest
import torch

import singd_functional as sf
from singd_functional.statistics import (
    LayerStatistics,
    StatisticsPart,
    accumulate,
    layer_part,
    layer_statistics,
)
from tests.models import make_batch, make_loss, make_model


@pytest.mark.parametrize("kfac_like", [False, True], ids=["singd", "ikfac"])
@pytest.mark.parametrize("loss_average", [None, "batch", "batch+sequence"])
@pytest.mark.parametrize("kind", ["cnn", "seq"])
def test_micro_batches_equal_one_batch(kfac_like, loss_average, kind):
    k = 4
    model = make_model(kind)
    layers = sf.find_layers(model)
    full_loss = make_loss(loss_average)
    tx = sf.singd(layers, lr=0.05, lr_cov=0.05, kfac_like=kfac_like, loss_average=loss_average,
                  structures=("dense", "hierarchical3_2"))
    params0 = {n: v.detach().clone() for n, v in model.named_parameters()}

    # one pass over the whole batch
    capture = sf.make_capture(model, full_loss, layers)
    params, state = dict(params0), tx.init(params0)
    for t in range(3):
        x, y = make_batch(kind, t, n=8)
        _, grads, caps = capture(params, x, y)
        updates, state = tx.update(grads, state, params, captures=caps)
        params = sf.apply_updates(params, updates)
    ref = params

    # k micro-batches, each loss scaled as PyTorch documents (mean losses / k)
    def micro_loss(out, y):
        return full_loss(out, y) / (1 if loss_average is None else k)

    capture = sf.make_capture(model, micro_loss, layers)
    params, state = dict(params0), tx.init(params0)
    for t in range(3):
        x, y = make_batch(kind, t, n=8)
        grads, parts = None, {info.name: [] for info in layers}
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            _, g, caps = capture(params, xs, ys)
            grads = g if grads is None else {n: grads[n] + g[n] for n in g}
            for info in layers:
                parts[info.name].append(layer_statistics(
                    info, *state.factors[info.name], caps[info.name],
                    loss_average=loss_average))
        stats = {n: accumulate(p, loss_average) for n, p in parts.items()}
        updates, state = tx.update(grads, state, params, statistics=stats)
        params = sf.apply_updates(params, updates)

    for n, p in params.items():
        err = (p - ref[n]).norm() / ref[n].norm()
        assert err < 1e-10, f"{n}: {err:.2e}"
        assert (p - params0[n]).abs().max() > 1e-4


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("kfac_like", [False, True], ids=["singd", "ikfac"])
@pytest.mark.parametrize("loss_average", [None, "batch", "batch+sequence"])
def test_unequal_micro_batches_equal_one_batch(loss_average, kfac_like, kfac_approx):
    """10 + 6 rows, each mean loss weighted n_i / N: the counts weigh the parts exactly."""
    sizes = (10, 6)
    model = make_model("seq")
    layers = sf.find_layers(model)
    full_loss = make_loss(loss_average)
    tx = sf.singd(layers, lr=0.05, lr_cov=0.05, kfac_like=kfac_like, loss_average=loss_average,
                  kfac_approx=kfac_approx, structures=("dense", "hierarchical3_2"))
    params0 = {n: v.detach().clone() for n, v in model.named_parameters()}

    capture = sf.make_capture(model, full_loss, layers)
    params, state = dict(params0), tx.init(params0)
    for t in range(3):
        x, y = make_batch("seq", t, n=sum(sizes))
        _, grads, caps = capture(params, x, y)
        updates, state = tx.update(grads, state, params, captures=caps)
        params = sf.apply_updates(params, updates)
    ref = params

    params, state = dict(params0), tx.init(params0)
    for t in range(3):
        x, y = make_batch("seq", t, n=sum(sizes))
        grads, parts = None, {info.name: [] for info in layers}
        for xs, ys in zip(x.split(sizes), y.split(sizes)):
            weight = 1.0 if loss_average is None else len(xs) / len(x)
            capture = sf.make_capture(model, lambda o, y, w=weight: full_loss(o, y) * w, layers)
            _, g, caps = capture(params, xs, ys)
            grads = g if grads is None else {n: grads[n] + g[n] for n in g}
            for info in layers:
                parts[info.name].append(layer_part(
                    info, *state.factors[info.name], caps[info.name],
                    kfac_approx=kfac_approx, loss_average=loss_average))
        stats = {n: accumulate(p, loss_average) for n, p in parts.items()}
        updates, state = tx.update(grads, state, params, statistics=stats)
        params = sf.apply_updates(params, updates)

    for n, p in params.items():
        err = (p - ref[n]).norm() / ref[n].norm()
        assert err < 1e-10, f"{n}: {err:.2e}"
        assert (p - params0[n]).abs().max() > 1e-4


def test_accumulate_skips_empty_parts_and_weighs_by_counts():
    H = sf.structures.Dense.eye(2, dtype=torch.float64)
    part = lambda s, rows, c: StatisticsPart(LayerStatistics(H.scale(s), H.scale(s)), rows, c)  # noqa: E731
    assert accumulate([part(1.0, 0, 0.0)], "batch") is None
    one = accumulate([part(3.0, 4, 4.0), part(100.0, 0, 0.0)], "batch")
    assert torch.equal(one.H_K.to_dense(), H.scale(3.0).to_dense())
    two = accumulate([part(1.0, 10, 10.0), part(2.0, 6, 6.0)], "batch")
    assert torch.allclose(two.H_K.to_dense(), H.scale((10 * 1 + 6 * 2) / 16).to_dense())
    assert torch.allclose(two.H_C.to_dense(), H.scale(16 / 10 * 1 + 16 / 6 * 2).to_dense())
    total = accumulate([part(1.0, 10, 1.0), part(2.0, 6, 1.0)], None)
    assert torch.allclose(total.H_C.to_dense(), H.scale(3.0).to_dense())

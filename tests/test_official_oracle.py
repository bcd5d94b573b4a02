"""Optional oracle: the official `singd` 0.0.5 package (skipped when it is absent).

Its known bugs (docs/algorithm.md#differences-from-the-official-package) are avoided:
no block-diagonal structures, one backward pass per step, float64 only for dense (it
crashes on structured float64), float32 otherwise with a float32 tolerance.
"""

from __future__ import annotations

import pytest
import torch

import singd_functional as sf
from tests.models import make_batch, make_loss, make_model

try:
    import singd.optim.optimizer as official
except ImportError as err:  # say loudly why the only external oracle did not run
    pytest.skip(
        f"the official oracle singd==0.0.5 is NOT installed ({type(err).__name__}: {err}); "
        "none of its comparisons ran. Install it with `pip install singd==0.0.5`",
        allow_module_level=True,
    )
pytestmark = pytest.mark.oracle

CONFIGS = [
    # (structures, dtype, extra hyperparameters)
    (("dense", "dense"), torch.float64, {}),
    (("dense", "dense"), torch.float64, {"kfac_like": True}),
    (("dense", "dense"), torch.float64, {"kfac_approx": "reduce", "normalize_lr_cov": True}),
    (("diagonal", "diagonal"), torch.float32, {}),
    (("hierarchical15_15", "hierarchical15_15"), torch.float32, {}),
    (("triltoeplitz", "triutoeplitz"), torch.float32, {}),
    (("dense", "triltoeplitz"), torch.float32, {"kfac_like": True}),
]


@pytest.mark.parametrize(("structures", "dtype", "extra"), CONFIGS, ids=lambda v: str(v))
@pytest.mark.parametrize("kind", ["wide", "cnn_sym"])
def test_trajectory_equals_official_package(structures, dtype, extra, kind):
    hp = dict(lr=0.05, momentum=0.9, damping=1e-3, alpha1=0.5, lr_cov=0.05, T=2, **extra)
    loss_fn = make_loss("batch")

    model = make_model(kind).to(dtype)
    opt = official.SINGD(model, structures=structures, warn_unsupported=False, **hp)
    for t in range(12):
        x, y = make_batch(kind, t)
        opt.zero_grad()
        loss_fn(model(x.to(dtype)), y).backward()
        opt.step()

    ref_model = make_model(kind).to(dtype)
    layers = sf.find_layers(ref_model)
    params = {k: v.detach().clone() for k, v in ref_model.named_parameters()}
    capture = sf.make_capture(ref_model, loss_fn, layers)
    T = hp.pop("T")
    tx = sf.singd(layers, structures=structures, **hp)
    state = tx.init(params)
    for t in range(12):
        x, y = make_batch(kind, t)
        _, grads, caps = capture(params, x.to(dtype), y)
        updates, state = tx.update(grads, state, params, captures=caps if t % T == 0 else None)
        params = sf.apply_updates(params, updates)

    tol = 1e-10 if dtype == torch.float64 else 2e-5
    start = make_model(kind).to(dtype).state_dict()
    for k, p in model.named_parameters():
        err = (params[k] - p.detach()).norm() / p.detach().norm()
        assert err <= tol, f"{k}: relative error {err:.2e}"
        assert (p.detach() - start[k]).abs().max() > 1e-4  # the run moved

"""First-order transforms (singd_functional/fallbacks.py) against torch.optim and
against references written here, with float and 0-d tensor hyperparameters."""

from __future__ import annotations

import pytest
import torch

import singd_functional as sf

STEPS = 6


def problem(seed=0):
    """Parameters and one gradient per step (float64), the same for every optimizer."""
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(4, 3, generator=g, dtype=torch.float64),
              "b": torch.randn(4, generator=g, dtype=torch.float64)}
    grads = [{k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in params.items()}
             for _ in range(STEPS)]
    return params, grads


def as_tensors(hp: dict) -> dict:
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in hp.items()}


def run_ours(tx, params, grads, per_call=None):
    state = tx.init(params)
    out = []
    for g in grads:
        kw = {} if per_call is None else {"hyperparams": per_call}
        updates, state = tx.update(g, state, params, **kw)
        params = sf.apply_updates(params, updates)
        out.append(params)
    return out


def run_torch(make_opt, params, grads):
    leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    opt = make_opt(list(leaves.values()))
    out = []
    for g in grads:
        for k, p in leaves.items():
            p.grad = g[k].clone()
        opt.step()
        out.append({k: p.detach().clone() for k, p in leaves.items()})
    return out


def assert_runs_equal(ours, ref, tol=1e-12):
    for t, (a, b) in enumerate(zip(ours, ref)):
        for k in b:
            assert torch.allclose(a[k], b[k], rtol=tol, atol=tol), f"step {t}, {k}"


SGD_CASES = [
    dict(lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=False),
    dict(lr=0.05, momentum=0.5, weight_decay=0.1, nesterov=False),
    dict(lr=0.05, momentum=0.8, weight_decay=0.01, nesterov=True),
    dict(lr=0.2, momentum=0.0, weight_decay=0.0, nesterov=False),
]


@pytest.mark.parametrize("case", SGD_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("kind", ["float", "tensor", "per_call"])
def test_sgd_matches_torch_sgd(case, kind):
    params, grads = problem()
    numeric = {k: v for k, v in case.items() if k != "nesterov"}
    ref = run_torch(lambda ps: torch.optim.SGD(ps, **case), params, grads)
    if kind == "float":
        ours = run_ours(sf.sgd(**case), params, grads)
    elif kind == "tensor":
        ours = run_ours(sf.sgd(**as_tensors(numeric), nesterov=case["nesterov"]), params, grads)
    else:  # built with other numbers, overridden by 0-d tensors at every call
        tx = sf.sgd(lr=1.0, momentum=0.1, weight_decay=0.3, nesterov=case["nesterov"])
        ours = run_ours(tx, params, grads, sf.HyperParams(**as_tensors(numeric)))
    assert_runs_equal(ours, ref)


ADAMW_CASES = [
    dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2),
    dict(lr=3e-2, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1),
]


@pytest.mark.parametrize("case", ADAMW_CASES, ids=["default", "other"])
@pytest.mark.parametrize("kind", ["float", "tensor", "per_call"])
def test_adamw_matches_torch_adamw(case, kind):
    params, grads = problem(1)
    ref = run_torch(
        lambda ps: torch.optim.AdamW(ps, lr=case["lr"], betas=(case["b1"], case["b2"]),
                                     eps=case["eps"], weight_decay=case["weight_decay"],
                                     foreach=False),
        params, grads,
    )
    if kind == "float":
        tx = sf.adamw(case["lr"], (case["b1"], case["b2"]), case["eps"], case["weight_decay"])
        ours = run_ours(tx, params, grads)
    elif kind == "tensor":
        t = as_tensors(case)
        ours = run_ours(sf.adamw(t["lr"], (t["b1"], t["b2"]), t["eps"], t["weight_decay"]),
                        params, grads)
    else:
        tx = sf.adamw(lr=1.0, betas=(0.5, 0.5), eps=1.0, weight_decay=0.0)
        ours = run_ours(tx, params, grads, sf.HyperParams(**as_tensors(case)))
    assert_runs_equal(ours, ref, 1e-11)


def reference_clip(updates, max_norm):
    """min(1, c / (||u|| + 1e-12)) u, with the norm as a sum of squares."""
    total = sum(float((u * u).sum()) for u in updates.values()) ** 0.5
    factor = min(1.0, max_norm / (total + 1e-12))
    return {k: u * factor for k, u in updates.items()}, total


@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # one that clips, one that must not
@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_clip_by_global_norm_against_a_reference(max_norm, kind):
    _, grads = problem(2)
    u = grads[0]
    ref, total = reference_clip(u, max_norm)
    assert (total > max_norm) == (max_norm == 0.5)  # the two cases are what they claim
    c = torch.tensor(max_norm, dtype=torch.float64) if kind == "tensor" else max_norm
    tx = sf.clip_by_global_norm(c)
    out, _ = tx.update(u, tx.init(u))
    for k in u:
        assert torch.allclose(out[k], ref[k], rtol=1e-13, atol=0)
    norm = sum(float((o * o).sum()) for o in out.values()) ** 0.5
    assert norm == pytest.approx(min(total, max_norm), rel=1e-12)
    # per call, 0-d tensor
    out2, _ = tx.update(u, (), hyperparams=sf.HyperParams(max_norm=torch.tensor(0.25)))
    ref2, _ = reference_clip(u, 0.25)
    for k in u:
        assert torch.allclose(out2[k], ref2[k].to(out2[k].dtype), rtol=1e-6, atol=0)


def reference_heavy_ball(params, grads, lr, momentum, weight_decay):
    """v <- m v + g + wd w; w <- w - lr v; written out here, independent of the package."""
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    p = dict(params)
    out = []
    for g in grads:
        v = {k: momentum * v[k] + g[k] + weight_decay * p[k] for k in p}
        p = {k: p[k] - lr * v[k] for k in p}
        out.append(p)
    return out


@pytest.mark.parametrize("kind", ["float", "tensor", "per_call"])
def test_trace_chain_is_heavy_ball(kind):
    params, grads = problem(3)
    hp = dict(lr=0.05, momentum=0.9, weight_decay=0.01)
    ref = reference_heavy_ball(params, grads, **hp)
    t = as_tensors(hp)
    if kind == "float":
        tx = sf.chain(sf.add_decayed_weights(0.01), sf.trace(0.9), sf.scale_by_learning_rate(0.05))
        ours = run_ours(tx, params, grads)
    elif kind == "tensor":
        tx = sf.chain(sf.add_decayed_weights(t["weight_decay"]), sf.trace(t["momentum"]),
                      sf.scale_by_learning_rate(t["lr"]))
        ours = run_ours(tx, params, grads)
    else:
        tx = sf.chain(sf.add_decayed_weights(0.5), sf.trace(0.1), sf.scale_by_learning_rate(1.0))
        ours = run_ours(tx, params, grads, sf.HyperParams(**t))
    assert_runs_equal(ours, ref)


def test_primitives_need_what_they_read():
    params, grads = problem()
    tx = sf.add_decayed_weights(0.1)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(grads[0], ())
    out, _ = sf.add_decayed_weights(0.0).update(grads[0], ())  # reads no parameters
    assert out is grads[0]
    with pytest.raises(ValueError, match="needs the parameters"):
        sf.adamw().update(grads[0], sf.adamw().init(params))
    tr = sf.trace(0.9)
    with pytest.raises(ValueError, match="re-run init"):
        tr.update({"w": grads[0]["w"], "b": torch.zeros(5)}, tr.init(params))
    with pytest.raises(ValueError, match="momentum must be >= 0"):
        sf.trace(-0.1)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        sf.sgd().update(grads[0], sf.sgd().init(params), params,
                        hyperparams=sf.HyperParams(lr=-1.0))


@pytest.mark.parametrize("numbers", ["float", "tensor", "zero decay", "gated"])
def test_the_in_place_helpers_equal_the_dict_helpers(numbers):
    """``_decayed_``, ``_heavy_ball_``, ``_descend_`` (the drop-in's plain step, in place)
    give the numbers of ``_decayed``, ``_heavy_ball``, ``_scaled`` and the update (the
    pure core) to a rounding; with a 0-d weight 0 (a skipped step) nothing changes."""
    from singd_functional.fallbacks import (
        _decayed,
        _decayed_,
        _descend_,
        _heavy_ball,
        _heavy_ball_,
        _scaled,
    )
    lr, momentum, weight_decay = 0.05, 0.9, (0.0 if numbers == "zero decay" else 1e-2)
    if numbers in ("tensor", "gated"):
        lr, momentum, weight_decay = (torch.tensor(v, dtype=torch.float64)
                                      for v in (lr, momentum, weight_decay))
    g = torch.Generator().manual_seed(3)
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-15)):
        params, grads, velocity = ({k: torch.randn(300, 7, generator=g).to(dtype)
                                    for k in ("w", "b")} for _ in range(3))
        keys = list(params)
        v_new = _heavy_ball(_decayed(grads, params, weight_decay, keys), velocity, momentum)
        p_new = {k: p + u for k, (p, u) in zip(keys, zip(params.values(),
                                                        _scaled(v_new, lr).values()))}

        for ok in ((True, False) if numbers == "gated" else (None,)):
            d = [grads[k].clone() for k in keys]
            v = [velocity[k].clone() for k in keys]
            p = [params[k].clone() for k in keys]
            buffers = list(v)
            _decayed_(d, p, weight_decay)
            weight = None if ok is None else torch.tensor(float(ok), dtype=dtype)
            m, rate = momentum, lr
            if ok is False:  # the gate of a skipped step (_step._gated)
                m, rate = torch.ones((), dtype=torch.float64), lr * 0
            _heavy_ball_(v, d, m, weight)
            _descend_(p, v, rate)
            for k, vk, pk, buffer in zip(keys, v, p, buffers):
                assert vk is buffer  # the velocity keeps its tensors
                if ok is False:
                    assert torch.equal(vk, velocity[k]) and torch.equal(pk, params[k]), k
                    continue
                for new, ref in ((vk, v_new[k]), (pk, p_new[k])):
                    err = ((new - ref).norm() / ref.norm()).item()
                    assert err < tol, (k, err)

"""The official package's names on the drop-in face, its warnings, and its checkpoints.

Each name is checked against our own state (views, not copies; read-only) and, where
``singd==0.0.5`` is installed (marker ``oracle``), against the official optimizer on
the same model and batches. The official package's known bugs (docs/algorithm.md#differences-from-the-official-package) are
avoided: no block-diagonal structures, one backward pass per step, float64 only for
dense factors (it crashes on structured float64).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import singd_functional as sf
from singd_functional import structures
from singd_functional._official_compat import _read_entries
from tests.models import make_batch, make_loss, make_model

try:
    from singd.optim.optimizer import SINGD as OfficialSINGD
except ImportError:  # the oracle tests skip
    OfficialSINGD = None

needs_official = pytest.mark.skipif(OfficialSINGD is None, reason="singd==0.0.5 not installed")

STRUCTURE_NAMES = [n for n in structures.VALID_NAMES if "{" not in n] + [
    "block3diagonal", "hierarchical2_3"]


def _train(opt, model, kind, steps, start=0, dtype=torch.float64):
    loss_fn = make_loss("batch")
    for t in range(start, start + steps):
        x, y = make_batch(kind, t)
        opt.zero_grad()
        loss_fn(model(x.to(dtype)), y).backward()
        opt.step()


def _backward(model, kind, t=0, dtype=torch.float64):
    x, y = make_batch(kind, t)
    make_loss("batch")(model(x.to(dtype)), y).backward()


# ------------------------------------------------------------------- the views
def test_views_are_our_state_and_read_only():
    model = make_model("mlp")
    opt = sf.SINGD(model, T=1)
    _train(opt, model, "mlp", 2)
    assert opt.steps == 2
    assert list(opt.module_names.values()) == ["0", "2", "4"]
    for module, name in opt.module_names.items():
        assert module is dict(model.named_modules())[name]
        st = opt.state[module.weight]
        for key, table in (("K", opt.Ks), ("C", opt.Cs), ("m_K", opt.m_Ks), ("m_C", opt.m_Cs)):
            assert table[name] is st[key]  # a view, not a copy
    with pytest.raises(AttributeError):
        opt.Ks = {}
    with pytest.raises(AttributeError):
        opt.steps = 0
    with pytest.raises(TypeError):
        opt.Ks["0"] = opt.Ks["2"]
    with pytest.raises(TypeError):
        opt.module_names[model[0]] = "x"
    # the official bookkeeping of loss scales, and its group lookup
    assert opt._grad_scales == {1: 1.0}
    assert opt._get_param_group_entry(model[2], "structures") == ("dense", "dense")
    assert opt.STATE_ATTRIBUTES == ("steps", "_grad_scales", "Ks", "Cs", "m_Ks", "m_Cs",
                                    "H_Ks", "H_Cs")
    for name in opt.STATE_ATTRIBUTES:
        getattr(opt, name)


def test_steps_follow_a_loaded_checkpoint():
    model = make_model("mlp")
    opt = sf.SINGD(model, T=2)
    _train(opt, model, "mlp", 3)
    other = sf.SINGD(model, T=2)
    assert other.steps == 0
    other.load_state_dict(opt.state_dict())
    assert other.steps == 3


def test_statistics_since_the_last_step():
    """H_Ks/H_Cs: the accumulated statistics the coming step will use; empty after it."""
    model = make_model("mlp")
    opt = sf.SINGD(model, T=1)
    assert len(opt.H_Ks) == len(opt.H_Cs) == 0
    x, y = make_batch("mlp", 0, n=8)
    loss_fn = make_loss("batch")
    for part in (slice(0, 4), slice(4, 8)):  # two equal micro-batches
        (loss_fn(model(x[part]), y[part]) / 2).backward()
    assert set(opt.H_Ks) == set(opt.H_Cs) == {"0", "2", "4"}
    pending = {n: (opt.H_Ks[n].to_dense(), opt.H_Cs[n].to_dense()) for n in opt.H_Ks}

    whole = make_model("mlp")
    whole_opt = sf.SINGD(whole, T=1)
    loss_fn(whole(x), y).backward()
    for name, (H_K, H_C) in pending.items():
        torch.testing.assert_close(H_K, whole_opt.H_Ks[name].to_dense(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(H_C, whole_opt.H_Cs[name].to_dense(), rtol=1e-12, atol=1e-14)
    opt.step()
    assert len(opt.H_Ks) == len(opt.H_Cs) == 0
    _backward(model, "mlp", 1)
    assert len(opt.H_Ks) == 3
    opt.zero_grad()
    assert len(opt.H_Ks) == 0


def test_no_momenta_views_without_alpha1():
    model = make_model("mlp")
    opt = sf.SINGD(model, alpha1=0.0, T=1)
    _train(opt, model, "mlp", 2)
    assert len(opt.m_Ks) == len(opt.m_Cs) == 0
    assert len(opt.Ks) == 3


def test_preconditioner_dims():
    cases = [
        (nn.Linear(5, 3), (6, 3)),
        (nn.Linear(5, 3, bias=False), (5, 3)),
        (nn.Conv2d(4, 6, (3, 2), groups=2), (2 * 3 * 2 + 1, 6)),
        (nn.Conv1d(4, 6, 3, bias=False), (12, 6)),
    ]
    for module, dims in cases:
        assert sf.SINGD.preconditioner_dims(module) == dims
    with pytest.raises(NotImplementedError, match="LayerNorm"):
        sf.SINGD.preconditioner_dims(nn.LayerNorm(3))
    opt = sf.SINGD(make_model("cnn"))
    for module, name in opt.module_names.items():
        assert opt.preconditioner_dims(module) == (opt.Ks[name].dim, opt.Cs[name].dim)


class Scaled(nn.Module):
    """A layer type of our own, registered below with the linear kind."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.bias = None

    def forward(self, x):
        return x @ self.weight.T


def test_supported_modules_follow_the_layer_registry():
    from singd_functional.layers import OPAQUE, layer_kind

    assert {nn.Linear, nn.Conv1d, nn.Conv2d} <= set(sf.SINGD.SUPPORTED_MODULES)
    assert isinstance(nn.MultiheadAttention(4, 2).out_proj, sf.SINGD.SUPPORTED_MODULES)
    with sf.register_layer_kind(Scaled, layer_kind("linear")):
        assert Scaled in sf.SINGD.SUPPORTED_MODULES
        assert sf.SINGD.preconditioner_dims(Scaled()) == (4, 3)
    assert Scaled not in sf.SINGD.SUPPORTED_MODULES
    with sf.register_layer_kind(Scaled, OPAQUE):  # opaque: a subtree that is no layer
        assert Scaled not in sf.SINGD.SUPPORTED_MODULES
    with pytest.raises(NotImplementedError, match="carries 2 layers"):
        sf.SINGD.preconditioner_dims(nn.MultiheadAttention(4, 2))
    with pytest.raises(NotImplementedError, match="Scaled"):
        sf.SINGD.preconditioner_dims(Scaled())


def test_class_attributes():
    assert sf.SINGD.SUPPORTED_LOSS_AVERAGE == (None, "batch", "batch+sequence")
    table = sf.SINGD.SUPPORTED_STRUCTURES
    assert list(table)[:6] == ["dense", "diagonal", "block30diagonal", "hierarchical15_15",
                               "triltoeplitz", "triutoeplitz"]
    for name in table:
        assert table[name] is structures.get(name)
        assert table[name].name == name
    assert "block8diagonal" in table and table["block8diagonal"].name == "block8diagonal"
    assert "dense8" not in table
    with pytest.raises(KeyError):
        table["dense8"]
    opt = sf.SINGD(make_model("mlp"), structures=("block30diagonal", "triutoeplitz"))
    for name in opt.module_names.values():
        assert isinstance(opt.Ks[name], table["block30diagonal"])
        assert isinstance(opt.Cs[name], table["triutoeplitz"])


@pytest.mark.parametrize("name", STRUCTURE_NAMES)
def test_named_tensors_and_shape(name):
    cls = structures.get(name)
    M = cls.eye(7, dtype=torch.float32)
    pairs = list(M.named_tensors())
    assert [n for n, _ in pairs] == list(cls._fields)
    assert all(t is leaf for (_, t), leaf in zip(pairs, M.leaves))
    assert M.shape == torch.Size((7, 7)) == M.to_dense().shape


@pytest.mark.parametrize("name", STRUCTURE_NAMES)
def test_read_entries_inverts_to_dense(name):
    """The checkpoint converter reads a (non-symmetric) matrix of the structure exactly."""
    cls = structures.get(name)
    gen = torch.Generator().manual_seed(0)
    for d in (1, 5, 9):
        template = cls.eye(d, dtype=torch.float64)
        M = cls(*(torch.randn(leaf.shape, generator=gen, dtype=torch.float64)
                  for leaf in template.leaves))
        back = _read_entries(cls, M.to_dense())
        assert back is not None and torch.equal(back.to_dense(), M.to_dense())
    if name != "dense":  # a full matrix is in no other structure
        assert _read_entries(cls, torch.randn(9, 9, generator=gen, dtype=torch.float64)) is None


# ---------------------------------------------------------------- the warnings
def test_kfac_like_with_alpha1_warns_and_reports_zero():
    with pytest.warns(UserWarning, match="kfac_like=True"):
        opt = sf.SINGD(make_model("mlp"), kfac_like=True, alpha1=0.5)
    assert opt.param_groups[0]["alpha1"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = sf.SINGD(make_model("mlp"), kfac_like=True, alpha1=0.0)
        opt = sf.SINGD(make_model("mlp"), alpha1=0.5)
    model = make_model("mlp")
    with pytest.warns(UserWarning, match="param group 1"):
        opt = sf.SINGD(model, params=[
            {"params": model[0].parameters()},
            {"params": list(model[2].parameters()) + list(model[4].parameters()),
             "kfac_like": True},
        ])
    assert [g["alpha1"] for g in opt.param_groups] == [0.5, 0.0]
    _train(opt, model, "mlp", 2)
    assert set(opt.m_Ks) == {"0"}


def test_first_grad_scale_far_from_init_grad_scale_warns():
    model = make_model("mlp")
    opt = sf.SINGD(model)
    (1e4 * make_loss("batch")(model(make_batch("mlp", 0)[0]), make_batch("mlp", 0)[1])).backward()
    with pytest.warns(UserWarning, match="init_grad_scale"):
        opt.set_current_grad_scale(1e4)
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.set_current_grad_scale(1e4)  # after step 0: no warning
        agreeing = sf.SINGD(make_model("mlp"), init_grad_scale=1e4)
        agreeing.set_current_grad_scale(1.5e4)  # within a factor of 2
        sf.SINGD(make_model("mlp")).set_current_grad_scale(1.0)


@pytest.mark.parametrize("init_grad_scale", [1.0, 2.0**12])
def test_the_grad_scaler_path_never_reads_the_scale_for_the_first_scale_check(init_grad_scale):
    """GradScaler's scale is a device tensor: comparing it with init_grad_scale on the host
    would synchronise (tests/test_optim_guard.py forbids that in a step), so only
    set_current_grad_scale (a number) is checked; the GradScaler path warns never."""
    model = make_model("mlp")
    opt = sf.SINGD(model, T=1, init_grad_scale=init_grad_scale)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = make_batch("mlp", 0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            scaler.scale(make_loss("batch")(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
    assert not [w for w in seen if "init_grad_scale" in str(w.message)]
    assert opt.steps == 2


@pytest.mark.oracle
@needs_official
@pytest.mark.parametrize("case", ["kfac_like", "grad_scale"])
def test_official_warns_in_the_same_cases(case):
    model = make_model("mlp")
    for cls in (OfficialSINGD, sf.SINGD):
        with pytest.warns(UserWarning):
            if case == "kfac_like":
                opt = cls(model, kfac_like=True, alpha1=0.5)
                assert opt.param_groups[0]["alpha1"] == 0
            else:
                cls(model).set_current_grad_scale(1e4)


# -------------------------------------------------------- against the official
@pytest.mark.oracle
@needs_official
@pytest.mark.parametrize(("structures_", "dtype", "extra"), [
    (("dense", "dense"), torch.float64, {}),
    (("diagonal", "triltoeplitz"), torch.float32, {}),
])
@pytest.mark.parametrize("kind", ["mlp", "cnn_sym"])
def test_views_equal_the_official_attributes(structures_, dtype, extra, kind):
    hp = dict(lr=0.05, lr_cov=0.05, T=1, structures=structures_, warn_unsupported=False,
              **extra)
    theirs_model, ours_model = make_model(kind).to(dtype), make_model(kind).to(dtype)
    theirs, ours = OfficialSINGD(theirs_model, **hp), sf.SINGD(ours_model, **hp)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    for t in range(4):
        for opt, model in ((theirs, theirs_model), (ours, ours_model)):
            opt.zero_grad()
            _backward(model, kind, t, dtype)
        # statistics of the one backward pass, before the step
        assert set(theirs.H_Ks) == set(ours.H_Ks) and set(theirs.H_Cs) == set(ours.H_Cs)
        for name in theirs.H_Ks:
            torch.testing.assert_close(ours.H_Ks[name].to_dense(),
                                       theirs.H_Ks[name].to_dense(), **tol)
            torch.testing.assert_close(ours.H_Cs[name].to_dense(),
                                       theirs.H_Cs[name].to_dense(), **tol)
        theirs.step()
        ours.step()
        assert ours.steps == theirs.steps == t + 1
        assert ours._grad_scales == theirs._grad_scales
        assert list(ours.module_names.values()) == list(theirs.module_names.values())
        for m_ours, m_theirs in zip(ours.module_names, theirs.module_names):
            assert type(m_ours) is type(m_theirs)
            assert ours.preconditioner_dims(m_ours) == theirs.preconditioner_dims(m_theirs)
        for table in ("Ks", "Cs", "m_Ks", "m_Cs"):
            mine, official = getattr(ours, table), getattr(theirs, table)
            assert set(mine) == set(official)
            for name in official:
                torch.testing.assert_close(mine[name].to_dense(), official[name].to_dense(),
                                           **tol)
                assert {t.dtype for _, t in mine[name].named_tensors()} == \
                    {t.dtype for _, t in official[name].named_tensors()}
        assert len(ours.H_Ks) == len(theirs.H_Ks) == 0


@pytest.mark.oracle
@needs_official
def test_class_attributes_cover_the_official_ones():
    assert sf.SINGD.SUPPORTED_LOSS_AVERAGE == OfficialSINGD.SUPPORTED_LOSS_AVERAGE
    assert list(sf.SINGD.STATE_ATTRIBUTES) == OfficialSINGD.STATE_ATTRIBUTES
    assert set(OfficialSINGD.SUPPORTED_MODULES) <= set(sf.SINGD.SUPPORTED_MODULES)
    assert set(OfficialSINGD.SUPPORTED_STRUCTURES) <= set(sf.SINGD.SUPPORTED_STRUCTURES)


# --------------------------------------------------------- official checkpoints
def _official_checkpoint(opt) -> dict:
    """What a user gets back from torch.save(opt.state_dict()) and torch.load."""
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


RESUME = [
    # (kind, structures, dtype, extra, N official steps, M of ours)
    ("mlp", ("dense", "dense"), torch.float64, {"T": 1}, 3, 4),
    ("cnn_sym", ("dense", "dense"), torch.float64, {"T": 3}, 4, 5),
    ("mlp", ("dense", "dense"), torch.float64, {"T": 2, "kfac_like": True, "alpha1": 0.0}, 3, 4),
    ("wide", ("hierarchical15_15", "triutoeplitz"), torch.float32, {"T": 2}, 5, 4),
    ("cnn_sym", ("diagonal", "dense"), torch.float32, {"T": 1, "momentum": 0.0}, 2, 3),
]


@pytest.mark.oracle
@needs_official
@pytest.mark.parametrize(("kind", "structures_", "dtype", "extra", "N", "M"), RESUME,
                         ids=lambda v: str(v))
@pytest.mark.parametrize("route", ["convert", "load_state_dict"])
def test_continue_an_official_run(kind, structures_, dtype, extra, N, M, route):
    """N official steps, then M of ours from its checkpoint == N + M official steps."""
    hp = dict(lr=0.05, lr_cov=0.05, damping=1e-3, weight_decay=1e-2, structures=structures_,
              warn_unsupported=False, **extra)

    reference = make_model(kind).to(dtype)
    ref_opt = OfficialSINGD(reference, **hp)
    _train(ref_opt, reference, kind, N + M, dtype=dtype)

    model = make_model(kind).to(dtype)
    official = OfficialSINGD(model, **hp)
    _train(official, model, kind, N, dtype=dtype)
    checkpoint = _official_checkpoint(official)
    kept = copy.deepcopy(checkpoint)
    model_state = copy.deepcopy(model.state_dict())

    resumed = make_model(kind, seed=1).to(dtype)  # other weights until the model loads
    resumed.load_state_dict(model_state)
    ours = sf.SINGD(resumed, **hp)
    if route == "convert":
        ours.load_state_dict(sf.from_official_state_dict(checkpoint, ours))
    else:
        ours.load_state_dict(checkpoint)
    assert ours.steps == N
    for name, K in official.Ks.items():
        assert torch.equal(ours.Ks[name].to_dense(), K.to_dense())
        assert torch.equal(ours.Cs[name].to_dense(), official.Cs[name].to_dense())
    assert set(ours.m_Ks) == set(official.m_Ks)
    _train(ours, resumed, kind, M, start=N, dtype=dtype)

    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for (k, p), q in zip(resumed.named_parameters(), reference.parameters()):
        err = (p.detach() - q.detach()).norm() / q.detach().norm()
        assert err <= tol, f"{k}: relative error {err:.2e}"
    for name, K in ref_opt.Ks.items():
        err = (ours.Ks[name].to_dense() - K.to_dense()).norm() / K.to_dense().norm()
        assert err <= tol, f"K of {name}: relative error {err:.2e}"
    # the argument is not modified
    assert checkpoint.keys() == kept.keys() and checkpoint["steps"] == kept["steps"]
    assert all(torch.equal(checkpoint["Ks"][n].to_dense(), kept["Ks"][n].to_dense())
               for n in kept["Ks"])


@pytest.mark.oracle
@needs_official
def test_official_checkpoint_that_does_not_fit():
    model = make_model("mlp")
    official = OfficialSINGD(model, T=1, structures=("diagonal", "dense"))
    _train(official, model, "mlp", 1)
    checkpoint = _official_checkpoint(official)

    refusing = sf.SINGD(model, structures=("dense", "dense"))
    with pytest.raises(ValueError, match="structures=.'diagonal', 'dense'. in the official"):
        refusing.load_state_dict(checkpoint)
    assert refusing.steps == 0  # nothing changed
    assert all(torch.equal(K.to_dense(), torch.eye(K.dim, dtype=K.dtype))
               for K in refusing.Ks.values())
    with pytest.raises(ValueError, match="has no m_K here"):
        sf.SINGD(model, structures=("diagonal", "dense"), alpha1=0.0).load_state_dict(checkpoint)
    with pytest.raises(ValueError, match="param groups"):
        sf.SINGD(model, params=model[0].parameters()).load_state_dict(checkpoint)
    with pytest.raises(ValueError, match="not a state dict"):
        sf.from_official_state_dict({"state": {}, "param_groups": []}, sf.SINGD(model))

    _backward(model, "mlp", 1)  # statistics pending
    with pytest.raises(ValueError, match="after opt.step"):
        sf.from_official_state_dict(_official_checkpoint(official),
                                    sf.SINGD(model, structures=("diagonal", "dense")))


@pytest.mark.oracle
@needs_official
def test_official_checkpoints_need_weights_only_false():
    """What the docstring says: the official package pickles its matrices."""
    model = make_model("mlp")
    official = OfficialSINGD(model, T=1)
    _train(official, model, "mlp", 1)
    buffer = io.BytesIO()
    torch.save(official.state_dict(), buffer)
    buffer.seek(0)
    with pytest.raises(Exception, match="weights_only"):
        torch.load(buffer, weights_only=True)

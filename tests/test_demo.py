"""`make demo` (singd_functional.demo) in a tiny configuration: it runs, reports, plots."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from singd_functional import demo  # noqa: E402


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        demo.parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--epochs", "--structures", "--device", "--out", "--seed", "--quick",
                   "--transformer-steps", "--transformer-structure"):
        assert option in out, option


def test_quick_run_writes_table_and_plots(tmp_path, capsys):
    out = tmp_path / "results"
    args = ["--epochs", "1", "--quick", "--out", str(out), "--structures", "dense,diagonal"]
    assert demo.main(args) == 0
    printed = capsys.readouterr().out

    for name in ("SINGD (dense)", "SINGD (diagonal)", "AdamW", "SGD (momentum)"):
        assert name in printed, name
    for column in ("test acc", "test loss", "wall time", "state bytes"):
        assert column in printed, column
    assert "8 runs in one vmapped run" in printed
    assert str(out) in printed

    for name in ("curves.png", "sweep.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    results = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in results["runs"]}
    assert set(runs) == {"SINGD (dense)", "SINGD (diagonal)", "AdamW", "SGD (momentum)"}
    for r in runs.values():
        assert len(r["test_acc"]) == 1 and 0.0 <= r["test_acc"][0] <= 1.0
        assert r["state_bytes"] > 0 and r["wall_time"] > 0
    # dense factors hold more than diagonal ones; SGD keeps one buffer per parameter
    n_params = sum(p.numel() for p in demo.make_model(0).parameters())
    assert runs["SINGD (dense)"]["state_bytes"] > runs["SINGD (diagonal)"]["state_bytes"]
    assert runs["SGD (momentum)"]["state_bytes"] == 4 * n_params
    assert runs["AdamW"]["state_bytes"] >= 8 * n_params
    assert len(results["sweep"]["lrs"]) == 8

    # the character transformer: SINGD dense, SINGD block16diagonal, AdamW, same batches
    gpt = {r["name"]: r for r in results["transformer"]["runs"]}
    assert list(gpt) == ["SINGD (dense)", "SINGD (block16diagonal)", "AdamW"]
    for r in gpt.values():
        assert r["steps"][-1] == 10 and len(r["val_loss"]) == len(r["steps"]) >= 2
        assert r["val_loss"][-1] < r["val_loss"][0] + 0.5
    assert gpt["SINGD (dense)"]["state_bytes"] > gpt["SINGD (block16diagonal)"]["state_bytes"]
    assert "Character transformer" in printed and "validation" in printed
    data = (out / "transformer.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_transformer_part_can_be_skipped(tmp_path, capsys):
    out = tmp_path / "results"
    args = ["--epochs", "1", "--quick", "--out", str(out), "--structures", "diagonal",
            "--sweep-size", "0", "--transformer-steps", "0"]
    assert demo.main(args) == 0
    assert "Character transformer" not in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["transformer"] is None
    assert not (out / "transformer.png").exists()


def test_transformer_drop_in_trains_every_parameter():
    """SINGD takes the nn.Linear layers, AdamW exactly the rest (embeddings, norms)."""
    from singd_functional.examples import chargpt

    model = chargpt.make_model("nanogpt", 50, layers=1, width=16, context=8)
    singd, adamw = demo.gpt_optimizers(model, "diagonal")
    mine = [p for g in singd.param_groups for p in g["params"]]
    rest = [p for g in adamw.param_groups for p in g["params"]]
    linear = [p for m in model.modules() if isinstance(m, torch.nn.Linear)
              for p in (m.weight, m.bias)]
    assert {id(p) for p in linear} <= {id(p) for p in mine}  # every linear map, and with
    assert len(mine) >= 2 * 5  # main's kinds the embeddings too
    assert {id(p) for p in mine}.isdisjoint(id(p) for p in rest)
    assert len(mine) + len(rest) == len(list(model.parameters()))


def test_same_seed_same_numbers():
    data = demo.load_digits(3, torch.device("cpu"), quick=True)
    factory = demo.optimizers([("diagonal", "diagonal")])["SINGD (diagonal)"]
    kwargs = dict(epochs=1, batch_size=64, seed=3, device=torch.device("cpu"))
    a = demo.train("a", factory, data, **kwargs)
    b = demo.train("b", factory, data, **kwargs)
    assert a.train_loss == b.train_loss and a.test_loss == b.test_loss


def test_sweep_members_are_independent_runs():
    data = demo.load_digits(0, torch.device("cpu"), quick=True)
    kwargs = dict(structure=("diagonal", "diagonal"), epochs=1, batch_size=64, seed=0,
                  device=torch.device("cpu"))
    result = demo.sweep_lrs(data, size=2, **kwargs)
    assert result.lrs == pytest.approx([demo.SWEEP_LRS[0], demo.SWEEP_LRS[1]])
    assert len(result.test_loss) == 2 and result.test_loss[0] != result.test_loss[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--structures", "dense,nonsense"], "unknown structure 'nonsense'"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--device", "tpu"], "expected 'cpu', 'cuda' or 'cuda:N'"),
        (["--transformer-steps", "-1"], "--transformer-steps must be >= 0"),
        (["--transformer-structure", "tril"], "unknown structure 'tril'"),
    ],
)
def test_bad_options_are_explained(argv, message, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_asked_without_cuda_says_so(capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_structure_pairs():
    assert demo.parse_structures("dense, diagonal,dense:block8diagonal") == [
        ("dense", "dense"), ("diagonal", "diagonal"), ("dense", "block8diagonal"),
    ]

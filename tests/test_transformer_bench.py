"""benchmarks/transformer_bench.py (quick, tiny), its resumable record and the README table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from benchmarks import transformer_bench as tb  # noqa: E402
from benchmarks import transformer_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--quick", "--models", "nanogpt", "--structures", "dense,diagonal", "--width", "16",
        "--context", "8", "--layers", "1", "--budget", "20000", "--no-soap"]


def test_quick_run_reports_and_resumes(tmp_path, capsys):
    out = tmp_path / "tb"
    assert tb.main([*TINY, "--out", str(out)]) == 0
    lines = out.with_suffix(".jsonl").read_text().splitlines()
    result = json.loads(out.with_suffix(".json").read_text())
    entry = result["models"]["nanogpt"]
    assert set(entry["optimizers"]) == {"AdamW", "Muon", "SINGD dense", "SINGD diagonal"}
    for name, o in entry["optimizers"].items():
        assert set(o["val"]) == {"0", "1"}, name
        assert all(math.isfinite(v) for v in o["val"].values()), name
        assert o["state_bytes"] > 0
    timing = entry["timing"]
    assert timing["AdamW"]["ratio_to_adamw"] == 1.0 and timing["SINGD dense"]["seconds"] > 0
    dense, diagonal = (entry["optimizers"][f"SINGD {s}"]["state_bytes"]
                       for s in ("dense", "diagonal"))
    assert dense > diagonal
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "| nanogpt | SINGD dense |" in out.with_suffix(".md").read_text()
    # a second run finds every training run in the jsonl and trains nothing again
    capsys.readouterr()
    assert tb.main([*TINY, "--out", str(out)]) == 0
    assert out.with_suffix(".jsonl").read_text().splitlines() == lines
    printed = capsys.readouterr().out
    assert ": val " not in printed and "sweep lr" not in printed and "timing" not in printed


def test_unknown_structure_is_refused(capsys):
    with pytest.raises(SystemExit):
        tb.parse_args(["--structures", "dense,tril"])
    assert "unknown 'tril'" in capsys.readouterr().err


def test_readme_table_is_generated_from_the_committed_results():
    result = json.loads((tb.RESULTS / "transformer_bench.json").read_text())
    text = (ROOT / "README.md").read_text()
    assert transformer_table.rewrite(text, result) == text, (
        "README.md's transformer table is stale: run python -m benchmarks.transformer_table"
    )
    assert "| nanogpt | AdamW |" in text


def test_rewrite_needs_the_markers():
    with pytest.raises(ValueError, match="transformer-table:start"):
        transformer_table.rewrite("no markers", {"config": "", "models": {}})


def test_make_bench_times_the_character_gpt():
    """benchmarks/run.py (make bench) has the character GPT: SINGD per structure, official."""
    import argparse

    from benchmarks import models, run

    args = argparse.Namespace(quick=False, no_compile=True, models=["chargpt"], structures=None,
                              budget_scale=1.0)
    groups = run.plan(args)
    assert [g["T"] for g in groups] == [10, 1]
    assert groups[0]["structures"] == run.STRUCTURES and "official" in groups[0]["impls"]
    (x, y), = models.batches("chargpt", 1)
    assert x.shape == y.shape == (32, 64)
    model = models.build("chargpt")
    assert models.loss_fn(model(x), y).ndim == 0

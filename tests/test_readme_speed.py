"""README's speed section is generated: it must be what benchmarks/readme_speed.py makes of
the result file it names (rerun ``python -m benchmarks.readme_speed FILE`` after a run)."""

from __future__ import annotations

import json

from benchmarks import readme_speed


def test_readme_speed_region_matches_its_results():
    found = readme_speed.region(readme_speed.README.read_text())
    assert found is not None, "README.md lost its speed region markers"
    source, text = found
    data = json.loads((readme_speed.ROOT / source).read_text())
    assert text == readme_speed.section(data, source), (
        f"README's speed section differs from {source}: run "
        f"`python -m benchmarks.readme_speed {source}`"
    )


def test_section_shows_every_target_and_structure():
    data = json.loads((readme_speed.ROOT / "benchmarks/results/bench_quick.json").read_text())
    text = readme_speed.section(data, "x.json")
    for t in data["targets"]:
        assert t["target"] in text
    structures = {r["structure"] for g in data["groups"] for r in g["rows"]
                  if r["structure"] and r["method"] == "singd"}
    for s in structures:
        assert f"| {s} |" in text

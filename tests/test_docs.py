"""The repository documents itself: every ``*.md`` reference resolves inside it.

Docstrings, tests, notebooks and benchmarks name markdown files (``docs/algorithm.md``
with a section anchor, ``benchmarks/README.md``, ...). Each reference must name a file
of this repository (relative to the referring file or to the repository root), and an
anchor ``#section`` must be a heading of that file, slugged as the docs site slugs it.
Nothing may point outside the repository to the team's shared folder. (The pages in
``docs/`` are checked by ``mkdocs build --strict``.)
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# docs/ itself is checked by `mkdocs build --strict` (make docs), which also knows the
# pages that docs/hooks.py generates
SCANNED = ("singd_functional", "tests", "notebooks", "benchmarks")
SUFFIXES = {".py", ".md", ".ipynb", ".toml", ".yml", ".yaml", ".txt"}
_URL = re.compile(r"[a-z]+://\S+")
_REF = re.compile(r"(?<![\w./-])((?:\.{1,2}/)*[\w./-]*\w\.md)(#[\w-]+)?")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
# the shared folder's name, spelled so that this file does not contain it
_SHARED = ("..", "/shared")


def slug(heading: str) -> str:
    """The anchor mkdocs (python-markdown's toc) gives a heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(md: Path) -> set[str]:
    text = _FENCE.sub("", md.read_text(encoding="utf-8"))
    return {slug(h) for h in _HEADING.findall(text)}


def scanned_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for top in SCANNED:
        files += [p for p in sorted((ROOT / top).rglob("*")) if p.suffix in SUFFIXES]
    return [p for p in files if p.is_file() and ".ipynb_checkpoints" not in p.parts]


def references(path: Path) -> list[tuple[str, str | None]]:
    text = _URL.sub("", path.read_text(encoding="utf-8"))
    return [(m[1], m[2][1:] if m[2] else None) for m in _REF.finditer(text)]


def resolve(path: Path, ref: str) -> Path | None:
    """The file ``ref`` names from ``path``, if it exists inside the repository.

    A path resolves relative to the referring file or to the repository root; a bare
    file name (prose such as "the targets table in bench.md") also resolves to the one
    file of that name in the repository.
    """
    for base in (path.parent, ROOT):
        target = (base / ref).resolve()
        if target.is_file() and target.is_relative_to(ROOT):
            return target
    if "/" not in ref:
        same_name = [p for p in scanned_files() if p.name == ref]
        if len(same_name) == 1:
            return same_name[0]
    return None


def broken_references() -> list[str]:
    broken = []
    for path in scanned_files():
        if path == Path(__file__).resolve():
            continue
        for ref, anchor in references(path):
            where = f"{path.relative_to(ROOT)}: {ref}{'#' + anchor if anchor else ''}"
            target = resolve(path, ref)
            if target is None:
                broken.append(f"{where} (no such file in the repository)")
            elif anchor is not None and anchor not in anchors(target):
                broken.append(f"{where} (no heading with that anchor in {ref})")
    return broken


def test_every_markdown_reference_resolves_inside_the_repository():
    broken = broken_references()
    assert not broken, "broken *.md references:\n  " + "\n  ".join(broken)


def test_nothing_refers_to_the_shared_folder():
    needle = "".join(_SHARED)
    hits = [
        str(p.relative_to(ROOT))
        for p in [*scanned_files(), ROOT / "Makefile", ROOT / "pyproject.toml", ROOT / "mkdocs.yml"]
        if p.is_file() and p != Path(__file__).resolve() and needle in p.read_text(encoding="utf-8")
    ]
    assert not hits, f"files refer to {needle!r} (outside the repository): {hits}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("## Differences from the official package", "differences-from-the-official-package"),
        ("## `loss_average` and c", "loss_average-and-c"),
        ("# Which structure, which T?", "which-structure-which-t"),
    ],
)
def test_slug_matches_the_site(text, expected):
    assert slug(text.lstrip("# ")) == expected


def test_the_checker_sees_a_broken_reference(tmp_path):
    """The scanner finds references in docstrings and rejects a missing file / anchor."""
    src = tmp_path / "mod.py"
    src.write_text('"""See ALGORITHM.md and docs/algorithm.md#no-such-section."""\n')
    refs = references(src)
    assert refs == [("ALGORITHM.md", None), ("docs/algorithm.md", "no-such-section")]
    assert resolve(src, "ALGORITHM.md") is None
    assert resolve(src, "bench.md") == ROOT / "benchmarks" / "results" / "bench.md"
    target = resolve(src, "docs/algorithm.md")
    assert target is not None and "no-such-section" not in anchors(target)
    assert "gradient-accumulation" in anchors(target)


_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


@pytest.mark.parametrize("page", ["getting-started.md"])
def test_docs_code_blocks_run(page, tmp_path, monkeypatch):
    """The getting-started page's examples run as printed, each in a fresh namespace."""
    blocks = _PYTHON_BLOCK.findall((ROOT / "docs" / page).read_text(encoding="utf-8"))
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        namespace: dict = {"__name__": "__docs__"}
        exec(compile(code, page, "exec"), namespace)
        if "loss" in namespace:  # the training examples: from 1.12 to 1.17 at the start
            assert namespace["loss"].item() < 1.05
        if "losses" in namespace:  # the sweep: every member trains, none diverges
            assert not namespace["state"].diverged.any()
            assert (namespace["losses"][-1] < namespace["losses"][0]).all()

"""Every ```python block of README.md runs, each in a fresh namespace.

A block may be marked by an HTML comment on the line right before its fence:
``<!-- readme-test: skip ... -->`` (never run here, e.g. the torchrun script) or
``<!-- readme-test: slow -->`` (run only with ``-m slow``, e.g. torch.compile).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(
    r"(?:<!--\s*readme-test:\s*(?P<mark>\w+)[^>]*-->\s*\n)?```python\n(?P<code>.*?)```",
    re.DOTALL,
)


def _blocks():
    text = README.read_text()
    out = []
    for m in _BLOCK.finditer(text):
        line = text.count("\n", 0, m.start("code")) + 1
        out.append((line, m["mark"], m["code"]))
    return out


BLOCKS = _blocks()


def _params():
    for line, mark, code in BLOCKS:
        marks = [pytest.mark.slow] if mark == "slow" else []
        if mark == "skip":
            marks.append(pytest.mark.skip(reason="marked readme-test: skip"))
        # leading newlines: a traceback names the README's own line numbers
        yield pytest.param("\n" * (line - 1) + code, id=f"line{line}", marks=marks)


def test_readme_has_runnable_blocks():
    assert len(BLOCKS) >= 6
    assert sum(mark is None for _, mark, _ in BLOCKS) >= 5
    for _, mark, _ in BLOCKS:
        assert mark in (None, "skip", "slow"), f"unknown readme-test mark {mark!r}"


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    assert text.index("make demo") < text.index("## Quick start")


@pytest.mark.parametrize("code", _params())
def test_readme_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


@pytest.mark.slow
def test_readme_torchrun_script(tmp_path):
    """The skipped DDP block, run as the README says: torchrun with two processes."""
    import shutil
    import subprocess
    import sys

    [code] = [code for _, mark, code in BLOCKS if mark == "skip" and "torch.distributed" in code]
    (tmp_path / "train.py").write_text(code)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    out = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "train.py"],  # --standalone: a free port
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loss on rank 0's shard" in out.stdout

"""Every ```python block of README.md runs, each in a fresh namespace.

A block may be marked by an HTML comment on the line right before its fence:
``<!-- readme-test: skip ... -->`` (never run here, e.g. the torchrun script) or
``<!-- readme-test: slow -->`` (run only with ``-m slow``, e.g. torch.compile). The
default suite still traces the slow blocks with dynamo's "eager" backend and runs the
torchrun block as a world of one process.
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


@pytest.mark.parametrize("code", [c for _, mark, c in BLOCKS if mark == "slow"])
def test_readme_slow_block_traces(code, tmp_path, monkeypatch):
    """Default suite: the slow (torch.compile) blocks with dynamo's "eager" backend, which
    traces the same graph (fullgraph included) but skips inductor's code generation."""
    import torch

    real = torch.compile

    def traced_only(*args, **kwargs):
        return real(*args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", traced_only)
    monkeypatch.chdir(tmp_path)
    torch._dynamo.reset()
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    torch._dynamo.reset()


def test_readme_torchrun_script_in_one_process(tmp_path, monkeypatch, capsys):
    """Default suite: the torchrun block as a world of one process (gloo, in this
    process); the slow test below runs it with two."""
    import socket

    import torch.distributed as dist

    [code] = [code for _, mark, code in BLOCKS if mark == "skip" and "torch.distributed" in code]
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                           WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert "loss on rank 0's shard" in capsys.readouterr().out


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

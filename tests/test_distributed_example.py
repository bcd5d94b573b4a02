"""singd_functional/examples/distributed_train.py: every mode trains the same run.

Two gloo processes per mode (the launcher of tests/_multiprocess.py stands in for
torchrun); the global loss curves of DDP, unwrapped, DDP with split_work and FSDP2 agree
up to float32 rounding, and an FSDP2 run resumed from its distributed checkpoint
continues bit-identically.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile

import pytest

from tests._multiprocess import run

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "..", "singd_functional", "examples", "distributed_train.py")


def _example():
    spec = importlib.util.spec_from_file_location("distributed_train", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(rank, world, argv):
    example = _example()
    return example.train(example.parse(argv))


@functools.cache
def _curve(*argv):
    return run(functools.partial(_train, argv=list(argv)), 2)[0]


@pytest.mark.parametrize("mode", [("--mode", "unwrapped"), ("--mode", "ddp", "--split-work"),
                                  ("--mode", "fsdp2")])
def test_modes_train_the_same_run(mode):
    common = ("--steps", "6", "--T", "2")
    ref, got = _curve("--mode", "ddp", *common), _curve(*mode, *common)
    assert ref[-1] < ref[0], "the run did not learn"
    assert got == pytest.approx(ref, rel=1e-4)


def test_fsdp2_resumes_from_its_checkpoint():
    common = ("--mode", "fsdp2", "--T", "2", "--save-every", "4")
    with tempfile.TemporaryDirectory() as path:
        first = _curve(*common, "--steps", "4", "--checkpoint", path)
        resumed = _curve(*common, "--steps", "6", "--checkpoint", path)
    straight = _curve(*common, "--steps", "6")
    assert len(first) == 4 and len(resumed) == 2
    assert first + resumed == straight

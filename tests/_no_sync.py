"""A CPU-side detector of host synchronisation: tensor -> Python conversions raise.

On a GPU, ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``t.tolist()`` (and
``if t:``) wait for the device. On the CPU nothing waits, so these tests make every
such conversion raise inside the code under test instead.
"""

from __future__ import annotations

import contextlib

import torch

_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__")


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def no_host_sync():
    """Inside the block, converting any tensor to a Python value raises :class:`HostSync`."""
    saved = {m: getattr(torch.Tensor, m) for m in _METHODS}

    def raiser(name):
        def method(self, *args, **kwargs):
            raise HostSync(f"Tensor.{name} called: a host synchronisation on a GPU")
        return method

    try:
        for m in _METHODS:
            setattr(torch.Tensor, m, raiser(m))
        yield
    finally:
        for m, f in saved.items():
            setattr(torch.Tensor, m, f)


"""Structured matrices for the SINGD factors K, C and their momenta.

One pytree type per structure of docs/algorithm.md#structures, found by name with :func:`get`::

    from singd_functional import structures
    T = structures.get("block30diagonal")
    K = T.eye(100)                      # identity, stored as 3 blocks of 30 + one of 10
    H = T.from_dense(M)                 # the projection Pi(M) of a symmetric M
    K.to_dense()                        # the d x d tensor, for tests

Names: ``dense``, ``diagonal``, ``block{B}diagonal`` (B >= 1), ``hierarchical{K1}_{K2}``
(K1, K2 >= 1), ``triltoeplitz``, ``triutoeplitz``, ``triltopleftdiag``,
``trilbottomrightdiag``, ``triutopleftdiag``, ``triubottomrightdiag``.
"""

from __future__ import annotations

import re

from ._base import StructuredMatrix
from .arrowhead import (
    TrilBottomRightDiag,
    TrilTopLeftDiag,
    TriuBottomRightDiag,
    TriuTopLeftDiag,
)
from .block_diagonal import BlockDiagonal
from .dense import Dense
from .diagonal import Diagonal
from .hierarchical import Hierarchical
from .toeplitz import TrilToeplitz, TriuToeplitz

_FIXED: dict[str, type[StructuredMatrix]] = {
    cls.name: cls
    for cls in (
        Dense,
        Diagonal,
        TrilToeplitz,
        TriuToeplitz,
        TrilTopLeftDiag,
        TrilBottomRightDiag,
        TriuTopLeftDiag,
        TriuBottomRightDiag,
    )
}
_BLOCK = re.compile(r"block(\d+)diagonal")
_HIERARCHICAL = re.compile(r"hierarchical(\d+)_(\d+)")

VALID_NAMES = (*_FIXED, "block{B}diagonal", "hierarchical{K1}_{K2}")


def get(name: str | type[StructuredMatrix]) -> type[StructuredMatrix]:
    """The structure type called ``name`` (see the module docstring).

    Raises:
        ValueError: for an unknown name; the message lists the valid ones.
    """
    if isinstance(name, type) and issubclass(name, StructuredMatrix):
        return name
    if not isinstance(name, str):
        raise ValueError(f"a structure name must be a string, got {name!r}")
    if name in _FIXED:
        return _FIXED[name]
    if m := _BLOCK.fullmatch(name):
        if int(m[1]) >= 1:
            return BlockDiagonal.specialize(int(m[1]))
    if m := _HIERARCHICAL.fullmatch(name):
        if int(m[1]) >= 1 and int(m[2]) >= 1:
            return Hierarchical.specialize(int(m[1]), int(m[2]))
    raise ValueError(
        f"unknown structure {name!r}; valid names are {', '.join(VALID_NAMES)} "
        "(with B, K1, K2 positive integers, e.g. 'block30diagonal', 'hierarchical15_15')"
    )


__all__ = [
    "StructuredMatrix",
    "get",
    "VALID_NAMES",
    "Dense",
    "Diagonal",
    "BlockDiagonal",
    "Hierarchical",
    "TrilToeplitz",
    "TriuToeplitz",
    "TrilTopLeftDiag",
    "TrilBottomRightDiag",
    "TriuTopLeftDiag",
    "TriuBottomRightDiag",
]

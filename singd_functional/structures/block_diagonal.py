"""STUB: being written (block{B}diagonal)."""
from ._base import StructuredMatrix


class BlockDiagonal(StructuredMatrix):
    @classmethod
    def specialize(cls, block_size):
        raise NotImplementedError

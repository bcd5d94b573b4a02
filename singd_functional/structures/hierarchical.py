"""STUB: being written (hierarchical{K1}_{K2})."""
from ._base import StructuredMatrix


class Hierarchical(StructuredMatrix):
    @classmethod
    def specialize(cls, k1, k2):
        raise NotImplementedError

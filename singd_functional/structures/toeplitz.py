"""STUB: being written (triltoeplitz, triutoeplitz)."""
from ._base import StructuredMatrix


class TrilToeplitz(StructuredMatrix):
    name = "triltoeplitz"


class TriuToeplitz(StructuredMatrix):
    name = "triutoeplitz"

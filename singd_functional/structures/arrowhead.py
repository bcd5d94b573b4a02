"""STUB: being written (tril/triu topleft/bottomright diag)."""
from ._base import StructuredMatrix


class TrilTopLeftDiag(StructuredMatrix):
    name = "triltopleftdiag"


class TrilBottomRightDiag(StructuredMatrix):
    name = "trilbottomrightdiag"


class TriuTopLeftDiag(StructuredMatrix):
    name = "triutopleftdiag"


class TriuBottomRightDiag(StructuredMatrix):
    name = "triubottomrightdiag"

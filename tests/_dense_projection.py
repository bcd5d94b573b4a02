"""Test oracle: the projection Pi of the structures table in docs/algorithm.md#structures, on dense tensors.

Written straight from the table, one branch per family, with loops where that is the
clearest (speed does not matter here).
"""

from __future__ import annotations

import re

import torch


def project(name: str, M: torch.Tensor) -> torch.Tensor:
    """Dense form of Pi(M) for a symmetric d x d matrix M."""
    d = M.shape[0]
    out = torch.zeros_like(M)
    if name == "dense":
        return M.clone()
    if name == "diagonal":
        return torch.diag(torch.diagonal(M))
    if m := re.fullmatch(r"block(\d+)diagonal", name):
        B = int(m[1])
        for s in range(0, d, B):
            out[s : s + B, s : s + B] = M[s : s + B, s : s + B]
        return out
    if m := re.fullmatch(r"hierarchical(\d+)_(\d+)", name):
        k1 = min(d, int(m[1]))
        k2 = min(d - k1, int(m[2]))
        n = d - k1 - k2
        out[:k1, :k1] = M[:k1, :k1]
        out[:k1, k1:] = 2 * M[:k1, k1:]
        for i in range(k1, k1 + n):
            out[i, i] = M[i, i]
        out[k1 + n :, k1 : k1 + n] = 2 * M[k1 + n :, k1 : k1 + n]
        out[k1 + n :, k1 + n :] = M[k1 + n :, k1 + n :]
        return out
    if name in ("triltoeplitz", "triutoeplitz"):
        coef = [torch.diagonal(M).sum() / d]
        for k in range(1, d):
            coef.append((torch.diagonal(M, k).sum() + torch.diagonal(M, -k).sum()) / (d - k))
        for i in range(d):
            for j in range(d):
                if (name == "triltoeplitz" and i >= j) or (name == "triutoeplitz" and j >= i):
                    out[i, j] = coef[abs(i - j)]
        return out
    out = torch.diag(torch.diagonal(M))
    if name == "triltopleftdiag":  # dense last row
        out[d - 1, : d - 1] = 2 * M[d - 1, : d - 1]
    elif name == "trilbottomrightdiag":  # dense first column
        out[1:, 0] = 2 * M[1:, 0]
    elif name == "triutopleftdiag":  # dense last column
        out[: d - 1, d - 1] = 2 * M[: d - 1, d - 1]
    elif name == "triubottomrightdiag":  # dense first row
        out[0, 1:] = 2 * M[0, 1:]
    else:
        raise ValueError(name)
    return out


def storage(name: str, d: int) -> int:
    """The storage column of the structures table."""
    if name == "dense":
        return d * d
    if name in ("diagonal", "triltoeplitz", "triutoeplitz"):
        return d
    if m := re.fullmatch(r"block(\d+)diagonal", name):
        B = int(m[1])
        return (d // B) * B * B + (d % B) ** 2
    if m := re.fullmatch(r"hierarchical(\d+)_(\d+)", name):
        k1 = min(d, int(m[1]))
        k2 = min(d - k1, int(m[2]))
        n = d - k1 - k2
        return k1 * k1 + k1 * (n + k2) + n + k2 * n + k2 * k2
    return 2 * d - 1

"""Type aliases of the public signatures, in one place (meanings: docs/algorithm.md#defaults)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

import torch
from torch import Tensor

from .structures import StructuredMatrix

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

#: a structure: a name that ``structures.get`` knows (``"dense"``, ``"block30diagonal"``,
#: ...) or a structure type
StructureName = str | type[StructuredMatrix]
#: the structures of (K, C)
StructurePair = tuple[StructureName, StructureName]
#: one pair for every layer, or a pair per layer name
Structures = StructurePair | Mapping[str, StructurePair]
#: what the differentiated loss averages over: None (a sum), "batch", "batch+sequence",
#: or a positive count of loss terms (int, float or 0-d tensor)
LossAverage = str | int | float | Tensor | None
#: the dtypes of (K and m_K, C and m_C); None: the weight's
PreconditionerDtype = tuple[torch.dtype | None, torch.dtype | None]
#: what ``torch.optim.Optimizer`` takes as ``params``: tensors or param-group dicts
Params = Iterable[Tensor] | Iterable[dict[str, Any]]
#: the data-parallel processes to reduce over: a process group, "world" (the default
#: group when torch.distributed is initialised), or None (no reduction)
ProcessGroupArg: TypeAlias = "ProcessGroup | str | None"

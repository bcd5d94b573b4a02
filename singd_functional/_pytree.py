"""Register our containers with both pytree libraries.

`torch.func` (vmap, grad) and `torch.compile` flatten with `torch.utils._pytree`; users
and our own code use `optree`. A type known to only one of them is an opaque leaf to
the other, so every container type goes through :func:`register_pytree` once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import optree
import torch.utils._pytree as torch_pytree

T = TypeVar("T", bound=type)

# optree's global namespace is a private sentinel; registering there means plain
# `optree.tree_map(f, tree)` (no namespace argument) sees through our types.
_OPTREE_GLOBAL = getattr(optree.registry, "__GLOBAL_NAMESPACE", "singd_functional")


def register_pytree(
    cls: T,
    flatten: Callable[[Any], tuple[list[Any], Any]],
    unflatten: Callable[[Any, list[Any]], Any],
) -> T:
    """Register ``cls`` with optree and torch.utils._pytree.

    Args:
        cls: the container type.
        flatten: ``obj -> (children, static_context)``; the context must be hashable.
        unflatten: ``(static_context, children) -> obj``.
    """
    optree.register_pytree_node(
        cls,
        flatten,
        lambda ctx, children: unflatten(ctx, list(children)),
        namespace=_OPTREE_GLOBAL,
    )
    torch_pytree.register_pytree_node(
        cls,
        flatten,
        lambda children, ctx: unflatten(ctx, list(children)),
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
    )
    return cls

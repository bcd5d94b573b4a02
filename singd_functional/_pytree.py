"""Register our containers with both pytree libraries.

`torch.func` (vmap, grad) and `torch.compile` flatten with `torch.utils._pytree`; users
and our own code use `optree`. A type known to only one of them is an opaque leaf to
the other, so every container type goes through :func:`register_pytree` once.

optree: our types live in the package's own namespace, :data:`PYTREE_NAMESPACE`
(``"singd_functional"``, exported as ``sf.PYTREE_NAMESPACE``), as optree's documentation
asks of libraries. Pass it wherever a tree that holds structured factors is flattened
or mapped::

    leaves = optree.tree_leaves(state, namespace=sf.PYTREE_NAMESPACE)

Without it optree treats a structured matrix as one leaf (a checkpoint of such
leaves would not load with ``weights_only=True``).

Private torch APIs this package still uses, and why (no public equivalent in torch 2.13):

- ``torch.utils._pytree`` (here, in ``sweep.py`` and in tests): the registry that
  ``torch.func.vmap`` / ``grad`` and dynamo flatten with; registering there is the
  only way for those to see through our types, and under ``torch.compile`` dynamo
  traces only this implementation (``sweep._tree_map`` switches to it while
  compiling).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import optree
import torch.utils._pytree as torch_pytree

T = TypeVar("T", bound=type)

PYTREE_NAMESPACE = "singd_functional"


def register_pytree(
    cls: T,
    flatten: Callable[[Any], tuple[list[Any], Any]],
    unflatten: Callable[[Any, list[Any]], Any],
) -> T:
    """Register ``cls`` with optree (namespace :data:`PYTREE_NAMESPACE`) and
    torch.utils._pytree.

    Args:
        cls: the container type.
        flatten: ``obj -> (children, static_context)``; the context must be hashable.
        unflatten: ``(static_context, children) -> obj``.
    """
    optree.register_pytree_node(
        cls,
        flatten,
        lambda ctx, children: unflatten(ctx, list(children)),
        namespace=PYTREE_NAMESPACE,
    )
    torch_pytree.register_pytree_node(
        cls,
        flatten,
        lambda children, ctx: unflatten(ctx, list(children)),
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
    )
    return cls

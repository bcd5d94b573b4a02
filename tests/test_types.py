"""The public API is fully typed: every parameter and return of ``sf.__all__`` is annotated.

mypy (``make typecheck``) checks that the annotations agree with the code; this test
checks that they exist, so a new public function cannot slip in untyped (mypy's default
settings skip unannotated functions instead of complaining).
"""

from __future__ import annotations

import inspect

import pytest

import singd_functional as sf
from singd_functional import structures


def _functions():
    """(qualified name, function) of every public function and public method."""
    out = []
    for module, names in ((sf, sf.__all__), (structures, structures.__all__)):
        for name in names:
            obj = getattr(module, name)
            label = f"{module.__name__}.{name}"
            if inspect.isfunction(obj):
                out.append((label, obj))
            elif inspect.isclass(obj):
                for cls in obj.__mro__:
                    if not cls.__module__.startswith("singd_functional"):
                        continue
                    for attr, member in vars(cls).items():
                        member = getattr(member, "__func__", member)  # classmethods
                        public = not attr.startswith("_") or attr == "__init__"
                        if public and inspect.isfunction(member):
                            out.append((f"{label}.{attr}", member))
    return sorted(set(out), key=lambda item: item[0])


FUNCTIONS = _functions()


def test_the_scan_sees_the_api():
    names = [n for n, _ in FUNCTIONS]
    assert "singd_functional.singd" in names and "singd_functional.SINGD.__init__" in names
    assert "singd_functional.structures.Dense.matmul" in names


@pytest.mark.parametrize(("name", "fn"), FUNCTIONS, ids=[n for n, _ in FUNCTIONS])
def test_public_signature_is_typed(name, fn):
    sig = inspect.signature(fn)
    missing = [
        p.name
        for p in sig.parameters.values()
        if p.annotation is inspect.Parameter.empty and p.name not in ("self", "cls")
    ]
    if sig.return_annotation is inspect.Signature.empty and fn.__name__ != "__init__":
        missing.append("return")
    assert not missing, f"{name}: no annotation for {missing}"

"""Looking a kind up in one of eval's registries (defences, judges, target backends, guards)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def registered(registry: Mapping[str, T], name: str, what: str) -> T:
    """``registry[name]``; an unknown name is a ``ValueError`` listing the registered ones."""
    if name not in registry:
        raise ValueError(f"{what} {name!r} is not one of {', '.join(registry)}")
    return registry[name]

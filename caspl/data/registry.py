"""Datasets registered by name: `build_dataset("oxford_pets", "/data")`, `build_dataset("toy_shapes", cache)`."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

from caspl.data.base import Dataset
from caspl.errors import ConfigError, DataError

Builder = Callable[..., Dataset]
_REGISTRY: dict[str, Builder] = {}
_ALIASES: dict[str, str] = {}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_dataset(name: str, *aliases: str) -> Callable[[Builder], Builder]:
    """Register `builder(root, **options) -> Dataset` under `name` (and case-insensitive aliases)."""

    def decorate(builder: Builder) -> Builder:
        key = _normalise(name)
        if key in _REGISTRY and _REGISTRY[key] is not builder:
            raise ValueError(f"dataset {name!r} is already registered")
        _REGISTRY[key] = builder
        for alias in aliases:
            _ALIASES[_normalise(alias)] = key
        return builder

    return decorate


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def resolve_name(name: str) -> str:
    """The registered name for `name` or one of its aliases; DataError listing the choices otherwise."""
    key = _normalise(name)
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    return key


def build_dataset(name: str, root: str | Path | None, **kwargs: Any) -> Dataset:
    """Build a registered dataset from `root` (the folder holding the dataset folders; for ToyWorld the store root)."""
    builder = _REGISTRY[resolve_name(name)]
    try:
        inspect.signature(builder).bind(root, **kwargs)
    except TypeError as exc:
        options = [p for p in inspect.signature(builder).parameters if p != "root"]
        raise ConfigError(f"dataset {name!r}: {exc}; accepted options: {options or 'none'}") from None
    return builder(root, **kwargs)

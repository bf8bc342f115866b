"""Helpers shared by subcommands: loading a YAML config into a typed dataclass, the artefact store."""

from __future__ import annotations

import argparse
from typing import TypeVar

from caspl.artifacts import ArtifactStore
from caspl.config import RuntimeConfig, from_dict, load_yaml

T = TypeVar("T")


def load_config(cls: type[T], path: str, overrides: dict | None = None) -> T:
    data = load_yaml(path)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(cls, data)


def store_for(runtime: RuntimeConfig) -> ArtifactStore:
    return ArtifactStore(runtime.store)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, help="YAML config file")

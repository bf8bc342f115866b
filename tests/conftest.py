"""Shared fixtures. Tests run on CPU with tiny open_clip architectures; nothing touches the network or ~/.cache."""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
logging.getLogger().setLevel(logging.ERROR)  # open_clip logs "randomly initialised" warnings for every build


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Artefacts built by a test land in a per-session temporary store, never in the user's cache."""
    if "CASPL_CACHE_FOR_TESTS" not in os.environ:
        os.environ["CASPL_CACHE_FOR_TESTS"] = str(tmp_path_factory.mktemp("caspl_cache"))
    monkeypatch.setenv("CASPL_CACHE", os.environ["CASPL_CACHE_FOR_TESTS"])


@pytest.fixture(scope="session")
def tiny():
    """A tiny open_clip CLIP (3 layers per tower) with tokenizer; random weights, fixed seed."""
    import torch

    from caspl.models import ModelSpec, load_clip

    torch.manual_seed(0)
    return load_clip(ModelSpec("caspl-tiny"))


@pytest.fixture(scope="session")
def vit_b16():
    """The ViT-B-16 architecture with random weights (pretrained=None: no download)."""
    import torch

    from caspl.models import ModelSpec, load_clip

    torch.manual_seed(0)
    return load_clip(ModelSpec("ViT-B-16"))

"""Shared fixtures. Tests run on CPU with tiny open_clip architectures; nothing touches the network or ~/.cache."""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
logging.getLogger().setLevel(logging.ERROR)  # open_clip logs "randomly initialised" warnings for every build

import torch  # noqa: E402

# Tiny models gain nothing from a second thread, and two spinning OpenMP threads on a busy 2-core machine slow a
# training step down by an order of magnitude; Ray workers already default to one thread per CPU they hold.
torch.set_num_threads(1)


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


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, small object store)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()

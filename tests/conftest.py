"""Shared fixtures. Tests run on CPU with tiny open_clip architectures; nothing touches the network or ~/.cache."""

from __future__ import annotations

import logging
import os
import sys

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
logging.getLogger().setLevel(logging.ERROR)  # open_clip logs "randomly initialised" warnings for every build

import torch  # noqa: E402

# Tiny models gain nothing from a second thread, and two spinning OpenMP threads on a busy 2-core machine slow a
# training step down by an order of magnitude; Ray workers already default to one thread per CPU they hold.
torch.set_num_threads(1)


# One tiny configuration per registered prompt method (boosting aside), for the `caspl-tiny` model (3 layers per
# tower), shared by the method, adapting and protocol tests. A new method adds its row here;
# tests/test_methods.py checks that every registered method has one.
METHOD_CASES: dict[str, dict] = {
    "zeroshot": {"method": "zeroshot"},
    "coop": {"method": "coop", "n_ctx": 4},
    "kgcoop": {"method": "kgcoop", "n_ctx": 4, "ctx_init": None, "kg_weight": 8.0},
    "cocoop": {"method": "cocoop", "n_ctx": 4, "meta_hidden_ratio": 4},
    "ivlp": {"method": "ivlp", "text_length": 2, "vision_length": 3, "text_depth": 2, "vision_depth": 3,
             "ctx_init": None},
    "maple": {"method": "maple", "length": 2, "depth": 2},
    "vpt": {"method": "vpt", "length": 3, "depth": 2},
    "promptsrc": {"method": "promptsrc", "text_length": 2, "vision_length": 2, "text_depth": 3, "vision_depth": 3,
                  "gpa_mean": 3.0, "gpa_std": 1.0},
}
TINY_BOOST = {"method": "boost", "text_length": 3, "vision_length": 2, "text_depth": 3, "vision_depth": 2}


def trainable_methods() -> list[str]:
    """The method cases that have prompts to train (every base method)."""
    from caspl.methods import BASE, method_class

    return sorted(name for name in METHOD_CASES if method_class(name).config_cls.kind == BASE)


# What the session's processes import: xdist workers, study drivers, trials, teacher actors, Ray Data and Train.
SHARED_IMPORTS = ("caspl.study.runner", "caspl.study.trial", "caspl.study.report", "caspl.distill.cache",
                  "caspl.train.boost", "caspl.train.adapt", "ray.tune", "ray.data", "ray.train.torch", "mlflow",
                  "optuna", "matplotlib.pyplot")


def pytest_configure(config) -> None:
    """Under xdist, the controller imports SHARED_IMPORTS once before the workers start, so that their byte-code is
    written once (the test command installs with pip's --no-compile, which skips compiling the whole of torch)
    instead of by every process that starts at once."""
    if sys.dont_write_bytecode or hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    import importlib

    for name in SHARED_IMPORTS:
        importlib.import_module(name)


def pytest_collection_modifyitems(items: list) -> None:
    """Longest first: `slow(seconds=N)` tests by N, then the rest in file order. With the README's
    `-n auto --dist load --maxschedchunk 1` workers take tests one at a time in this order, so the long end-to-end
    tests start at once and spread over the workers instead of one of them finishing alone."""
    def expected_seconds(item) -> float:
        slow = item.get_closest_marker("slow")
        return slow.kwargs.get("seconds", 10) if slow is not None else 0

    items.sort(key=expected_seconds, reverse=True)  # stable: ties keep their order


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Artefacts built by a test land in a per-session temporary store, never in the user's cache. The xdist workers
    of one session share it (the store's file locks make concurrent builders build once), so the ToyWorld smoke
    weights and teacher caches are built once per session, not once per worker."""
    if "CASPL_CACHE_FOR_TESTS" not in os.environ:
        session_root = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker's base is <session>/popen-gwN
            session_root = session_root.parent
        store = session_root / "caspl_cache"
        store.mkdir(exist_ok=True)
        os.environ["CASPL_CACHE_FOR_TESTS"] = str(store)
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


def start_test_ray():
    """A local Ray in this process (2 CPUs, small object store), started unless one is running."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    return ray


@pytest.fixture
def ray_local():
    """The session's local Ray, started on first use and kept for the tests after (Ray stops at exit)."""
    return start_test_ray()


@pytest.fixture
def without_ray():
    """No Ray in this process, for tests asserting that a command starts none (a later ray_local starts it again)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield

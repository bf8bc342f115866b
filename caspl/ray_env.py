"""Starting or joining Ray the same way everywhere (CLI, studies, tests)."""

from __future__ import annotations

import os

import ray


def ensure_ray(num_cpus: int | None = None, object_store_memory: int | None = None) -> None:
    """Join the cluster in $RAY_ADDRESS (set by `ray job submit`) or start a local Ray, never another one found on
    this machine; no-op when connected."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # configure_logging=False: no colour-coded "Connected to Ray cluster" line; the study logs the cluster itself
        ray.init(address=address, log_to_driver=True, configure_logging=False)
        return
    # "local": a Ray of our own even when `ray start` left a cluster on this machine (Ray would join that one, and
    # then refuse num_cpus)
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=False,
             log_to_driver=True, configure_logging=False)

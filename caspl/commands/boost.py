"""`caspl cache` (build or inspect a teacher logits cache) and `caspl boost` (one boosting run)."""

from __future__ import annotations

import argparse
import json

from caspl.commands.common import add_config_argument, load_config, store_for


def register(subparsers) -> None:
    cache = subparsers.add_parser("cache", help="build (or --inspect) the teacher logits cache of a boosting config")
    add_config_argument(cache)
    cache.add_argument("--inspect", action="store_true",
                       help="only report the cache's state (complete, partial, damaged, absent); changes nothing")
    cache.set_defaults(func=run_cache)
    boost = subparsers.add_parser("boost", help="one boosting run (phase 1) from a YAML config")
    add_config_argument(boost)
    boost.add_argument("--workers", type=int, help="Ray Train DDP workers (0: in this process)")
    boost.set_defaults(func=run_boost_command)


def run_cache(args: argparse.Namespace) -> int:
    from caspl.train.boost import BoostRunConfig, prepare_boost

    cfg = load_config(BoostRunConfig, args.config)
    store = store_for(cfg.runtime)
    if args.inspect:
        return _inspect(cfg, store)
    _, report = prepare_boost(cfg, store)
    print(json.dumps({"key": report.key, "folder": str(report.folder), "images_computed": report.computed,
                      "images_reused": report.reused, "images_skipped": len(report.skipped),
                      "teacher_view_passes": report.teacher_views, "seconds": round(report.seconds, 2)}, indent=1))
    for skip in report.skipped:
        print(f"skipped {skip['id']}: {skip['error']}")
    return 0


def _inspect(cfg, store) -> int:
    """Print the cache's state; read-only throughout (a dataset or teacher that is not built yet stays unbuilt)."""
    from caspl.artifacts import WouldBuildError, read_only
    from caspl.train.boost import inspect_teacher_cache

    try:
        with read_only():
            status = inspect_teacher_cache(cfg, store)
    except WouldBuildError as missing:  # its inputs are not built yet, so neither is the cache
        print(json.dumps({"key": None, "state": "absent", "images": None, "images_done": 0, "folder": None,
                          "shards_damaged": 0, "missing": f"{missing.kind}/{missing.key}"}, indent=1))
        return 0
    print(json.dumps({"key": status.key, "state": status.state, "images": status.images,
                      "images_done": status.images_done, "folder": str(status.folder),
                      "shards_damaged": status.shards_damaged}, indent=1))
    return 0


def run_boost_command(args: argparse.Namespace) -> int:
    from caspl.train.boost import BoostRunConfig, run_boost

    cfg = load_config(BoostRunConfig, args.config, {"workers": args.workers})
    result = run_boost(cfg, store_for(cfg.runtime))
    last = result.history[-1] if result.history else {}
    print(json.dumps({"key": result.key, "reused": result.reused, "prompts": str(result.prompts),
                      "teacher_cache": result.cache_key, "final": last}, indent=1))
    return 0

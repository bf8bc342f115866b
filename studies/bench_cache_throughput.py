"""Benchmark: the teacher cache at the teacher's own speed?

Side by side in one run, on the same images and views (a ToyWorld dataset, each view resized to the teacher's input):
  raw_views_per_s    the teacher's forward pass alone in this process (views made beforehand, not timed)
  cache_views_per_s  `caspl cache`'s code path: Ray Data streams the images through the teacher actor pool, which
                     decodes, makes the views, runs the teacher, and the driver writes checksummed shards
and reports their ratio (target >= 0.85). Repeats are interleaved (raw, cache, raw, cache, ...) into fresh stores;
medians and spreads are reported. The teacher has random weights: the cost of a forward pass does not depend on them.
The JSON summary is the last line of stdout.

    python studies/bench_cache_throughput.py                       # ViT-B-16 teacher at 224 px, 320 images
    python studies/bench_cache_throughput.py --actors 2 --actor-cpus 1 --batch-size 32   # other pool settings
    python studies/bench_cache_throughput.py --smoke-test          # the tiny teacher, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="ViT-B-16")
    parser.add_argument("--images-per-class", type=int, default=8, help="toy_shapes has 40 classes")
    parser.add_argument("--views", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--actors", type=int, help="cache.actors (default: the config default)")
    parser.add_argument("--actor-cpus", type=float, help="cache.actor_num_cpus (default: the config default)")
    parser.add_argument("--batch-size", type=int, help="cache.batch_size (default: the config default)")
    parser.add_argument("--smoke-test", action="store_true", help="the tiny teacher, few images, one repeat")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.teacher, args.images_per_class, args.repeats = "caspl-tiny-teacher", 2, 1
    return args


def cache_config(args):
    from caspl.distill.cache import CacheConfig

    overrides = {"actors": args.actors, "actor_num_cpus": args.actor_cpus, "batch_size": args.batch_size}
    return CacheConfig(views=args.views, **{k: v for k, v in overrides.items() if v is not None})


def raw_seconds(teacher, classnames, template, images, cfg, store) -> float:
    """The teacher's forward over every view, in this process, batched as the actors batch; views made beforehand."""
    import torch

    from caspl.data.base import load_image
    from caspl.data.views import make_view
    from caspl.distill.teacher import FORWARD_VIEWS, TeacherScorer, load_teacher, teacher_text_features

    loaded = load_teacher(teacher)
    text = teacher_text_features(loaded, classnames, template, store)
    scorer = TeacherScorer(loaded, text, cfg.crop_scale, pass_size=FORWARD_VIEWS)  # the passes the actors run
    views = [make_view(load_image(p), i, v, cfg.seed, scorer.view_spec)
             for i, p in zip(images.ids, images.paths) for v in range(cfg.views)]
    per_batch = cfg.batch_size * cfg.views
    began = time.perf_counter()
    for start in range(0, len(views), per_batch):
        scorer(torch.stack(views[start:start + per_batch]))
    return time.perf_counter() - began


def cache_seconds(teacher, classnames, template, images, cfg, store) -> float:
    from caspl.distill.cache import build_logits_cache

    report = build_logits_cache(teacher, classnames, template, images, cfg, store, progress=False)
    assert report.computed == len(images.ids), report
    return report.seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    from caspl.artifacts import ArtifactStore
    from caspl.data import build_dataset
    from caspl.distill.cache import UnlabeledImages
    from caspl.models import ModelSpec
    from caspl.ray_env import ensure_ray

    dataset = build_dataset("toy_shapes", None, n_train=args.images_per_class, n_val=1, n_test=1)
    images = UnlabeledImages.from_paths([item.path for item in dataset.train])
    teacher, cfg = ModelSpec(args.teacher), cache_config(args)
    ensure_ray()
    raw, cached = [], []
    with tempfile.TemporaryDirectory(prefix="caspl-bench-cache-") as root:
        for repeat in range(args.repeats):
            store = ArtifactStore(Path(root) / f"store-{repeat}")
            raw.append(raw_seconds(teacher, dataset.classnames, dataset.template, images, cfg, store))
            cached.append(cache_seconds(teacher, dataset.classnames, dataset.template, images, cfg, store))
    passes = len(images.ids) * cfg.views
    raw_rate, cache_rate = passes / statistics.median(raw), passes / statistics.median(cached)
    result = {"teacher": args.teacher, "images": len(images.ids), "views": cfg.views, "repeats": args.repeats,
              "actors": cfg.actors, "actor_num_cpus": cfg.actor_num_cpus, "batch_size": cfg.batch_size,
              "cpus": os.cpu_count(), "raw_seconds": [round(s, 2) for s in raw],
              "cache_seconds": [round(s, 2) for s in cached], "raw_views_per_s": round(raw_rate, 2),
              "cache_views_per_s": round(cache_rate, 2), "ratio": round(cache_rate / raw_rate, 3)}
    print(f"raw teacher {raw_rate:.1f} views/s | cache build {cache_rate:.1f} views/s | ratio "
          f"{cache_rate / raw_rate:.2f} (target >= 0.85)", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from caspl.startup import exit_with

    exit_with(main())

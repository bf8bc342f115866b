"""Benchmark: boosting with the cached teacher vs the online teacher, side by side in one process.

Measures, on the same ToyWorld data and the same views:
  teacher_s      the teacher alone over one epoch's views
  student_s      one boosting epoch with cached teacher logits (the student's forward + backward + step)
  online_s       one boosting epoch with the teacher run on every batch
and reports speedup = online_s / student_s, the ideal speedup (teacher_s + student_s) / student_s and their ratio
(target >= 0.9). It also counts teacher forward passes: the cache is built once, then trials with other
temperatures reuse it (0 teacher passes each). The last line of stdout is JSON.

    python studies/bench_teacher_cache.py [--smoke-test] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

from caspl.artifacts import ArtifactStore  # noqa: E402
from caspl.config import from_dict  # noqa: E402
from caspl.data.base import load_image  # noqa: E402
from caspl.data.views import stack_views  # noqa: E402
from caspl.train.boost import BoostRunConfig, teacher_source, prepare_boost, train_boost, view_of  # noqa: E402
from studies.scratch import ScratchFolders  # noqa: E402


def config(args, mode: str, temperature: float = 1.0) -> BoostRunConfig:
    return from_dict(BoostRunConfig, {
        "student": {"name": args.student}, "teacher": {"name": args.teacher},
        "data": {"dataset": "toy_shapes", "options": {"n_train": args.images_per_class, "n_val": 1, "n_test": 1}},
        "method": {"text_length": 4, "vision_length": 4, "text_depth": 2, "vision_depth": 2,
                   "temperature": temperature},
        "teacher_mode": mode,
        "optim": {"epochs": 1, "batch_size": args.batch_size, "warmup_epochs": 0},
        "cache": {"views": 2, "batch_size": 256, "shard_size": 1024, "crop_scale": [0.5, 1.0]},
        "runtime": {"threads": args.threads},
    })


def time_teacher_alone(cfg: BoostRunConfig, inputs) -> float:
    scorer = teacher_source(dataclasses.replace(cfg, teacher_mode="online"), inputs)
    paths = dict(zip(inputs.images.ids, inputs.images.paths))
    ids = list(inputs.images.ids)
    batch = cfg.optim.batch_size
    began = time.perf_counter()
    for start in range(0, len(ids) - batch + 1, batch):
        chunk = ids[start:start + batch]
        views = [view_of(i, 0, cfg.cache.views) for i in chunk]
        scorer(stack_views([load_image(paths[i]) for i in chunk], chunk, views, cfg.cache.seed, scorer.view_spec))
    return time.perf_counter() - began


def time_epoch(cfg: BoostRunConfig, inputs) -> float:
    """Seconds of the epoch loop itself (model loading excluded, as it is for the teacher-alone timing)."""
    history = train_boost(cfg, inputs, None)["history"]
    return sum(h["boost/epoch_seconds"] for h in history)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke-test", action="store_true", help="small data, one repeat (< 1 minute)")
    parser.add_argument("--student", default="caspl-toy-student")
    parser.add_argument("--teacher", default="caspl-toy-teacher")
    parser.add_argument("--images-per-class", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--store", default=None, help="artefact store (default: a temporary one, deleted at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary artefact store")
    args = parser.parse_args()
    if args.smoke_test:
        args.images_per_class, args.repeats = 4, 1
    torch.set_num_threads(args.threads)
    with ScratchFolders(args.keep) as scratch:
        store = ArtifactStore(args.store or scratch.make("caspl-bench-"))
        result = measure(args, store)
        print(json.dumps({**result, "scratch": scratch.summary()}))
    return 0


def measure(args, store: ArtifactStore) -> dict:
    cached_cfg, online_cfg = config(args, "cached"), config(args, "online")
    inputs, first = prepare_boost(cached_cfg, store, progress=False)
    trial_builds = [prepare_boost(config(args, "cached", t), store, progress=False)[1] for t in (0.5, 2.0, 4.0)]
    teacher_s, student_s, online_s = [], [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits all three alike
        teacher_s.append(time_teacher_alone(cached_cfg, inputs))
        student_s.append(time_epoch(cached_cfg, inputs))
        online_s.append(time_epoch(online_cfg, inputs))
    teacher, student, online = (statistics.median(x) for x in (teacher_s, student_s, online_s))
    speedup, ideal = online / student, (teacher + student) / student
    result = {
        "images": len(inputs.images.ids), "views": cached_cfg.cache.views, "repeats": args.repeats,
        "teacher_s": round(teacher, 3), "student_epoch_cached_s": round(student, 3),
        "student_epoch_online_s": round(online, 3), "speedup": round(speedup, 3), "ideal_speedup": round(ideal, 3),
        "fraction_of_ideal": round(speedup / ideal, 3),
        "cache_build_s": round(first.seconds, 2),
        "teacher_view_passes_first_build": first.teacher_views,
        "teacher_view_passes_later_trials": [b.teacher_views for b in trial_builds],
    }
    print(f"teacher alone {teacher:.2f}s | cached epoch {student:.2f}s | online epoch {online:.2f}s | "
          f"speed-up {speedup:.2f} of ideal {ideal:.2f} ({speedup / ideal:.0%})", file=sys.stderr)
    return result


if __name__ == "__main__":
    from caspl.startup import exit_with

    exit_with(main())

"""Benchmark: how much of a study's wall time goes into trial compute rather than Ray/Tune/MLflow overhead.

Runs a fresh study (the embedded default, or --config) into a temporary Tune storage, SQLite MLflow store and
artefact store (so boosting and adapting run instead of being reused), then reports, with c = search.max_concurrent
trial slots:

    used       = Σ trial compute (boosting + adapting + evaluation, timed inside each trial)
                 + c × teacher-cache build (it occupies the machine before trials start)
    available  = c × study wall time (Ray start-up, Tune, MLflow, scheduling gaps all count against it)
    fraction   = used / available        (target >= 0.85; the full default study within 15 minutes)

The last line of stdout is JSON.   python studies/bench_study_overhead.py [--smoke-test] [--config …]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from studies.boost_sweep import DEFAULT_CONFIG, smoke_overrides  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()

    from caspl.config import load_yaml
    from caspl.study.config import load_study_config
    from caspl.study.runner import run_study

    data = load_yaml(args.config)
    if args.smoke_test:
        data = smoke_overrides(data)
    work = Path(tempfile.mkdtemp(prefix="caspl-bench-study-"))
    data["storage"] = str(work / "runs")
    # A fresh artefact store: boosting and adapting results are content-addressed, so a warm store would reuse
    # them and the benchmark would time only the overhead. The ToyWorld models stay in the default store and are
    # built (if needed) before the clock starts: they are an input of the study, not part of it.
    data.setdefault("runtime", {})["store"] = str(work / "store")
    _prebuild_models(data)
    data["tracking"] = {"env_file": None, "tracking_uri": f"sqlite:///{work}/mlflow.db",
                        "experiment": "bench_study_overhead"}
    began = time.time()
    summary = run_study(load_study_config(data), REPO, fresh=True, log=lambda line: print(line, file=sys.stderr))
    wall = time.time() - began  # includes Ray start-up and everything before the first trial
    slots = summary["max_concurrent"]
    used = summary["trial_compute_seconds"] + slots * summary["teacher_cache_seconds"]
    result = {"trials": summary["trials"], "errored": summary["errored"], "max_concurrent": slots,
              "wall_seconds": round(wall, 1), "trial_compute_seconds": summary["trial_compute_seconds"],
              "teacher_cache_seconds": summary["teacher_cache_seconds"],
              "compute_fraction": round(used / (slots * wall), 3)}
    print(json.dumps(result))
    return 0 if summary["errored"] == 0 else 1


def _prebuild_models(data: dict) -> None:
    from caspl.train.toyworld_pretrain import build_model

    for role in ("student", "teacher"):
        if data[role].get("pretrained") == "toyworld":
            build_model(data[role]["name"])


if __name__ == "__main__":
    sys.exit(main())

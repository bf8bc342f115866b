"""The main job: a CasPL hyperparameter study on Ray Tune + Optuna, tracked in MLflow, resumable.

    python studies/boost_sweep.py                       # the embedded default: ToyWorld, local Ray, SQLite MLflow
    python studies/boost_sweep.py --config my_study.yaml
    python studies/boost_sweep.py --smoke-test          # a few tiny trials (CI)
    python studies/boost_sweep.py --fresh               # start over instead of resuming
    ray job submit --working-dir . -- python studies/boost_sweep.py --config …   (see ray_jobs/)

Running the same command again on the same storage resumes the study where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `ray job submit --working-dir .` runs this file without installing the package
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

DEFAULT_CONFIG = REPO / "studies" / "configs" / "study" / "toy_default.yaml"


def smoke_overrides(data: dict) -> dict:
    """Shrink any study to a few tiny trials: the same code paths, a CI-sized budget."""
    from caspl.train.toyworld_pretrain import with_smoke_weights

    data = copy.deepcopy(data)
    data["name"] = f"{data.get('name', 'study')}-smoke"
    search = data.setdefault("search", {})
    search.update({"num_samples": 2, "seeds": search.get("seeds", [1])[:1], "max_concurrent": 2})
    search.pop("points_to_evaluate", None)
    for phase in ("boost", "adapt"):
        optim = data.setdefault(phase, {}).setdefault("optim", {})
        optim.update({"epochs": 2, "warmup_epochs": 1})
    data["adapt"]["shots"] = min(int(data["adapt"].get("shots", 4)), 4)
    data["methods"] = data.get("methods", ["coop"])[:2]
    for role in ("student", "teacher"):  # ToyWorld weights from the smoke recipes: seconds instead of minutes
        if isinstance(data.get(role), dict):
            data[role] = with_smoke_weights(data[role])
    return data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", default=str(DEFAULT_CONFIG), help="study YAML (default: %(default)s)")
    parser.add_argument("--smoke-test", action="store_true", help="a few tiny trials of the same study")
    parser.add_argument("--fresh", action="store_true", help="start the study over instead of resuming it")
    parser.add_argument("--storage", help="Tune storage path or URI (overrides the config's `storage`)")
    parser.add_argument("--name", help="study name (overrides the config's `name`)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from caspl.config import load_yaml
    from caspl.errors import CasplError
    from caspl.study.config import load_study_config
    from caspl.study.runner import run_study

    try:
        data = load_yaml(args.config)
        if args.smoke_test:
            data = smoke_overrides(data)
        data.update({k: v for k, v in (("storage", args.storage), ("name", args.name)) if v is not None})
        study = load_study_config(data)
        summary = run_study(study, REPO, fresh=args.fresh)
    except CasplError as exc:
        print(f"boost_sweep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a signal outside Tune's loop (see caspl.study.signals)
        print(f"boost_sweep: {exc or 'interrupted'}; run the same command to resume", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    if summary["exit_code"]:
        print(f"boost_sweep: {summary['status']}: {summary['message']}", file=sys.stderr)
    return summary["exit_code"]


if __name__ == "__main__":  # the process: its stack loaded with the collector paused, its exit quick (caspl.startup)
    from caspl.startup import exit_with, loading_modules

    arguments = parse_args()  # --help and usage errors before the imports
    try:
        with loading_modules():
            import caspl.study.runner  # noqa: F401  (torch, open_clip, Ray: what run() imports from)
        code = run(arguments)
    except KeyboardInterrupt:  # Ctrl-C before the study started (e.g. while importing torch): nothing to resume yet
        print("boost_sweep: interrupted; run the same command to resume", file=sys.stderr)
        code = 130
    exit_with(code)

"""Submit the study to a running Ray cluster with settings that survive Ray's temporary working directory.

    python ray_jobs/submit.py --address http://127.0.0.1:8265 -- --config studies/configs/study/toy_default.yaml

`ray job submit --working-dir .` runs the job in a temporary copy of the repository, so relative paths (the SQLite
MLflow store, the Tune storage) would land in that copy. This helper resolves them to absolute paths on the
submitting machine (right for a local or shared-filesystem cluster; on a cloud cluster set a tracking server URI in
mlflow.env and pass --storage s3://…) and passes them through the runtime env.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def runtime_env(storage: str) -> dict:
    from caspl.study.tracking import tracking_settings

    env = yaml.safe_load((REPO / "ray_jobs" / "runtime_env.yaml").read_text())
    settings = tracking_settings(REPO / "mlflow.env")
    env["working_dir"] = str(REPO)
    env.setdefault("env_vars", {}).update({
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "MLFLOW_EXPERIMENT_NAME": settings.experiment,
        "CASPL_CACHE": os.environ.get("CASPL_CACHE", str(Path.home() / ".cache" / "caspl")),
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
    })
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"))
    parser.add_argument("--storage", default=str(REPO / "runs"), help="Tune storage (absolute path or URI)")
    parser.add_argument("--no-wait", action="store_true", help="return after submission")
    parser.add_argument("study_args", nargs=argparse.REMAINDER, help="arguments for studies/boost_sweep.py after --")
    args = parser.parse_args()
    study_args = [a for a in args.study_args if a != "--"]
    beside = Path(sys.executable).parent / "ray"  # the ray CLI of this interpreter's environment
    command = [str(beside) if beside.exists() else "ray", "job", "submit", "--address", args.address,
               "--runtime-env-json", json.dumps(runtime_env(args.storage))]
    if args.no_wait:
        command.append("--no-wait")
    command += ["--", "python", "studies/boost_sweep.py", "--storage", args.storage, *study_args]
    print("+", " ".join(command[:6]), "…", " ".join(command[7:]), flush=True)
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())

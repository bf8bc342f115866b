"""Submit the study to a running Ray cluster with settings that survive Ray's temporary working directory.

    python ray_jobs/submit.py --address http://127.0.0.1:8265 -- --config studies/configs/study/toy_default.yaml

`ray job submit --working-dir .` runs the job in a temporary copy of the repository, so relative paths (the SQLite
MLflow store, the Tune storage) would land in that copy. This helper resolves them to absolute paths on the
submitting machine (right for a local or shared-filesystem cluster; on a cloud cluster set a tracking server URI in
mlflow.env and pass --storage s3://…) and passes them through the runtime env.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def runtime_env(storage: str) -> dict:
    from caspl.study.lineage import git_env
    from caspl.study.tracking import tracking_settings

    env = yaml.safe_load((REPO / "ray_jobs" / "runtime_env.yaml").read_text())
    settings = tracking_settings(REPO / "mlflow.env")
    env["working_dir"] = str(REPO)
    env.setdefault("env_vars", {}).update({
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "MLFLOW_EXPERIMENT_NAME": settings.experiment,
        "CASPL_CACHE": os.environ.get("CASPL_CACHE", str(Path.home() / ".cache" / "caspl")),
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
        **git_env(REPO),  # the job's copy of the repository has no .git: its runs' commit tags come from here
    })
    return env


def submit(address: str, entrypoint: str, env: dict, attempts: int = 30) -> str:
    """Submit, retrying while a freshly started head has no job agent yet."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    for attempt in range(attempts):
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=env)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(2)
    raise AssertionError("unreachable")


def follow(address: str, job_id: str) -> int:
    """Print the job's logs as they grow; 0 when it succeeded."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        print(logs[shown:], end="", flush=True)
        shown = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            print(f"\nJob {job_id} {status.value.lower()}", flush=True)
            return 0 if status == JobStatus.SUCCEEDED else 1
        time.sleep(2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"))
    parser.add_argument("--storage", default=str(REPO / "runs"), help="Tune storage (absolute path or URI)")
    parser.add_argument("--no-wait", action="store_true", help="return after submission")
    parser.add_argument("study_args", nargs=argparse.REMAINDER, help="arguments for studies/boost_sweep.py after --")
    args = parser.parse_args()
    study_args = [a for a in args.study_args if a != "--"]
    entrypoint = " ".join(shlex.quote(a) for a in
                          ["python", "studies/boost_sweep.py", "--storage", args.storage, *study_args])
    job_id = submit(args.address, entrypoint, runtime_env(args.storage))
    print(f"submitted {job_id} to {args.address}: {entrypoint}", flush=True)
    return 0 if args.no_wait else follow(args.address, job_id)


if __name__ == "__main__":
    sys.exit(main())

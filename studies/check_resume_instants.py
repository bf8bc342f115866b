"""Kill a study's driver at each instant of its start-up, rerun it every time, and check that it still ends right.

Round k starts the study command (without --fresh) and watches the study's folder; when the k-th new path of the
round appears (any file or folder, temporary ones included), the whole process group gets SIGKILL at once.
Rounds go on until a round ends by itself or `--instants` rounds ran; then the command runs to its end. Checked:
it exits 0, the MLflow experiment holds one parent run (FINISHED) and exactly the configured number of child runs,
each FINISHED with test metrics and a distinct trial, the published summary says FINISHED, and a sibling folder
in the storage is byte-for-byte unchanged.

    python studies/check_resume_instants.py                   # studies/configs/study/tiny_check.yaml, 16 rounds
    python studies/check_resume_instants.py --config my.yaml --instants 30

Prints one JSON line: each round's instant (the path killed at, seconds after start) and the final checks.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SWEEP = REPO / "studies" / "boost_sweep.py"
CONFIG = REPO / "studies" / "configs" / "study" / "tiny_check.yaml"


def nth_path(n: int) -> Callable[[list[str]], str | None]:
    """A `when` for `run_and_signal`: the n-th path that appears."""
    return lambda paths: paths[n - 1] if len(paths) >= n else None


def first_match(pattern: str) -> Callable[[list[str]], str | None]:
    """A `when` for `run_and_signal`: the first path that matches a glob pattern (relative to the folder)."""
    return lambda paths: next((p for p in paths if fnmatch.fnmatch(p, pattern)), None)


def run_and_signal(command: list[str], folder: Path, when: Callable[[list[str]], str | None], env: dict, log: Path,
                   sig: int = signal.SIGKILL, timeout: float = 600, renewed: bool = False) -> dict:
    """Run `command` in its own process group and watch `folder` (every 2 ms); as soon as `when(new paths, in order
    of appearance)` names a path, send `sig` to the whole group and wait for the end. With `renewed`, a path that
    existed at the start counts as new when it is written anew (atomic writes rename a new file in),
    e.g. a `tuner.pkl` the run cleared with Tune's other files and wrote again."""
    before = _tree(folder, inodes=True)
    began = time.time()
    with open(log, "a") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        seen: list[str] = []
        known: set[str] = set()
        hit = None
        while proc.poll() is None and time.time() - began < timeout and hit is None:
            now = _tree(folder, inodes=renewed)
            new = [p for p, inode in now.items() if p not in known and (p not in before
                                                                      or (renewed and before[p] != inode))]
            if new:  # `when` looks at the paths seen so far: without a new one its answer stays the same
                seen.extend(new)
                known.update(new)
                hit = when(seen)
            if hit is None:
                time.sleep(0.002)
        at = round(time.time() - began, 3)
        if hit is not None or proc.poll() is None:
            os.killpg(proc.pid, sig if hit is not None else signal.SIGKILL)
        code = proc.wait()
    if hit is None and time.time() - began >= timeout:
        raise TimeoutError(f"{command}: no end after {timeout} s; see {log}")
    return {"signalled_at": hit, "seconds": at, "exit_code": code}


def _tree(root: Path, inodes: bool) -> dict[str, tuple | None]:
    """{path relative to root: (inode, mtime) with `inodes`, else None} of everything under root (None too for a
    path gone before it was looked at). Both: a deleted file's inode number is often reused at once by the next file
    created. os.scandir, not os.walk: this runs every 2 ms, and takes under half of os.walk's time (0.19 against
    0.46 ms of CPU on a study folder of 45 paths)."""
    found: dict[str, tuple | None] = {}
    stack = [("", str(root))]
    while stack:
        prefix, folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):  # removed or replaced meanwhile
            continue
        for entry in entries:
            path = prefix + entry.name
            found[path] = None
            if inodes:
                try:
                    stat = entry.stat(follow_symlinks=False)
                    found[path] = (stat.st_ino, stat.st_mtime_ns)
                except FileNotFoundError:
                    pass
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((path + os.sep, entry.path))
            except OSError:
                continue
    return found


def folder_digest(folder: Path) -> str:
    """sha256 over every path and file content under `folder`."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def check_outcome(data: dict, study_dir: Path) -> dict:
    """The checks of a finished study: one parent run, one FINISHED child run per configured trial, the summary."""
    from mlflow.tracking import MlflowClient

    tracking = data["tracking"]
    client = MlflowClient(tracking["tracking_uri"])
    experiment = client.get_experiment_by_name(tracking["experiment"])
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.data.tags.get("caspl.role") != "baseline"]
    expected = data["search"]["num_samples"] * len(data["search"].get("seeds", [1]))
    summary_file = study_dir / "summary" / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    checks = {
        "one parent run": len(parents) == 1 and parents[0].info.status == "FINISHED",
        "children nest under it": {r.data.tags["mlflow.parentRunId"] for r in children}
        <= {r.info.run_id for r in parents[:1]},
        "one child run per trial": len(children) == expected
        and len({r.data.tags["caspl.trial_id"] for r in children}) == expected,
        "children finished": all(r.info.status == "FINISHED" and "test_hm" in r.data.metrics for r in children),
        "summary finished": summary.get("status") == "FINISHED" and summary.get("done") == expected,
    }
    return {"parents": len(parents), "children": len(children), "expected": expected, "checks": checks}


def kill_at_instants(data: dict, work: Path, instants: int, env: dict) -> dict:
    """The whole procedure on study config `data` (its storage and tracking set inside `work`)."""
    storage = Path(data["storage"])
    sibling = storage / "another_study"
    sibling.mkdir(parents=True, exist_ok=True)
    (sibling / "results.txt").write_text("results of another study: must survive\n")
    sibling_before = folder_digest(sibling)
    config = work / "study.yaml"
    config.write_text(yaml.safe_dump(data))
    command = [sys.executable, str(SWEEP), "--config", str(config)]
    rounds = []
    for n in range(1, instants + 1):
        rounds.append(run_and_signal(command, storage / data["name"], nth_path(n), env, work / "rounds.log"))
        if rounds[-1]["signalled_at"] is None:
            break
    final = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    (work / "final.log").write_text(final.stdout + final.stderr)
    outcome = check_outcome(data, storage / data["name"])
    outcome["checks"]["final run exits 0"] = final.returncode == 0
    outcome["checks"]["sibling folder unchanged"] = folder_digest(sibling) == sibling_before
    return {"rounds": rounds, **outcome, "ok": all(outcome["checks"].values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG), help="study YAML (default: %(default)s)")
    parser.add_argument("--instants", type=int, default=16, help="rounds, each killed one path later")
    parser.add_argument("--smoke-test", action="store_true", help="4 instants")
    parser.add_argument("--work", help="folder for storage, MLflow and logs (default: a new temporary folder)")
    args = parser.parse_args(argv)

    from caspl.config import load_yaml

    data = load_yaml(args.config)
    work = Path(args.work or tempfile.mkdtemp(prefix="caspl-resume-instants-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data["storage"] = str(work / "runs")
    data["tracking"] = {"env_file": None, "tracking_uri": f"sqlite:///{work}/mlflow.db",
                        "experiment": data.get("tracking", {}).get("experiment") or "resume_instants"}
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    report = kill_at_instants(data, work, 4 if args.smoke_test else args.instants, env)
    report["work"] = str(work)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    from caspl.startup import exit_with

    exit_with(main())

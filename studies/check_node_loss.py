"""Node loss during a study, on a two-node Ray cluster on this machine: the trial resumes on the other node.

Each repeat starts a head and a second node (`ray start`, 1 CPU each, their own temporary folders, RAY_AUTH_MODE
disabled, each in a process session of its own), runs a study of 2 trials of 1 CPU (one per node) against them, and
SIGKILLs every process of the second node, as a machine failure would, once a trial there has finished its second
adapting epoch. Tune's FailureConfig retries the trial on the head as soon as a CPU is free there; the trial restores
its checkpoint (its MLflow run id) and its adapting run resumes after the last finished epoch (adapting runs live in
the shared artefact store). Checked: the study exits 0 with both trials finished; one parent run, FINISHED; one child
run per trial, FINISHED; the killed trial's run was started twice, ended on the head, and logged each adapting epoch
exactly once (no epoch was trained again). Measured: recovery time, from the kill to the killed trial's next finished
epoch (it includes the wait for the head's CPU, held by the other trial).

    python studies/check_node_loss.py                  # 3 repeats of studies/configs/study/tiny_check.yaml
    python studies/check_node_loss.py --smoke-test     # 1 repeat (CI)

Prints one JSON line per repeat and a last line with all of them; exit code 0 when every check of every repeat holds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from caspl.procfs import stat_fields  # noqa: E402

SWEEP = REPO / "studies" / "boost_sweep.py"
CONFIG = REPO / "studies" / "configs" / "study" / "tiny_check.yaml"
RAY = str(Path(sys.executable).parent / "ray")
KILL_AFTER_EPOCHS = 2


def free_ports(count: int, avoid: Iterable[int] = ()) -> list[int]:
    """`count` distinct ports that are free now, none in `avoid`. The sockets stay bound until all are found: a port
    released at once may be handed out again by the next bind (two of a node's ports once came out equal)."""
    sockets, ports = [], []
    try:
        while len(ports) < count:
            sockets.append(socket.socket())
            sockets[-1].bind(("127.0.0.1", 0))
            port = sockets[-1].getsockname()[1]
            if port not in avoid:
                ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


@dataclass
class Node:
    """A Ray node started here by `ray start` in a session of its own: every process of the node (GCS, raylet,
    dashboard and its module processes, agents, Ray Client server, workers) belongs to that session, also once
    reparented, and under a process title that no longer names the node's temporary folder."""

    temp_dir: str
    session: int

    def raylet(self) -> tuple[int, str]:
        """(pid, node id) of the node's raylet."""
        for pid in session_pids(self.session):
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if args and args[0].endswith(b"/raylet"):
                node = next(a for a in args if a.startswith(b"--node_id=")).split(b"=", 1)[1]
                return pid, node.decode()
        raise RuntimeError(f"no raylet in the Ray node under {self.temp_dir}")

    def kill(self, timeout: float = 10.0) -> list[int]:
        """SIGKILL every process of the node, as a machine failure would, and wait (at most `timeout` seconds) until
        none is left. Returns the pids killed."""
        killed: set[int] = set()
        deadline = time.time() + timeout
        while (alive := session_pids(self.session)) and time.time() < deadline:
            for pid in alive:  # again until none is left: a process may fork while its siblings are killed
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed.update(alive)
            time.sleep(0.05)
        return sorted(killed)

    def stop(self) -> None:
        """Kill the node, then delete its temporary folder (made for this node alone: its logs and sockets), unless
        a process of the node outlived the kill."""
        self.kill()
        if not session_pids(self.session):
            shutil.rmtree(Path(self.temp_dir).resolve(), ignore_errors=True)


def session_pids(session: int) -> list[int]:
    """Pids of the live processes in a session (Linux /proc; zombies, dead but not yet reaped, left out)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit():
                continue
            state, _, _, sid = stat_fields(proc)[:4]
            if int(sid) == session and state != "Z":
                found.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def start_node(args: list[str], temp_dir: str, env: dict) -> Node:
    """`ray start ARGS --temp-dir=TEMP_DIR` in a new session (whose id is the pid of `ray start`). TEMP_DIR is the
    node's $TMPDIR too: what its processes put in a temporary folder (the dashboard's multiprocessing left a
    /tmp/pymp-* folder at every stop) is deleted with the node."""
    taken = {int(port) for port in re.findall(r"port=(\d+)", " ".join(args))}  # --port, --dashboard-port
    command = [RAY, "start", *args, "--disable-usage-stats", f"--temp-dir={temp_dir}", *_agent_ports(taken)]
    Path(temp_dir).mkdir(parents=True, exist_ok=True)  # Python ignores a $TMPDIR that does not exist
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**env, "TMPDIR": temp_dir}, start_new_session=True)
    out, _ = proc.communicate(timeout=180)
    node = Node(temp_dir, proc.pid)
    if proc.returncode != 0:
        node.stop()
        raise RuntimeError(f"{' '.join(command)} failed:\n{out[-3000:]}")
    return node


@dataclass
class Cluster:
    address: str
    head: Node
    worker: Node

    def stop(self) -> None:
        """Kill both nodes and delete their temporary folders (`ray stop` would stop every Ray on this machine)."""
        for node in (self.worker, self.head):
            node.stop()


def _agent_ports(taken: set[int]) -> list[str]:
    """Free ports for a node's agents, none of those `taken` by its other flags: another Ray on this machine may
    hold the defaults."""
    flags = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
             "--metrics-export-port")
    return [f"{flag}={port}" for flag, port in zip(flags, free_ports(len(flags), avoid=taken))]


def start_cluster(env: dict) -> Cluster:
    """A head and a second node, 1 CPU each, their temporary folders short (Ray's socket paths must stay < 108
    bytes)."""
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    head = start_node(["--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"],
                      tempfile.mkdtemp(prefix="nlh", dir="/tmp"), env)
    try:
        worker = start_node([f"--address={address}", "--num-cpus=1"], tempfile.mkdtemp(prefix="nlw", dir="/tmp"), env)
    except BaseException:
        head.stop()
        raise
    return Cluster(address, head, worker)


def _client(data: dict):
    from mlflow.tracking import MlflowClient

    return MlflowClient(data["tracking"]["tracking_uri"])


def _children(client, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.data.tags.get("caspl.role") != "baseline"]


def run_once(data: dict, work: Path, env: dict, timeout: float = 900) -> dict:
    """One repeat: cluster up, study, kill the second node's raylet mid-trial, wait, check; cluster down."""
    cluster = start_cluster(env)
    experiment = data["tracking"]["experiment"]
    client = _client(data)
    try:
        _, worker_node = cluster.worker.raylet()
        config = work / "study.yaml"
        config.write_text(yaml.safe_dump(data))
        log = open(work / "study.log", "w")
        driver = subprocess.Popen([sys.executable, str(SWEEP), "--config", str(config)], stdout=log,
                                  stderr=subprocess.STDOUT, env={**env, "RAY_ADDRESS": cluster.address})
        began, killed_at, victim = time.time(), None, None
        while driver.poll() is None and time.time() - began < timeout and victim is None:
            for run in _children(client, experiment):
                on_worker = run.data.tags.get("caspl.node_id") == worker_node
                if on_worker and "adapt/loss" in run.data.metrics \
                        and len(client.get_metric_history(run.info.run_id, "adapt/loss")) >= KILL_AFTER_EPOCHS:
                    cluster.worker.kill()
                    killed_at, victim = time.time(), run.info.run_id
                    break
            time.sleep(0.2)
        if victim is None:
            raise RuntimeError(f"no trial finished an epoch on the second node; see {work / 'study.log'}")
        epochs_before = [m.step for m in client.get_metric_history(victim, "adapt/loss")]
        code = driver.wait(timeout=timeout)
    finally:
        cluster.stop()
    left = [pid for node in (cluster.head, cluster.worker) for pid in session_pids(node.session)]
    return {"exit_code": code, "kill_after_s": round(killed_at - began, 1), "processes_left": len(left),
            **check(client, experiment, data, victim, worker_node, killed_at, epochs_before)}


def check(client, experiment: str, data: dict, victim: str, worker_node: str, killed_at: float,
          epochs_before: list[int]) -> dict:
    """The outcome of one repeat: trials, runs, the killed trial's epochs and recovery time."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.data.tags.get("caspl.role") != "baseline"]
    history = client.get_metric_history(victim, "adapt/loss")
    after = sorted((m for m in history if m.timestamp / 1000 > killed_at), key=lambda m: m.timestamp)
    steps = sorted(m.step for m in history)
    run = client.get_run(victim)
    expected = data["search"]["num_samples"] * len(data["search"]["seeds"])
    epochs = data["adapt"]["optim"]["epochs"]
    checks = {
        "one parent run, FINISHED": [r.info.status for r in parents] == ["FINISHED"],
        "one FINISHED child run per trial": len(children) == expected
        and all(r.info.status == "FINISHED" and "test_hm" in r.data.metrics for r in children)
        and len({r.data.tags["caspl.trial_id"] for r in children}) == expected,
        "killed trial started twice": int(run.data.tags.get("caspl.attempt", 0)) >= 2,
        "killed trial ended on the head": run.data.tags.get("caspl.node_id") != worker_node,
        "each epoch logged once": steps == list(range(1, epochs + 1)),
        "resumed after the last finished epoch": bool(after) and min(m.step for m in after) == max(epochs_before) + 1,
    }
    return {"trials": len(children), "parents": len(parents), "epochs_before_kill": max(epochs_before),
            "resumed_at_epoch": min(m.step for m in after) if after else None, "logged_epochs": steps,
            "recovery_s": round(after[0].timestamp / 1000 - killed_at, 1) if after else None,
            "checks": checks, "ok": all(checks.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG), help="study YAML (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke-test", action="store_true", help="one repeat")
    parser.add_argument("--work", help="folder for storages, MLflow stores and logs (default: a temporary one)")
    args = parser.parse_args(argv)

    from caspl.config import load_yaml

    base = load_yaml(args.config)
    root = Path(args.work or tempfile.mkdtemp(prefix="caspl-node-loss-")).resolve()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    reports = []
    for repeat in range(1 if args.smoke_test else args.repeats):
        work = root / f"repeat{repeat + 1}"
        work.mkdir(parents=True, exist_ok=True)
        data = {**base, "storage": str(work / "runs"),
                "tracking": {"env_file": None, "tracking_uri": f"sqlite:///{work}/mlflow.db",
                             "experiment": "node_loss"},
                "resources": {**base.get("resources", {}), "trial_cpus": 1.0},
                # a fresh artefact store: adapting runs are content-addressed, and a run reused from an earlier
                # repeat would finish without training, leaving nothing to lose mid-trial
                "runtime": {**base.get("runtime", {}), "store": str(work / "store")}}
        began = time.time()
        report = {"repeat": repeat + 1, **run_once(data, work, env), "wall_s": round(time.time() - began, 1)}
        report["ok"] = report["ok"] and report["exit_code"] == 0 and report["processes_left"] == 0
        print(json.dumps(report), flush=True)
        reports.append(report)
    print(json.dumps({"repeats": len(reports), "ok": all(r["ok"] for r in reports),
                      "recovery_s": [r["recovery_s"] for r in reports], "work": str(root)}))
    return 0 if all(r["ok"] for r in reports) else 1


if __name__ == "__main__":
    from caspl.startup import exit_with

    exit_with(main())

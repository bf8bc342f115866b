"""The study: config validation before Ray, an end-to-end tiny study with MLflow, resume after kill -9, and
submission to a running Ray head with `ray job submit`."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from caspl.errors import CasplError
from caspl.study.config import load_study_config
from caspl.study.runner import prepare_study

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "studies" / "boost_sweep.py"


def tiny_study(tmp_path: Path, **changes) -> dict:
    data = {
        "name": "tiny",
        "student": {"name": "caspl-tiny"}, "teacher": {"name": "caspl-tiny-teacher"},
        "data": {"dataset": "toy_shapes", "options": {"n_train": 4, "n_val": 2, "n_test": 2}},
        "methods": ["coop", "ivlp"],
        "search": {"num_samples": 3, "seeds": [1], "max_concurrent": 1, "space": {
            "boost.depth": {"type": "int", "low": 1, "high": "max"},
            "boost.length": {"type": "int", "low": 2, "high": 4},
            "boost.temperature": {"type": "float", "low": 0.5, "high": 4.0, "log": True},
            "coop.n_ctx": {"type": "categorical", "choices": [2, 4]}}},
        "boost": {"optim": {"lr": 0.01, "epochs": 2, "batch_size": 16, "warmup_epochs": 1},
                  "cache": {"views": 2, "batch_size": 64, "crop_scale": [0.5, 1.0]}},
        "adapt": {"shots": 2, "optim": {"lr": 0.01, "epochs": 3, "batch_size": 8, "warmup_epochs": 1},
                  "methods": {"ivlp": {"text_length": 2, "vision_length": 2, "text_depth": 2, "vision_depth": 2}}},
        "storage": str(tmp_path / "runs"),
        "tracking": {"env_file": None, "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "tiny"},
        "resources": {"trial_cpus": 0.5},
        "runtime": {"threads": 1},
    }
    for dotted, value in changes.items():
        target = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            target = target[part]
        target[leaf] = value
    return data


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_registered_base_method_can_be_searched_in_a_study(tmp_path):
    """Studies take their methods from the registry: each base method's trials build at both ends of the space."""
    from caspl.methods import BASE, list_methods
    from caspl.study.runner import check_study
    from conftest import METHOD_CASES

    methods = list_methods(BASE)
    defaults = {m: {k: v for k, v in METHOD_CASES[m].items() if k != "method"} for m in methods}
    study = load_study_config(tiny_study(tmp_path, methods=methods, **{"adapt.methods": defaults}))
    space = check_study(study)
    assert space.methods == methods and "coop.n_ctx" in space.params


BAD_INPUTS = {
    "unknown method": ({"methods": ["coop", "nosuch"]}, "base methods"),
    "depth beyond the student": ({"search.space": {"boost.depth": {"type": "int", "low": 1, "high": 9}}},
                                 "must lie in 1..3"),
    "non-positive temperature": ({"search.space": {"boost.temperature": {"type": "float", "low": 0.0, "high": 2.0}}},
                                 "temperatures must be > 0"),
    "empty search space": ({"search.space": {}}, "search.space is empty"),
    "unknown dataset": ({"data": {"dataset": "imagenet-9000"}}, "imagenet-9000"),
    "unreachable tracking server": ({"tracking": {"env_file": None, "tracking_uri": "http://127.0.0.1:9"}},
                                    "unreachable"),
    "unknown key": ({"adapt.optim": {"lr": 0.01, "epochz": 2}}, "adapt.optim.epochz"),
    "unknown parameter prefix": ({"search.space": {"nosuch.n_ctx": {"type": "int", "low": 1, "high": 2}}},
                                 "the prefix must be"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_study_configs_are_refused_before_ray(tmp_path, case):
    changes, message = BAD_INPUTS[case]
    with pytest.raises(CasplError, match=message):
        prepare_study(load_study_config(tiny_study(tmp_path, **changes)), REPO)


def test_bad_config_exits_2_with_one_line_and_no_ray(tmp_path):
    path = _write(tmp_path, tiny_study(tmp_path, methods=["coop", "nosuch"]))
    done = subprocess.run([sys.executable, str(SWEEP), "--config", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "base methods" in lines[0]
    assert "Started a local Ray instance" not in done.stdout + done.stderr


def _runs(db: Path, experiment: str = "tiny") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def _children(runs):
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _env(tmp_path):
    venv_bin = str(Path(sys.executable).parent)  # `python` in a job's entrypoint must be this interpreter
    return {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
            "CASPL_CACHE": os.environ["CASPL_CACHE"], "RAY_AUTH_MODE": "disabled",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_study_resumes_after_kill_minus_9_without_rerunning_or_duplicating(tmp_path):
    path = _write(tmp_path, tiny_study(tmp_path, **{"search.num_samples": 4}))
    command = [sys.executable, str(SWEEP), "--config", str(path)]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_env(tmp_path),
                             start_new_session=True)
    deadline = time.time() + 300
    finished_before = []
    while time.time() < deadline and first.poll() is None:
        experiment = (tmp_path / "mlflow.db").exists() and client.get_experiment_by_name("tiny")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        finished_before = [r for r in _children(runs) if r.info.status == "FINISHED"]
        if finished_before:
            break
        time.sleep(0.5)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(2)
    end_times = {r.info.run_id: r.info.end_time for r in finished_before}
    second = subprocess.run(command, capture_output=True, text=True, env=_env(tmp_path), timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming" in second.stdout
    children = _children(_runs(tmp_path / "mlflow.db"))
    assert len(children) == 4  # exactly the configured trials, no duplicate runs
    assert len({r.data.tags["caspl.trial_id"] for r in children}) == 4
    assert all(r.info.status == "FINISHED" and "test_hm" in r.data.metrics for r in children)
    for run in children:  # trials finished before the kill were not run again
        if run.info.run_id in end_times:
            assert run.info.end_time == end_times[run.info.run_id]
    parents = [r for r in _runs(tmp_path / "mlflow.db") if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def _stop_head(temp_dir: str) -> None:
    """Stop only this test's head: `ray stop` would also kill the Ray that other tests share."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and temp_dir.encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_runs_the_smoke_study_on_a_running_head(tmp_path):
    env = _env(tmp_path)
    ray_bin = str(Path(sys.executable).parent / "ray")
    gcs, dashboard = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 bytes
    start = subprocess.run([ray_bin, "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}",
                            "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats",
                            # free ports: the session's shared Ray already holds the default agent ports
                            f"--dashboard-agent-listen-port={_free_port()}",
                            f"--dashboard-agent-grpc-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
                            f"--metrics-export-port={_free_port()}",
                            f"--temp-dir={temp_dir}"], capture_output=True, text=True, env=env, timeout=120)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        submit = subprocess.run(
            [sys.executable, str(REPO / "ray_jobs" / "submit.py"), "--address", f"http://127.0.0.1:{dashboard}",
             "--storage", str(tmp_path / "runs"), "--", "--smoke-test", "--name", "submitted"],
            capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in (submit.stdout + submit.stderr).lower()
    finally:
        _stop_head(temp_dir)
    runs = _runs(tmp_path / "mlflow.db", "caspl")  # mlflow.env's experiment, the tracking URI from the environment
    assert [r.data.tags["caspl.study"] for r in runs if "mlflow.parentRunId" not in r.data.tags] == ["submitted"]
    assert len(_children(runs)) == 2 and all("test_hm" in r.data.metrics for r in _children(runs))


@pytest.mark.slow
def test_smoke_test_of_the_embedded_default_logs_one_parent_and_its_trials(tmp_path):
    """`boost_sweep.py --smoke-test` on the shipped default (ToyWorld models, built on first use), MLflow via env."""
    done = subprocess.run([sys.executable, str(SWEEP), "--smoke-test", "--storage", str(tmp_path / "runs")],
                          capture_output=True, text=True, env=_env(tmp_path), timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = _runs(tmp_path / "mlflow.db", "caspl")  # the experiment named in mlflow.env
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["caspl.study"] == "toy_default-smoke"
    assert parents[0].info.status == "FINISHED" and "best_test_hm" in parents[0].data.metrics
    children = _children(runs)
    assert len(children) == 2 and {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"val_hm", "test_hm", "adapt/loss", "adapt/val_acc", "boost/kd_loss"} <= set(child.data.metrics)
    assert "best on validation HM" in done.stdout and "mlflow ui --backend-store-uri" in done.stdout


def test_runs_of_trials_that_tune_never_recorded_are_deleted(tmp_path):
    from caspl.study.tracking import TrackingSettings, delete_orphan_trial_runs, start_parent_run, trial_run

    settings = TrackingSettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="orphans")
    parent = start_parent_run(settings, "orphans", {}, None)
    runs = {tid: trial_run(settings, parent, tid, f"trial {tid}", {}) for tid in ("a", "b", "lost")}
    assert delete_orphan_trial_runs(settings, parent, {"a", "b"}) == [runs["lost"]]
    left = _runs(tmp_path / "mlflow.db", "orphans")
    assert sorted(r.data.tags["caspl.trial_id"] for r in _children(left)) == ["a", "b"]
    assert delete_orphan_trial_runs(settings, parent, {"a", "b"}) == []


@pytest.mark.slow
def test_study_on_uri_storage_resumes_into_the_same_parent_run(tmp_path):
    """Storage given as a URI (as for a cloud bucket) keeps the study state there: a rerun resumes, no new parent."""
    path = _write(tmp_path, tiny_study(tmp_path, **{"search.num_samples": 2, "storage": f"file://{tmp_path}/uri"}))
    command = [sys.executable, str(SWEEP), "--config", str(path)]
    for attempt in ("first", "again"):
        done = subprocess.run(command, capture_output=True, text=True, env=_env(tmp_path), timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming" in done.stdout
    assert (tmp_path / "uri" / "tiny" / "caspl_study.json").exists()
    runs = _runs(tmp_path / "mlflow.db")
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
    assert len(_children(runs)) == 2

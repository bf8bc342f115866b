"""What a study leaves for its users, without Ray: lineage tags from real git repositories, the Optuna export from
Tune's trial rows into a real SQLite storage, the dashboard command, and the console's summary lines."""

import subprocess
from pathlib import Path

import optuna
import pytest

from caspl.study.config import load_study_config
from caspl.study.console import runs_view_url, summary_lines
from caspl.study.lineage import dataset_inputs, dataset_specs, source_tags, split_digest
from caspl.study.optuna_store import export_study, importances
from caspl.study.space import build_space
from caspl.study.storage import StudyFolder

REPO = Path(__file__).resolve().parents[1]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_source_tags_name_commit_branch_dirty_flag_script_and_user(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "study-branch")
    (repo / "run.py").write_text("print(1)\n")
    _git(repo, "add", "run.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    tags = source_tags(repo, script=str(repo / "run.py"))
    assert tags["mlflow.source.git.commit"] == _git(repo, "rev-parse", "HEAD")
    assert tags["mlflow.source.git.branch"] == "study-branch" and tags["caspl.git.dirty"] == "false"
    assert tags["mlflow.source.name"] == "run.py" and tags["mlflow.user"]
    (repo / "run.py").write_text("print(2)\n")  # an uncommitted change: the commit alone no longer names the code
    assert source_tags(repo, script=str(repo / "run.py"))["caspl.git.dirty"] == "true"
    # no checkout (a submitted job's copy of the repository): what the submitter passed in the environment
    plain = tmp_path / "copy"
    plain.mkdir()
    monkeypatch.setenv("CASPL_GIT_COMMIT", "abc123")
    monkeypatch.setenv("CASPL_GIT_DIRTY", "true")
    tags = source_tags(plain, script=str(plain / "run.py"))
    assert tags["mlflow.source.git.commit"] == "abc123" and tags["caspl.git.dirty"] == "true"
    assert "mlflow.source.git.branch" not in tags


def test_dataset_inputs_carry_name_split_and_a_digest_that_follows_the_items(tmp_path):
    from caspl.data.base import Dataset, Item

    items = [Item(str(tmp_path / f"{i}.png"), i % 2, f"c{i % 2}") for i in range(4)]
    dataset = Dataset(name="toy", classnames=["c0", "c1"], template="a {}", train=items, val=items[:2],
                      test=items[2:], root=str(tmp_path))
    specs = dataset_specs(dataset, {"train": "train", "test": "test"})
    inputs = dataset_inputs(specs)
    assert [(i.dataset.name, i.tags[0].value) for i in inputs] == [("toy/train", "train"), ("toy/test", "test")]
    assert inputs[0].dataset.digest == split_digest(str(tmp_path), items) != inputs[1].dataset.digest
    relabelled = [Item(items[0].path, 1, "c1"), *items[1:]]
    assert split_digest(str(tmp_path), relabelled) != split_digest(str(tmp_path), items)
    assert split_digest(str(tmp_path), list(reversed(items))) == split_digest(str(tmp_path), items)


def _study(tmp_path: Path, seeds=(1,)):
    data = {"name": "s", "student": {"name": "caspl-tiny"}, "teacher": {"name": "caspl-tiny-teacher"},
            "data": {"dataset": "toy_shapes"}, "methods": ["coop", "ivlp"], "storage": str(tmp_path / "runs"),
            "search": {"seeds": list(seeds), "space": {
                "boost.depth": {"type": "int", "low": 1, "high": "max"},
                "boost.temperature": {"type": "float", "low": 0.5, "high": 4.0, "log": True},
                "coop.n_ctx": {"type": "categorical", "choices": [2, 4]}}}}
    study = load_study_config(data)
    return study, build_space(study, student_layers=3)


def _row(trial_id, params, val_hm=None, seed_index=0, error=None, status="FINISHED"):
    metrics = {} if val_hm is None else {"finished": True, "val_hm": val_hm, "test_base": 50.0, "test_novel": 40.0,
                                         "test_hm": 44.4444}
    return {"trial_id": trial_id, "params": params, "seed_index": seed_index, "metrics": metrics, "done": bool(metrics),
            "error": error, "status": status}


def test_optuna_export_holds_the_finished_trials_linked_to_tune_and_mlflow(tmp_path):
    study, space = _study(tmp_path)
    folder = StudyFolder(str(tmp_path / "runs"), "s")
    coop = {"method": "coop", "boost.depth": 2, "boost.temperature": 1.5, "coop.n_ctx": 4}
    ivlp = {"method": "ivlp", "boost.depth": 3, "boost.temperature": 0.7}
    rows = [_row("t1", coop, 30.5), _row("t2", ivlp, 41.25), _row("t3", {**ivlp, "boost.depth": 1}, error="boom",
                                                                      status="FAILED"),
            _row("t4", {**coop, "boost.depth": 1}, status="KILLED")]  # still open: not exported
    exported = export_study(folder, "s", space, rows, {"t1": "run1", "t2": "run2"}, "val_hm", {"k": "v"})
    stored = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/runs/s/optuna.db")
    for loaded in (exported, stored):
        complete = loaded.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        assert [(t.params, t.value, t.user_attrs["tune_trial_id"], t.user_attrs["mlflow_run_id"])
                for t in complete] == [(coop, 30.5, "t1", "run1"), (ivlp, 41.25, "t2", "run2")]
        assert [t.params for t in loaded.get_trials(states=(optuna.trial.TrialState.FAIL,))] == [rows[2]["params"]]
        assert len(loaded.trials) == 3 and loaded.user_attrs["k"] == "v"
        assert loaded.best_trial.user_attrs["tune_trial_id"] == "t2"
    # rebuilt whole on the next run (a resumed study): the killed trial finished meanwhile
    rows[3] = _row("t4", rows[3]["params"], 35.0)
    export_study(folder, "s", space, rows, {}, "val_hm", {})
    stored = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/runs/s/optuna.db")
    assert len(stored.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 3 and len(stored.trials) == 4
    assert sorted(p.name for p in (tmp_path / "runs" / "s").iterdir()) == ["optuna.db"]  # no temporary files left


def test_optuna_export_of_repeats_is_one_trial_per_configuration_with_the_mean(tmp_path):
    study, space = _study(tmp_path, seeds=(1, 2))
    params = {"method": "ivlp", "boost.depth": 2, "boost.temperature": 1.0}
    rows = [_row("a", params, 40.0, 0), _row("b", params, 50.0, 1)]
    exported = export_study(StudyFolder(str(tmp_path / "runs"), "s"), "s", space, rows, {"a": "ra", "b": "rb"},
                            "val_hm", {})
    [trial] = exported.trials
    assert trial.value == 45.0 and trial.user_attrs["tune_trial_id"] == "a,b"
    assert trial.user_attrs["mlflow_run_id"] == "ra,rb" and trial.user_attrs["seeds"] == 2


def test_importances_need_two_completed_trials_with_a_spread(tmp_path):
    study, space = _study(tmp_path)
    folder = StudyFolder(str(tmp_path / "runs"), "s")
    base = {"method": "ivlp", "boost.temperature": 1.0}
    one = export_study(folder, "s", space, [_row("a", {**base, "boost.depth": 1}, 40.0)], {}, "val_hm", {})
    assert importances(one) == {}
    rows = [_row(str(d), {**base, "boost.depth": d, "boost.temperature": 0.5 + d / 4}, 10.0 * d) for d in (1, 2, 3)]
    found = importances(export_study(folder, "s", space, rows, {}, "val_hm", {}))
    assert {"boost.depth", "boost.temperature"} <= set(found) <= {"boost.depth", "boost.temperature", "method"}
    assert found.get("method", 0.0) < 0.05  # one value in every trial: it explains (next to) nothing
    assert sum(found.values()) == pytest.approx(1.0)


def test_dashboard_command_opens_the_study_storage_or_says_what_is_missing(tmp_path, capsys):
    from caspl.cli import main

    study, space = _study(tmp_path)
    config = tmp_path / "study.yaml"
    config.write_text(f"name: s\nstorage: {tmp_path / 'runs'}\n")
    assert main(["study", "dashboard", "-c", str(config), "--print"]) == 2
    assert "optuna.db does not exist" in capsys.readouterr().err
    export_study(StudyFolder(str(tmp_path / "runs"), "s"), "s", space, [], {}, "val_hm", {})
    assert main(["study", "dashboard", "-c", str(config), "--print", "--port", "8099"]) == 0
    assert capsys.readouterr().out.strip() == (f"optuna-dashboard sqlite:///{tmp_path}/runs/s/optuna.db "
                                               "--host 127.0.0.1 --port 8099")


def test_summary_lines_end_on_the_runs_view():
    summary = {"status": "FINISHED", "message": "all 2 trials finished", "finished": 2, "errored": 0,
               "expected_trials": 2, "wall_seconds": 50.0, "model_build_seconds": 3.0, "teacher_cache_seconds": 9.0,
               "phase_seconds": {"checks": 1.04, "ray_start": 4.5, "tune": 30.0, "ray_shutdown": 2.0},
               "summary_dir": "/s/summary", "optuna_storage": "sqlite:////s/optuna.db", "study": "s",
               "dashboard_command": "optuna-dashboard sqlite:////s/optuna.db", "importances": {"boost.depth": 0.7},
               "mlflow_ui_command": "mlflow ui", "runs_url": runs_view_url("sqlite:////m.db", "7"),
               "objective": "pseudo_novel", "spearman_with_test_hm": {"pseudo_hm": 0.8, "val_hm": 0.7},
               "best": {"objective": 20.0, "val_hm": 21.0, "test_base": 30.0, "test_novel": 25.0, "test_hm": 27.27,
                        "seeds": 1,
                        "params": {"method": "coop"}, "runs": [{"run_name": "coop+caspl d=1", "run_id": "r1"}]}}
    lines = summary_lines(summary)
    assert lines[-1] == "[study] MLflow runs: http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert "coop+caspl d=1  run r1" in lines[2] and "teacher cache 9 s" in lines[0]
    assert "best on the objective, pseudo_novel (20.00)" in lines[2]
    assert lines[1] == "[study] time by phase: checks 1.0 s, Ray start 4.5 s, Tune (trials) 30.0 s, Ray shutdown 2.0 s"
    assert "[study] Spearman(pseudo_hm, test HM) over finished trials: 0.80" in lines
    assert runs_view_url("http://mlflow.example:5000/", "3") == \
        "http://mlflow.example:5000/#/experiments/3/runs?workflowType=machine_learning"


def test_a_trial_stopped_between_its_final_report_and_mlflow_is_finished_from_its_checkpoint(tmp_path):
    """Ctrl-C can stop a trial after Tune got its final result (with the checkpoint) but before it logged the final
    metrics: the driver finishes that run from the checkpoint, and leaves runs that are done alone."""
    import json

    from ray.tune import Checkpoint, Result

    from caspl.study.tracking import TrackingSettings, client, open_parent_run, trial_run
    from caspl.study.trial import finish_reported_trials

    settings = TrackingSettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="stopped")
    parent = open_parent_run(settings, "s", "uid", {}, None)
    results = []
    for trial_id, finished in (("cut", True), ("running", False)):
        run_id = trial_run(settings, parent, trial_id, trial_id, {})
        folder = tmp_path / trial_id / "checkpoint_000001"
        folder.mkdir(parents=True)
        final = {"phase": "finished", "finished": True, "trial_id": trial_id, "val_hm": 12.3456, "test_hm": 7.891}
        (folder / "trial_state.json").write_text(json.dumps({"mlflow_run_id": run_id, "final": final}))
        registered = None if trial_id == "cut" else Checkpoint(str(folder))  # stopped before Tune registered it
        results.append(Result(metrics={"finished": finished, "val_hm": 12.3456}, checkpoint=registered,
                              path=str(tmp_path / trial_id), error=None))
    finish_reported_trials(settings, results)
    runs = {r.data.tags["caspl.trial_id"]: r for r in client(settings).search_runs(
        [client(settings).get_experiment_by_name("stopped").experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")}
    assert runs["cut"].info.status == "FINISHED"
    assert runs["cut"].data.metrics == {"val_hm": 12.35, "test_hm": 7.89}  # as shown: 2 decimals
    assert runs["running"].info.status == "RUNNING" and not runs["running"].data.metrics


def test_a_trials_next_attempt_or_the_study_removes_the_scratch_folder_a_killed_attempt_left(tmp_path, monkeypatch):
    """A killed trial process cannot remove its scratch folder; the next attempt of the same trial of the same study
    does, and the study removes those of its trials at its end. Other studies' folders, and a link in a folder's
    place, are left alone."""
    import tempfile

    from caspl.study.trial import remove_scratch_folders, trial_work_folder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    parent, other_parent = "a" * 32, "b" * 32
    killed = trial_work_folder(parent, "t1")
    (killed / "trial_state.json").write_text("{}")
    for folder in (trial_work_folder(parent, "t2"), trial_work_folder(other_parent, "t1")):
        (folder / "trial_state.json").write_text("{}")
    again = trial_work_folder(parent, "t1")
    assert again == killed and list(again.iterdir()) == []
    assert len(list(tmp_path.glob("caspl-trial-*/trial_state.json"))) == 2

    target = tmp_path / "not_a_trials"
    target.mkdir()
    (target / "keep").write_text("1")
    (tmp_path / f"caspl-trial-{'c' * 12}-t1").symlink_to(target)
    fresh = trial_work_folder("c" * 32, "t1")
    assert fresh.is_dir() and fresh.parent == tmp_path and not fresh.is_symlink() and (target / "keep").exists()

    assert remove_scratch_folders(parent) == 2
    assert remove_scratch_folders("c" * 32) == 1 and not fresh.exists()  # the fallback folder, not the link
    assert [path.name for path in tmp_path.glob("caspl-trial-*/trial_state.json")] == ["trial_state.json"]
    assert (tmp_path / f"caspl-trial-{'c' * 12}-t1").is_symlink() and (target / "keep").exists()


def test_the_study_waits_for_its_trial_workers_on_this_machine_to_exit():
    """Before Ray's shutdown (which would SIGTERM a worker still exiting): this host's trial pids, awaited until gone
    or a zombie, never past the timeout."""
    import socket
    import subprocess
    import sys
    import time

    from caspl.study.runner import await_exit, trial_worker_pids

    host = socket.gethostname()
    rows = [{"metrics": {"pid": 11, "hostname": host}}, {"metrics": {"pid": 11, "hostname": host}},
            {"metrics": {"pid": 12, "hostname": "another-node"}}, {"metrics": {}}]
    assert trial_worker_pids(rows) == {11}

    exiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    began = time.time()
    assert await_exit({exiting.pid}, timeout=30) == set()
    assert 0.2 < time.time() - began < 10
    exiting.wait()

    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    time.sleep(1.0)  # exited, not yet reaped: a zombie has nothing left to interrupt
    assert await_exit({zombie.pid}, timeout=30) == set()
    zombie.wait()

    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        began = time.time()
        assert await_exit({running.pid}, timeout=0.3) == {running.pid}
        assert time.time() - began < 5
    finally:
        running.kill()
        running.wait()


def test_a_trial_whose_checkpoint_is_gone_is_not_sent_to_a_rerun_that_would_fail_it_again():
    """Tune's restore raises for a trial whose named checkpoint is missing, on every rerun: the verdict says so and
    points at --fresh; any other error keeps the advice to run again."""
    import yaml

    from caspl.study.runner import _verdict

    study = load_study_config(yaml.safe_load((REPO / "studies/configs/study/toy_default.yaml").read_text()))
    gone = ("ValueError: Could not recover from checkpoint as it does not exist on storage anymore. Got storage fs "
            "type `py::caspl-atomic-local` and path: /runs/tiny/077640e7/checkpoint_000001")
    rows = [{"trial_id": "aaaa0001", "done": True, "error": None},
            {"trial_id": "077640e7", "done": False, "error": gone}]
    verdict = _verdict(study, rows, None)
    assert (verdict["status"], verdict["exit_code"]) == ("FAILED", 1)
    assert "077640e7 cannot resume" in verdict["message"] and "--fresh" in verdict["message"]
    assert "run the same command again" not in verdict["message"]

    rows[1]["error"] = "RuntimeError: CUDA out of memory"
    message = _verdict(study, rows, None)["message"]
    assert "run the same command again" in message and "cannot resume" not in message

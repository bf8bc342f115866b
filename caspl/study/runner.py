"""Build, run and resume a study on Ray Tune with Optuna.

The order is the point:
1. `prepare_study` checks everything before Ray starts (`checks.py`, the study folder, the artefact store, the
   tracking store, a resumed study's config and parent run): a problem is one line and exit code 2.
2. `--fresh` deletes the study folder, and only it (a folder a killed `--fresh` left behind is finished off).
3. The start is atomic with respect to resume: the study state (a uid and the config hash) is written first; the
   parent run is found by that uid or created, then recorded. A kill at any instant leaves no state, or one the
   rerun continues from with the same parent run. Tune is restored from its newest complete session
   (`StudyFolder.settle_tune_state`), else started afresh under the same parent run.
4. Trials run with `FailureConfig(max_failures)`: a trial whose worker process or node dies is retried on another
   worker from its last checkpoint, under the same MLflow run.
5. The end settles every run: each trial's child run gets its final status, runs of trials Tune never recorded are
   deleted, the finished trials are counted against the configured number, the summary is published in the study
   folder, and the parent run gets FINISHED (exit 0), FAILED (exit 1; the rerun finishes the rest) or KILLED
   (exit 128 + signal). A failure or interrupt before the end closes the open runs FAILED or KILLED.
6. The study's Optuna trials are exported to `<storage>/<name>/optuna.db`, baselines logged as child runs, the
   parent run described (report.py); a Ray this call started is shut down, then the summary is printed: the last
   lines on the console.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from caspl import __version__
from caspl.artifacts import ArtifactStore
from caspl.config import config_hash, from_dict, to_dict
from caspl.errors import ConfigError
from caspl.study import signals
from caspl.study.checks import check_resources, check_study, local_resources
from caspl.study.config import StudyConfig
from caspl.study.console import StatusTable, summary_lines
from caspl.study.lineage import dataset_inputs, dataset_specs, source_tags
from caspl.study.report import OBJECTIVE, summarise, trial_rows
from caspl.study.space import SearchSpace, trial_configs
from caspl.study.storage import StudyFolder, normalise_storage, probe_writable
from caspl.study.trial import finish_reported_trials, remove_scratch_folders
from caspl.study.tracking import (TrackingSettings, check_parent_run, check_tracking, client, close_open_runs,
                                  absolute_uri, log_inputs_once, open_parent_run, read_env_file, settle_trial_runs,
                                  tracking_settings)

__all__ = ["OBJECTIVE", "PreparedStudy", "check_study", "prepare_study", "run_study"]

Log = Callable[[str], None]


@dataclass
class PreparedStudy:
    study: StudyConfig
    space: SearchSpace
    tracking: TrackingSettings
    folder: StudyFolder
    store: ArtifactStore
    state: dict = field(default_factory=dict)  # the study state found in the folder ({} for a new study)
    run_tags: dict = field(default_factory=dict)  # lineage tags of every run: git commit, branch, dirty, source, user
    datasets: list = field(default_factory=list)  # what the runs read (`lineage.dataset_specs`), logged as inputs
    ui_command: str = ""  # how to open the MLflow UI on this study's tracking store
    phase_seconds: dict = field(default_factory=dict)  # where the wall time went, phase by phase (summary.json);
    # "models": loading (on first use: building) the student and teacher; "teacher_cache": the cache alone

    @property
    def experiment_dir(self) -> str:
        return self.folder.path


def prepare_study(study: StudyConfig, repo_root: Path, log: Log = print, *, fresh: bool = False) -> PreparedStudy:
    """Every check that can run before Ray: the config (what trials build), resources of a local Ray, the study
    folder, the artefact store and the tracking store (written to, as a probe), and a resumed study's state."""
    space = check_study(study)
    if _local_ray(study):
        check_resources(study, local_resources(study))
    env_file = study.tracking.env_file
    if env_file is not None and not Path(env_file).is_absolute():
        env_file = repo_root / env_file
    tracking = tracking_settings(env_file, study.tracking.tracking_uri, study.tracking.experiment, log=log)
    check_tracking(tracking)
    store = ArtifactStore(study.runtime.store)
    folder = StudyFolder(normalise_storage(study.storage), study.name)
    folder.check(_protected_paths(store, tracking))
    probe_writable(store.root, "artefact store (runtime.store or $CASPL_CACHE)")
    state = {} if fresh else folder.read_state()
    if state and not state.get("deleting"):
        if state.get("config_hash") != config_hash(study):
            raise ConfigError(f"{folder.path} holds a study with another config; use --fresh or another name")
        if state.get("parent_run_id"):
            check_parent_run(tracking, state["parent_run_id"], folder.path)
    return PreparedStudy(study, space, tracking, folder, store, state, run_tags=source_tags(repo_root),
                         ui_command=ui_command(tracking, env_file))


def ui_command(tracking: TrackingSettings, env_file: Path | None) -> str:
    """The command that opens the MLflow UI on the study's store: `mlflow --env-file ... ui` when the env file names
    this store (run it in the env file's folder, as MLflow resolves relative paths there), else the store's URI."""
    serve = "ui --host 127.0.0.1 --port 5000"
    uri = tracking.tracking_uri
    if uri.startswith(("http://", "https://")):
        return f"the tracking server {uri}"
    if env_file is not None and Path(env_file).is_file():
        folder = Path(env_file).resolve().parent
        backend = read_env_file(env_file).get("MLFLOW_BACKEND_STORE_URI")
        if backend and absolute_uri(backend, folder) == uri:
            return f"cd {folder} && mlflow --env-file {Path(env_file).name} {serve}"
    return f"mlflow {serve} --backend-store-uri {uri}"


def _local_ray(study: StudyConfig) -> bool:
    """Whether the study starts its own Ray here (so its resources are known before it starts). A cluster in
    $RAY_ADDRESS may autoscale: what it has now is no limit."""
    ray = sys.modules.get("ray")
    return not os.environ.get("RAY_ADDRESS") and not (ray is not None and ray.is_initialized())


def _log_cluster(log: Log) -> None:
    import ray

    have = ray.cluster_resources()
    log(f"[study] Ray cluster now: {have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs, "
        f"{len(ray.nodes())} node(s) (an autoscaling cluster may add more)")


def _protected_paths(store: ArtifactStore, tracking: TrackingSettings) -> dict[str, Path]:
    """Folders and files the study folder must not contain (its --fresh would delete them)."""
    paths = {"artefact store": store.root}
    if tracking.tracking_uri.startswith("sqlite:///"):
        db = Path(tracking.tracking_uri[len("sqlite:///"):])
        paths.update({"MLflow database": db, "MLflow artefact folder": db.parent / "mlartifacts"})
    return paths


def run_study(study: StudyConfig, repo_root: Path, *, fresh: bool = False, log: Log = print) -> dict:
    """Run (or resume) the study; returns the summary, whose `status` and `exit_code` say how it ended."""
    import ray

    from caspl.ray_env import ensure_ray

    began = time.time()
    prepared = prepare_study(study, repo_root, log, fresh=fresh)
    if fresh or prepared.state.get("deleting"):
        if prepared.folder.remove():
            log(f"[study] --fresh: removed {prepared.folder.path}")
        prepared.state = {}
    phases = prepared.phase_seconds
    phases["checks"] = time.time() - began
    local = _local_ray(study)
    ours = not ray.is_initialized()  # a Ray this call starts (or joins from $RAY_ADDRESS) is shut down at the end
    with _phase(phases, "ray_start"):
        ensure_ray(num_cpus=study.resources.ray_num_cpus)
    if not local:
        _log_cluster(log)
    with signals.handled() as interrupts:
        started = time.time()
        _warm_shared_artifacts(prepared, log)
        with _phase(phases, "open_parent_run"):
            prepared.datasets = _dataset_specs(study)
            parent = _open_study(prepared)
        try:
            summary = _run(prepared, parent, interrupts, started, log)
        except BaseException as exc:
            close_open_runs(prepared.tracking, parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
    if ours:
        with _phase(phases, "ray_shutdown"):
            ray.shutdown()  # Ray's log monitor forwards workers' lines until then: the summary must come after them
    summary["phase_seconds"] = {name: round(seconds, 1) for name, seconds in phases.items()}
    for line in summary_lines(summary):
        log(line)
    return summary


@contextmanager
def _phase(phases: dict, name: str) -> Iterator[None]:
    began = time.time()
    try:
        yield
    finally:
        phases[name] = time.time() - began


def _dataset_specs(study: StudyConfig) -> list[dict]:
    """The data set the runs read, split by split (the boosting data set's train split too when it differs)."""
    from caspl.train.adapt import load_dataset

    specs = [spec for data in study.datasets
             for spec in dataset_specs(load_dataset(data), {"train": "train", "val": "validation", "test": "test"})]
    if study.boost.data is not None and study.boost.data not in study.datasets:
        specs += dataset_specs(load_dataset(study.boost.data), {"train": "distillation"})
    return specs


def _open_study(prepared: PreparedStudy) -> str:
    """The atomic start: the study state first, then the parent run (found by the state's uid, or created), then
    the state again with the parent run's id. Returns the parent run id."""
    study, folder = prepared.study, prepared.folder
    state = dict(prepared.state)
    if not state:
        state = {"uid": uuid.uuid4().hex, "config_hash": config_hash(study), "version": __version__}
        folder.write_state(state)
    state.setdefault("uid", uuid.uuid4().hex)  # a study started by an older version
    parent = open_parent_run(prepared.tracking, study.name, state["uid"],
                             {**_study_tags(study, folder), **prepared.run_tags}, state.get("parent_run_id"))
    if state.get("parent_run_id") != parent:
        folder.write_state({**state, "parent_run_id": parent})
    log_inputs_once(prepared.tracking, parent, dataset_inputs(prepared.datasets))
    _log_study_config(prepared, parent)
    return parent


def _log_study_config(prepared: PreparedStudy, parent: str) -> None:
    """The resolved study config as an artefact of the parent run (its settings are not repeated as parameters)."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="caspl-config-") as tmp:
        path = Path(tmp) / "study_config.json"
        path.write_text(json.dumps(to_dict(prepared.study), indent=1, default=str))
        client(prepared.tracking).log_artifact(parent, str(path))


def _run(prepared: PreparedStudy, parent: str, interrupts: signals.Interrupts, started: float, log: Log) -> dict:
    study = prepared.study
    with _phase(prepared.phase_seconds, "tune"):
        tuner = _tuner(prepared, parent, log)
        try:
            results = tuner.fit()
        finally:
            interrupts.rearm()  # Tune leaves its own SIGINT handler behind
    began = time.time()
    rows = trial_rows(results)
    verdict = _verdict(study, rows, interrupts.signum)
    finish_reported_trials(prepared.tracking, results)
    orphans = settle_trial_runs(prepared.tracking, parent, {row["trial_id"]: row["status"] for row in rows})
    if orphans:
        log(f"[study] deleted {len(orphans)} MLflow run(s) of trials lost by an interrupted run: {orphans}")
    remove_scratch_folders(parent)  # on this machine; a trial on another node empties its folder when resumed
    summary = summarise(prepared, rows, parent, time.time() - started, verdict, log)
    client(prepared.tracking).set_terminated(parent, verdict["status"])
    await_exit(trial_worker_pids(rows))
    prepared.phase_seconds["report"] = time.time() - began  # settling the runs, writing and logging the summary
    return summary


def trial_worker_pids(rows: list[dict]) -> set[int]:
    """The processes of this machine that ran the trials (Tune reports each result's pid and hostname)."""
    import socket

    host = socket.gethostname()
    return {int(row["metrics"]["pid"]) for row in rows
            if row["metrics"].get("pid") and row["metrics"].get("hostname") == host}


def await_exit(pids: set[int], timeout: float = 10.0) -> set[int]:
    """Wait until these processes have exited; returns those still running at the timeout.

    At its end Tune lets its reused trial workers exit, and an exit takes a moment (the interpreter's shutdown). A Ray
    shutdown meanwhile sends them SIGTERM, and Ray's handler raises SystemExit wherever the worker is: inside a
    weakref callback the interpreter prints "Exception ignored in ... SystemExit: 1" on the study's console (seen in
    about one smoke study in ten here, and failing the job-submit test once)."""
    from caspl.procfs import running  # Linux's /proc: elsewhere nothing is waited for

    deadline = time.time() + timeout
    while pids and time.time() < deadline:
        pids = {pid for pid in pids if running(pid)}
        if pids:
            time.sleep(0.05)
    return {pid for pid in pids if running(pid)}


CHECKPOINT_GONE = "does not exist on storage anymore"  # Tune's restore error (ray.tune.Trainable.restore)


def _verdict(study: StudyConfig, rows: list[dict], signum: int | None) -> dict:
    """The study's status and exit code from its trials: each row gets its run's final status too."""
    for row in rows:
        if row["done"]:
            row["status"] = "FINISHED"
        elif row["error"] is not None:
            row["status"] = "FAILED"
        elif signum is None and study.search.scheduler is not None:
            row["status"], row["done"] = "FINISHED", True  # stopped early by the scheduler: that is its end
        else:
            row["status"] = "KILLED"
    done, expected = sum(row["done"] for row in rows), study.search.trials
    if signum is not None:
        return {"status": "KILLED", "exit_code": 128 + signum, "done": done, "expected": expected,
                "message": f"interrupted with {done}/{expected} trials done; run the same command to resume"}
    if done != expected:
        stranded = [row["trial_id"] for row in rows if CHECKPOINT_GONE in (row["error"] or "")]
        advice = ("run the same command again to finish the rest" if not stranded else
                  f"trial(s) {', '.join(stranded)} cannot resume: Tune's state names a checkpoint that is no longer in "
                  "the storage, so a rerun fails them again; start the study over with --fresh")
        return {"status": "FAILED", "exit_code": 1, "done": done, "expected": expected,
                "message": f"only {done} of the {expected} configured trials finished "
                           f"({sum(r['status'] == 'FAILED' for r in rows)} errored); {advice}"}
    return {"status": "FINISHED", "exit_code": 0, "done": done, "expected": expected,
            "message": f"all {expected} trials finished"}


def _tuner(prepared: PreparedStudy, parent: str, log: Log):
    """Tune restored from the newest complete session of the study folder, or a new Tuner."""
    import optuna
    from ray import tune

    from caspl.study.trial import run_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory with name: optuna"

    study, folder = prepared.study, prepared.folder
    context = {"tracking": {"tracking_uri": prepared.tracking.tracking_uri,
                            "experiment": prepared.tracking.experiment},
               "parent_run_id": parent, "store": str(prepared.store.root), "run_tags": prepared.run_tags,
               "datasets": prepared.datasets}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, study=to_dict(study), context=context),
        {"cpu": study.resources.trial_cpus, "gpu": study.resources.trial_gpus})
    # Tune's automatic loggers would add TensorBoard's (no TensorBoard here; its hint pointed at Ray's temp folder):
    # the study passes the CSV and JSON loggers itself.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    if folder.settle_tune_state(len(study.search.seeds)):
        log(f"[study] resuming {folder.path} (finished trials are kept, errored ones resumed)")
        fs, path = folder.filesystem()
        return tune.Tuner.restore(path, trainable, resume_errored=True, storage_filesystem=fs)
    return _new_tuner(prepared, trainable)


def checkpoint_config():
    """Every checkpoint of a trial is kept (a trial checkpoint is its small state file, one per report). With
    `num_to_keep`, Tune deletes a trial's older checkpoint as it registers a newer one but writes its experiment
    state, which names the newer one, later and in the background: a kill in between left a state naming a deleted
    checkpoint, and that trial then failed on every resume ("does not exist on storage anymore")."""
    from ray import tune

    return tune.CheckpointConfig(num_to_keep=None)


def _new_tuner(prepared: PreparedStudy, trainable):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter, Repeater
    from ray.tune.search.optuna import OptunaSearch

    study = prepared.study
    search = study.search
    searcher = OptunaSearch(space=prepared.space, metric=OBJECTIVE, mode="max", seed=search.searcher_seed,
                            points_to_evaluate=search.points_to_evaluate or None)
    if len(search.seeds) > 1:
        searcher = Repeater(searcher, repeat=len(search.seeds), set_index=True)
    searcher = ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent)
    scheduler = None
    if search.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=search.grace_period,
                                  reduction_factor=search.reduction_factor)
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    status = StatusTable(list(prepared.space.params), OBJECTIVE, "objective")  # Ray's own table shows no parameter
    storage_path, fs = prepared.folder.tune_storage()
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=OBJECTIVE, mode="max", search_alg=searcher, scheduler=scheduler,
                                    num_samples=search.trials,
                                    reuse_actors=True,  # a new trial skips the worker start and its imports
                                    trial_name_creator=lambda t: f"{study.name}_{t.trial_id}",
                                    trial_dirname_creator=lambda t: t.trial_id),
        run_config=tune.RunConfig(name=study.name, storage_path=storage_path, storage_filesystem=fs,
                                  failure_config=tune.FailureConfig(max_failures=study.resources.max_failures),
                                  checkpoint_config=checkpoint_config(),
                                  callbacks=[signals.InterruptWatch(), status, CSVLoggerCallback(),
                                             JsonLoggerCallback()], verbose=0),
    )


def _warm_shared_artifacts(prepared: PreparedStudy, log) -> None:
    """Build the teacher cache once, before trials start (Ray Data actors); trials then only read it."""
    from caspl.models import load_clip
    from caspl.train.boost import BoostRunConfig, prepare_boost

    study = prepared.study
    began = time.time()
    for model in (study.student, study.teacher):  # weights built on first use (ToyWorld): here, not in a trial
        load_clip(model.spec(study.runtime))
    prepared.phase_seconds["models"] = time.time() - began
    began = time.time()
    if any(name.startswith("boost.cache.") for name in prepared.space.params):
        log("[study] the teacher cache itself is searched: each cache variant is built by the first trial needing it")
        return
    for data in study.datasets:
        _, boost, _ = trial_configs(study, {"method": study.methods[0]}, study.search.seeds[0], data)
        _, report = prepare_boost(from_dict(BoostRunConfig, boost, "boost"), prepared.store)
        log(f"[study] teacher cache for {data.dataset} {report.key}: {report.computed} images computed, "
            f"{report.reused} reused, {len(report.skipped)} skipped -> {report.folder}")
    prepared.phase_seconds["teacher_cache"] = time.time() - began


def _study_tags(study: StudyConfig, folder: StudyFolder) -> dict:
    datasets = ",".join(d.dataset for d in study.datasets)
    return {"caspl.version": __version__, "caspl.config_hash": config_hash(study), "dataset": datasets,
            "student": study.student.name, "teacher": study.teacher.name, "caspl.study_folder": folder.path}

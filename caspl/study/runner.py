"""Build, run and resume a study on Ray Tune with Optuna; every check that can fail runs before Ray starts."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from caspl import __version__
from caspl.artifacts import ArtifactStore
from caspl.config import config_hash, from_dict, to_dict
from caspl.errors import ConfigError
from caspl.study.config import StudyConfig
from caspl.study.space import SearchSpace, build_space, trial_configs
from caspl.study.tracking import (TrackingSettings, check_tracking, delete_orphan_trial_runs, start_parent_run,
                                  tracking_settings)

OBJECTIVE = "val_hm"
STATE_FILE = "caspl_study.json"


@dataclass
class PreparedStudy:
    study: StudyConfig
    space: SearchSpace
    tracking: TrackingSettings
    storage: str
    experiment_dir: str
    store: ArtifactStore
    teacher_cache_seconds: float = 0.0


def check_study(study: StudyConfig) -> SearchSpace:
    """Validate what trials will build, without Ray or tracking: data, models, the space and every run config."""
    from caspl.data.registry import resolve_name
    from caspl.models import architecture_config

    resolve_name(study.data.dataset)
    layers = _student_layers(architecture_config(study.student.name))
    architecture_config(study.teacher.name)
    space = build_space(study, layers)
    _check_run_configs(study, space)
    return space


def prepare_study(study: StudyConfig, repo_root: Path, log: Callable[[str], None] = print) -> PreparedStudy:
    """Validate the whole study without starting Ray: data, models, space, run configs, tracking."""
    space = check_study(study)
    env_file = study.tracking.env_file
    if env_file is not None and not Path(env_file).is_absolute():
        env_file = repo_root / env_file
    tracking = tracking_settings(env_file, study.tracking.tracking_uri, study.tracking.experiment, log=log)
    check_tracking(tracking)
    storage = study.storage if "://" in study.storage else str(Path(study.storage).expanduser().resolve())
    experiment_dir = f"{storage.rstrip('/')}/{study.name}"
    return PreparedStudy(study, space, tracking, storage, experiment_dir, ArtifactStore(study.runtime.store))


def _student_layers(cfg: dict) -> int:
    return min(int(cfg["vision_cfg"]["layers"]), int(cfg["text_cfg"]["layers"]))


def _check_run_configs(study: StudyConfig, space: SearchSpace) -> None:
    """Build the boost and adapt configs at both ends of every range, so a bad key fails now, not in trial 7."""
    from caspl.train.adapt import AdaptRunConfig
    from caspl.train.boost import BoostRunConfig

    for method in study.methods:
        for end in (0, -1):
            params = {"method": method}
            for name, spec in space.params.items():
                owner = name.split(".", 1)[0]
                if owner in study.methods and owner != method:
                    continue
                values = spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]
                params[name] = int(values[end]) if spec["type"] == "int" else values[end]
            _, boost, adapt = trial_configs(study, params, seed=study.search.seeds[0])
            from_dict(BoostRunConfig, boost, "boost")
            from_dict(AdaptRunConfig, adapt, "adapt")


def run_study(study: StudyConfig, repo_root: Path, *, fresh: bool = False, log: Callable[[str], None] = print):
    """Run (or resume) the study; returns the summary dict (also logged to the parent MLflow run)."""
    from ray import tune

    from caspl.ray_env import ensure_ray
    from caspl.study.report import summarise
    from caspl.study.trial import run_trial

    prepared = prepare_study(study, repo_root, log)
    ensure_ray(num_cpus=study.resources.ray_num_cpus)
    if fresh and _remove_experiment(prepared.experiment_dir):
        log(f"[study] --fresh: removed {prepared.experiment_dir}")
    resumable = tune.Tuner.can_restore(prepared.experiment_dir) if not fresh else False
    state = _read_state(prepared.experiment_dir) if resumable else {}
    if resumable and state.get("config_hash") not in (None, config_hash(study)):
        raise ConfigError(f"{prepared.experiment_dir} holds a study with another config; use --fresh or another name")
    started = time.time()
    _warm_shared_artifacts(prepared, log)
    prepared.teacher_cache_seconds = time.time() - started
    parent = start_parent_run(prepared.tracking, study.name, _study_tags(study), state.get("parent_run_id"))
    _write_state(prepared.experiment_dir,
                 {"parent_run_id": parent, "config_hash": config_hash(study), "version": __version__})
    context = {"tracking": {"tracking_uri": prepared.tracking.tracking_uri,
                            "experiment": prepared.tracking.experiment},
               "parent_run_id": parent, "store": str(prepared.store.root)}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, study=to_dict(study), context=context),
        {"cpu": study.resources.trial_cpus, "gpu": study.resources.trial_gpus})
    if resumable:
        log(f"[study] resuming {prepared.experiment_dir} (finished trials are kept, errored ones resumed)")
        tuner = tune.Tuner.restore(prepared.experiment_dir, trainable, resume_errored=True)
    else:
        tuner = _new_tuner(prepared, trainable)
    results = tuner.fit()
    orphans = delete_orphan_trial_runs(prepared.tracking, parent, {PurePosixPath(r.path).name for r in results})
    if orphans:
        log(f"[study] deleted {len(orphans)} MLflow run(s) of trials lost by an interrupted run: {orphans}")
    return summarise(prepared, results, parent, time.time() - started, log)


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
    elif search.scheduler is not None:
        raise ConfigError(f"search.scheduler {search.scheduler!r} must be null or 'asha'")
    reporter = tune.CLIReporter(
        metric_columns={"phase": "phase", "epoch": "epoch", OBJECTIVE: "val HM", "test_hm": "test HM"},
        parameter_columns={k: k for k in ["method", *prepared.space.params]}, max_report_frequency=30)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=OBJECTIVE, mode="max", search_alg=searcher, scheduler=scheduler,
                                    num_samples=search.num_samples * len(search.seeds),
                                    reuse_actors=True,  # a new trial skips the worker start and its imports
                                    trial_name_creator=lambda t: f"{study.name}_{t.trial_id}",
                                    trial_dirname_creator=lambda t: t.trial_id),
        run_config=tune.RunConfig(name=study.name, storage_path=prepared.storage, progress_reporter=reporter,
                                  verbose=1),
    )


def _warm_shared_artifacts(prepared: PreparedStudy, log) -> None:
    """Build the teacher cache once, before trials start (Ray Data actors); trials then only read it."""
    from caspl.models import load_clip
    from caspl.train.boost import BoostRunConfig, prepare_boost

    study = prepared.study
    for model in (study.student, study.teacher):  # weights built on first use (ToyWorld): here, not in a trial
        load_clip(model.spec(study.runtime))
    params = {"method": study.methods[0]}
    _, boost, _ = trial_configs(study, params, study.search.seeds[0])
    if any(name.startswith("boost.cache.") for name in prepared.space.params):
        log("[study] the teacher cache itself is searched: each cache variant is built by the first trial needing it")
        return
    _, report = prepare_boost(from_dict(BoostRunConfig, boost, "boost"), prepared.store)
    log(f"[study] teacher cache {report.key}: {report.computed} images computed, {report.reused} reused, "
        f"{len(report.skipped)} skipped -> {report.folder}")


def _study_tags(study: StudyConfig) -> dict:
    return {"caspl.version": __version__, "caspl.config_hash": config_hash(study), "dataset": study.data.dataset,
            "student": study.student.name, "teacher": study.teacher.name}


def _read_state(experiment_dir: str) -> dict:
    """The study's own state next to Tune's (the parent run id), from a local path or any URI Tune accepts."""
    fs, root = _filesystem(experiment_dir)
    path = f"{root}/{STATE_FILE}"
    if fs.get_file_info(path).type.name == "NotFound":
        return {}
    with fs.open_input_stream(path) as stream:
        return json.loads(stream.read().decode())


def _write_state(experiment_dir: str, state: dict) -> None:
    """Write the state atomically: a temporary object, then a move (a rename on local disks)."""
    fs, root = _filesystem(experiment_dir)
    fs.create_dir(root, recursive=True)
    tmp = f"{root}/.{STATE_FILE}.{time.time_ns()}.tmp"
    with fs.open_output_stream(tmp) as stream:
        stream.write(json.dumps(state, indent=1).encode())
    fs.move(tmp, f"{root}/{STATE_FILE}")


def _remove_experiment(experiment_dir: str) -> bool:
    """Delete a study's Tune folder (for --fresh); False when there is none."""
    fs, root = _filesystem(experiment_dir)
    if fs.get_file_info(root).type.name == "NotFound":
        return False
    fs.delete_dir(root)
    return True


def _filesystem(location: str):
    """(pyarrow filesystem, path in it) for a local path or a URI (s3://, gs://, file://, ...): one code path."""
    import pyarrow.fs

    if "://" not in location:
        return pyarrow.fs.LocalFileSystem(), str(Path(location).resolve())
    return pyarrow.fs.FileSystem.from_uri(location)

"""One Tune trial: on each of the study's datasets, boosting (reused by key), the adapting run that drives the
objective (per-epoch validation HM of the pseudo-novel task, or of the labelled base and novel classes), the adapting
run on the real base classes for test numbers, and the method-alone baseline; then their average, to Tune and MLflow.

The trial's checkpoint holds its MLflow run id and the adapting run's resumable state, so a trial resumed after a
crash continues both its training and its MLflow run (no duplicate runs).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from caspl import __version__
from caspl.artifacts import ArtifactStore
from caspl.config import config_hash, from_dict
from caspl.study.config import load_study_config
from caspl.study.report import OBJECTIVE, OBJECTIVE_KEYS
from caspl.study.space import trial_configs
from caspl.study.console import quiet_trial_logging
from caspl.study.lineage import dataset_inputs
from caspl.study.tracking import (ROLE_TAG, TrackingSettings, client, log_inputs_once, log_metric_steps, log_metrics,
                                  log_params, trial_run)
from caspl.train.metrics import harmonic_mean

TRIAL_STATE = "trial_state.json"


def run_trial(config: dict, study: dict, context: dict) -> None:
    """Tune's function trainable. A failure marks the trial's run FAILED before Tune sees it (Tune may retry the
    trial from its last checkpoint, and the retry reopens the same run); a worker or node that dies cannot, so the
    driver settles every run's final status when the study ends."""
    import ray
    from ray import tune

    from caspl.startup import freeze_loaded
    from caspl.train.adapt import AdaptRunConfig

    freeze_loaded()  # the study stack, loaded by Ray as it unpickled this function: out of the collector's walks
    quiet_trial_logging()
    study_cfg = load_study_config(study)
    seed = study_cfg.search.seeds[int(config.get("__trial_index__", 0))]
    params = {k: v for k, v in config.items() if not k.startswith("__")}
    _, _, adapt_dict = trial_configs(study_cfg, params, seed)
    adapt_cfg = from_dict(AdaptRunConfig, adapt_dict, "adapt")
    tracking = TrackingSettings(**context["tracking"])
    trial_id = tune.get_context().get_trial_id()
    work = trial_work_folder(context["parent_run_id"], trial_id)
    state = _restore(work)

    run_id = trial_run(tracking, context["parent_run_id"], trial_id, _run_name(params, seed),
                       tags={ROLE_TAG: "trial", "caspl.version": __version__, "caspl.seed": str(seed),
                             "caspl.adapt_config_hash": config_hash(adapt_cfg), **context.get("run_tags", {})},
                       known_run_id=state.get("mlflow_run_id"))
    state["mlflow_run_id"] = run_id
    state["attempt"] = state.get("attempt", 0) + 1  # starts of this trial: retries after a failure, resumes
    client(tracking).set_tag(run_id, "caspl.attempt", str(state["attempt"]))
    client(tracking).set_tag(run_id, "caspl.node_id", ray.get_runtime_context().get_node_id())
    with _guarded(tracking, run_id, work):
        log_params(tracking, run_id, {**params, "seed": seed})  # the search-space names; resolved configs: artefact
        log_inputs_once(tracking, run_id, dataset_inputs(context.get("datasets", [])))

        if "final" in state:  # finished before a crash: report the same result again, touch nothing else
            finish_mlflow(tracking, run_id, state["final"])
            tune.report(state["final"])
            return

        # trial compute (the overhead benchmark's), in wall and in this process's CPU seconds
        began, began_cpu, reported = time.perf_counter(), time.process_time(), REPORTING.seconds
        trial = _Trial(study_cfg, params, seed, ArtifactStore(context["store"]), tracking, run_id, work, state,
                       trial_id)
        per_dataset = {data.dataset: trial.evaluate(data) for data in study_cfg.datasets}
        final = {"phase": "finished", "finished": True, "trial_id": trial_id,
                 "compute_seconds": time.perf_counter() - began, "compute_cpu_seconds": time.process_time() - began_cpu,
                 "report_seconds": REPORTING.seconds - reported,
                 "peak_rss_mb": peak_rss_mb(),
                 **average_scores(per_dataset)}
        if len(per_dataset) > 1:
            final.update({f"{name}/{k}": v for name, scores in per_dataset.items() for k, v in scores.items()})
        final[OBJECTIVE] = final[OBJECTIVE_KEYS[study_cfg.search.objective]]
        state["final"] = final
        _report(work, state, final)  # the checkpoint holds the result before MLflow is told: a resume re-reports it
        finish_mlflow(tracking, run_id, final)


class _Trial:
    """One trial's work on each dataset: boosting, the objective's adapting run, the test run, the baseline."""

    def __init__(self, study, params: dict, seed: int, store: ArtifactStore, tracking: TrackingSettings,
                 run_id: str, work: Path, state: dict, trial_id: str):
        self.study, self.params, self.seed, self.store = study, params, seed, store
        self.tracking, self.run_id, self.work, self.state, self.trial_id = tracking, run_id, work, state, trial_id
        self.epochs_reported = 0
        self.prefix = ""

    def evaluate(self, data) -> dict[str, float]:
        """Scores on one dataset: pseudo_* (label-free objective), val_*, test_*, baseline_test_*."""
        from caspl.data import pseudo_novel_split
        from caspl.train.adapt import AdaptRunConfig, load_dataset
        from caspl.train.boost import BoostRunConfig, run_boost

        _, boost_dict, adapt_dict = trial_configs(self.study, self.params, self.seed, data)
        boost_cfg, cfg = from_dict(BoostRunConfig, boost_dict, "boost"), from_dict(AdaptRunConfig, adapt_dict, "adapt")
        self.prefix = f"{data.dataset}/" if len(self.study.datasets) > 1 else ""
        boost = run_boost(boost_cfg, self.store, progress=False, log=lambda line: None)
        self._log_boost(boost)
        dataset = load_dataset(cfg.data)
        scores = {}
        if self.study.search.objective == "pseudo_novel":  # the searcher's signal: no novel-class label is read
            pseudo = pseudo_novel_split(dataset, self.study.search.pseudo_split_seed)
            search = self._adapt(cfg, pseudo, boost.prompts, splits=("val",), report=True)
            scores.update(_prefixed("pseudo", search["val"]))
        result = self._adapt(cfg, dataset, boost.prompts, splits=("val", "test"),
                             report=self.study.search.objective == "val_hm")
        scores.update({**_prefixed("val", result["val"]), **_prefixed("test", result["test"])})
        if self.study.baselines:  # the method without CasPL; its run is content-addressed: once per method and seed
            alone = self._adapt(replace(cfg, boost=None), dataset, None, splits=("test",), report=False)
            scores.update(_prefixed("baseline_test", alone["test"]))
        if self.mlflow_status() != "FINISHED":
            _log_artifacts(self.tracking, self.run_id, result, boost_dict, adapt_dict, self.prefix)
        return scores

    def mlflow_status(self) -> str:
        return client(self.tracking).get_run(self.run_id).info.status

    def _log_boost(self, boost) -> None:
        metrics = client(self.tracking).get_run(self.run_id).data.metrics
        if f"{self.prefix}boost/kd_loss" in metrics:  # logged before a resume
            return
        log_metric_steps(self.tracking, self.run_id,
                         [(epoch["epoch"], {self.prefix + k: v for k, v in epoch.items() if k.startswith("boost/")})
                          for epoch in boost.history])
        client(self.tracking).set_tag(self.run_id, f"caspl.{self.prefix}boost_key", boost.key)
        client(self.tracking).set_tag(self.run_id, f"caspl.{self.prefix}teacher_cache_key", boost.cache_key)

    def _adapt(self, cfg, dataset, boost_prompts, splits, report: bool) -> dict:
        """Adapt (resumed or reloaded when its content-addressed run exists) and score `splits`. With `report`, this
        run drives the objective: every epoch's validation HM on `dataset` goes to MLflow and to Tune."""
        on_epoch = self._epoch_reporter(dataset) if report else None
        result = adapt_and_evaluate(cfg, self.seed, self.store, dataset, boost_prompts=boost_prompts,
                                    on_epoch=on_epoch, splits=splits)
        if report:  # epochs MLflow lacks: all of a reused run's; one whose checkpoint beat a kill to `on_epoch`
            logged = {m.step for m in client(self.tracking).get_metric_history(self.run_id,
                                                                               f"{self.prefix}adapt/loss")}
            for epoch in [e for e in result["history"] if e["epoch"] not in logged]:
                log_metrics(self.tracking, self.run_id,
                            {f"{self.prefix}adapt/{k}": v for k, v in epoch.items() if k != "epoch"}, epoch["epoch"])
        return result

    def _epoch_reporter(self, dataset):
        def on_epoch(metrics: dict, model) -> None:
            val = validation_hm(model, dataset)
            self.epochs_reported += 1
            log_metrics(self.tracking, self.run_id,
                        {**{f"{self.prefix}adapt/{k}": v for k, v in metrics.items() if k != "epoch"},
                         **{f"{self.prefix}adapt/objective_{k}": v for k, v in val.items()}}, metrics["epoch"])
            _report(self.work, self.state, {"phase": "adapt", "epoch": self.epochs_reported, OBJECTIVE: val["hm"],
                                            "trial_id": self.trial_id})

        return on_epoch


def peak_rss_mb() -> float:
    """The trial process's peak resident memory so far, in MiB (a reused worker keeps its peak across trials)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _prefixed(prefix: str, scores: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in scores.items()}


def average_scores(per_dataset: dict[str, dict[str, float]]) -> dict[str, float]:
    """Over datasets: the mean of every base and novel accuracy, and each HM recomputed from those means (the
    paper's average); one dataset's scores pass through unchanged."""
    keys = set.intersection(*(set(scores) for scores in per_dataset.values()))
    out = {k: statistics.fmean(scores[k] for scores in per_dataset.values()) for k in keys if not k.endswith("_hm")}
    for key in [k for k in keys if k.endswith("_hm")]:
        stem = key[:-len("hm")]
        out[key] = harmonic_mean(out[f"{stem}base"], out[f"{stem}novel"])
    return out


@contextmanager
def _guarded(tracking: TrackingSettings, run_id: str, work: Path):
    """Mark the run FAILED when the block raises (best effort: the failure may be MLflow's own) and re-raise;
    remove the trial's work folder either way."""
    try:
        yield
    except BaseException:
        try:
            client(tracking).set_terminated(run_id, "FAILED")
        except Exception:
            pass
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def finish_mlflow(tracking: TrackingSettings, run_id: str, final: dict) -> None:
    """Log the final metrics and close the run, once (a resumed trial finds it already FINISHED). Also called by
    the driver for a trial whose final result reached Tune but whose process was stopped before this ran."""
    if client(tracking).get_run(run_id).info.status == "FINISHED":
        return
    log_metrics(tracking, run_id, {k: shown(v) for k, v in final.items()
                                   if k not in ("phase", "finished", "trial_id")}, 0)
    client(tracking).set_terminated(run_id, "FINISHED")


def shown(value):
    """A final metric as MLflow shows it: accuracies and HMs (percentages) and seconds to 2 decimals."""
    return round(value, 2) if isinstance(value, float) else value


def adapt_and_evaluate(cfg, seed: int, store: ArtifactStore, dataset, *, boost_prompts: Path | None,
                       on_epoch=None, splits: tuple[str, ...] = ("val", "test")) -> dict:
    """Adapt (or resume, or reload: adapting runs are content-addressed in the store) and score each of `splits`."""
    from caspl.data.views import model_view_spec
    from caspl.train.adapt import run_adapt
    from caspl.train.evaluate import base_novel_accuracy

    outcome = run_adapt(cfg, seed, store, boost_prompts=boost_prompts, dataset=dataset, log=lambda line: None,
                        on_epoch=on_epoch)
    spec = model_view_spec(outcome.model.clip)
    scores = {split: base_novel_accuracy(outcome.model, dataset, spec, split) for split in splits}
    return {**scores, "history": outcome.history, "prompts": outcome.prompts}


def validation_hm(model, dataset) -> dict:
    """Base/novel/HM on the validation split; the model's training classes are restored afterwards."""
    from caspl.data.views import model_view_spec
    from caspl.train.evaluate import base_novel_accuracy

    classnames, templates = list(model.classnames), list(model.templates)
    scores = base_novel_accuracy(model, dataset, model_view_spec(model.clip), "val")
    model.set_classes(classnames, templates)
    return scores


def finish_reported_trials(tracking: TrackingSettings, results) -> None:
    """A trial reports its final result to Tune (with its checkpoint) before it tells MLflow; an interrupt between
    the two leaves a run Tune counts as finished and will not run again, without its final metrics. Finish those
    runs from the final result in each finished trial's checkpoint (`results`: Tune's), as the trial would have."""
    for result in results:
        if (result.metrics or {}).get("finished"):
            state = checkpoint_state(_newest_checkpoint(result))
            if state.get("final") and state.get("mlflow_run_id"):
                finish_mlflow(tracking, state["mlflow_run_id"], state["final"])


def _newest_checkpoint(result):
    """The newest checkpoint folder in a trial's folder: a stop can come after the trial wrote its final checkpoint
    but before Tune registered it as the result's checkpoint."""
    import pyarrow.fs as pafs
    from ray import tune

    fs = result.filesystem or pafs.LocalFileSystem()
    try:
        infos = fs.get_file_info(pafs.FileSelector(result.path))
    except (FileNotFoundError, OSError):
        return result.checkpoint
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory
                   and i.base_name.startswith("checkpoint_"))
    return tune.Checkpoint(f"{result.path}/{names[-1]}", filesystem=fs) if names else result.checkpoint


def checkpoint_state(checkpoint) -> dict:
    """The trial state (MLflow run id, final result) in a trial's Tune checkpoint; {} when it has none."""
    if checkpoint is None:
        return {}
    try:
        with checkpoint.as_directory() as folder:
            path = Path(folder) / TRIAL_STATE
            return json.loads(path.read_text()) if path.exists() else {}
    except (FileNotFoundError, ValueError):
        return {}


def trial_work_folder(parent_run_id: str, trial_id: str) -> Path:
    """An empty scratch folder for this attempt of the trial. Its name is the trial's within the study (the parent
    run's id), so an attempt removes what a killed or failed attempt of the same trial left on this machine."""
    path = _scratch_root() / f"{_scratch_prefix(parent_run_id)}{trial_id}"
    if _ours(path):
        shutil.rmtree(path)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:  # not ours to remove (another user's, or a link): a folder of its own, which the study
        # still removes at its end (its name starts with the study's prefix)
        return Path(tempfile.mkdtemp(prefix=f"{_scratch_prefix(parent_run_id)}{trial_id}-", dir=_scratch_root()))
    return path


def remove_scratch_folders(parent_run_id: str) -> int:
    """Delete the study's trial scratch folders left on this machine, once its trials have stopped: those of attempts
    killed with no later attempt (a trial that Tune's state never recorded is started again under a new id)."""
    left = [path for path in _scratch_root().glob(f"{_scratch_prefix(parent_run_id)}*") if _ours(path)]
    for path in left:
        shutil.rmtree(path, ignore_errors=True)
    return len(left)


def _scratch_root() -> Path:
    return Path(tempfile.gettempdir())


def _scratch_prefix(parent_run_id: str) -> str:
    return f"caspl-trial-{parent_run_id[:12]}-"


def _ours(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and path.stat().st_uid == os.getuid()


def _restore(work: Path) -> dict:
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as folder:
        shutil.copytree(folder, work, dirs_exist_ok=True)
    path = work / TRIAL_STATE
    return json.loads(path.read_text()) if path.exists() else {}


class _Stopwatch:
    """Seconds summed over the timed calls of this process. Tune reuses a trial's process for the next trial, so a
    trial reads the difference over its own span."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def timing(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - began


REPORTING = _Stopwatch()  # inside tune.report: the checkpoint copy and Tune's hand-off


def _report(work: Path, state: dict, metrics: dict) -> None:
    """Report to Tune with a checkpoint of the trial state and the adapting run's resumable state. A function
    trainable's report blocks until Tune's controller asks for the next result, so the time it takes is counted."""
    from ray import tune

    (work / TRIAL_STATE).write_text(json.dumps(state))
    with REPORTING.timing():
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(work)))


def _run_name(params: dict, seed: int) -> str:
    short = {"boost.depth": "d", "boost.length": "l", "boost.temperature": "T"}
    parts = [f"{short.get(k, k.split('.')[-1])}={_fmt(v)}" for k, v in params.items() if k != "method"]
    return f"{params['method']}+caspl " + " ".join(parts) + f" seed={seed}"


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _log_artifacts(tracking, run_id: str, result: dict, boost_dict: dict, adapt_dict: dict, prefix: str = "") -> None:
    mlflow_client = client(tracking)
    folder_name = prefix.rstrip("/") or None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "resolved_config.json"
        path.write_text(json.dumps({"boost": boost_dict, "adapt": adapt_dict}, indent=1, default=str))
        mlflow_client.log_artifact(run_id, str(path), artifact_path=folder_name)
    if result.get("prompts"):
        mlflow_client.log_artifacts(run_id, str(result["prompts"]),
                                    artifact_path=f"{folder_name}/prompts" if folder_name else "prompts")

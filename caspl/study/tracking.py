"""MLflow tracking for studies: settings from `mlflow.env`, one parent run per study, one child run per trial.

Child runs are keyed by the Tune trial id (tag `caspl.trial_id`) and nested under the parent through the
`mlflow.parentRunId` tag, so a resumed trial re-attaches to its run instead of opening a duplicate. All paths are
made absolute: trials run in other working directories, and `ray job submit` runs in a temporary copy of the repo.
"""

from __future__ import annotations

import functools
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from caspl.errors import ConfigError

ENV_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")
TRIAL_TAG = "caspl.trial_id"
STUDY_TAG = "caspl.study"
UID_TAG = "caspl.study_uid"  # one per study start (a --fresh study gets a new one): finds a parent run not recorded
ROLE_TAG = "caspl.role"  # "trial" or "baseline" on child runs
BASELINE_KEY_TAG = "caspl.baseline_key"  # the config hash of a method-alone adapting run: one baseline run per key
BEST_TAG = "caspl.best"  # "true" on the child run(s) of the best configuration
DESCRIPTION_TAG = "mlflow.note.content"  # what the MLflow UI shows as a run's description


@dataclass(frozen=True)
class TrackingSettings:
    tracking_uri: str
    experiment: str

    @property
    def artifact_location(self) -> str | None:
        """Absolute artefact root next to a SQLite store; a tracking server chooses its own."""
        if self.tracking_uri.startswith("sqlite:///"):
            return Path(self.tracking_uri[len("sqlite:///"):]).parent.joinpath("mlartifacts").as_uri()
        return None


def read_env_file(path: str | Path) -> dict[str, str]:
    """The KEY=VALUE pairs of a dotenv file, parsed by python-dotenv (`export`, quotes and `# comments` handled)."""
    from dotenv import dotenv_values

    try:
        values = dotenv_values(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"MLflow env file {path} cannot be read ({exc}); fix it or set tracking.env_file") from None
    empty = [key for key, value in values.items() if value is None]
    if empty:
        raise ConfigError(f"{path}: line {empty[0]!r} has no '='; write KEY=VALUE")
    return dict(values)


def tracking_settings(env_file: str | Path | None, tracking_uri: str | None = None,
                      experiment: str | None = None, log=None) -> TrackingSettings:
    """Resolve settings: explicit arguments, then environment variables, then the env file, then defaults.

    Of the env file only MLflow's own keys (`MLFLOW_*`) are used: the tracking URI and experiment go into the
    settings, the others (e.g. MLFLOW_DISABLE_TELEMETRY, credentials for a tracking server) into the environment
    unless already set there. Any other key (PYTHONPATH, RAY_ADDRESS, ...) is ignored, so it cannot change how Ray
    starts or which code runs.
    """
    file_values: dict[str, str] = {}
    base = Path.cwd()
    if env_file is not None:
        env_path = Path(env_file).expanduser().resolve()
        if not env_path.is_file():
            raise ConfigError(f"MLflow env file {env_path} does not exist; create it or set tracking.env_file")
        file_values, base = read_env_file(env_path), env_path.parent
        ignored = sorted(k for k in file_values if not k.startswith("MLFLOW_"))
        if ignored and log is not None:
            log(f"[study] {env_path.name}: ignoring non-MLflow keys {', '.join(ignored)}")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or file_values.get("MLFLOW_TRACKING_URI") \
        or "sqlite:///mlflow.db"
    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or file_values.get("MLFLOW_EXPERIMENT_NAME") \
        or "caspl"
    for key, value in file_values.items():
        if key.startswith("MLFLOW_") and key not in ENV_KEYS:
            os.environ.setdefault(key, value)
    return TrackingSettings(absolute_uri(uri, base), name)


def absolute_uri(uri: str, base: Path) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((base / uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:  # a plain path: a file store folder
        return str((base / uri).resolve())
    return uri


def check_tracking(settings: TrackingSettings, timeout: float = 5.0) -> None:
    """Fail fast, before Ray starts, when the tracking store cannot be used."""
    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        _check_sqlite_store(uri)
        return
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout)
        except (urllib.error.URLError, OSError) as exc:
            raise ConfigError(f"MLflow tracking server {uri} is unreachable ({exc}); start it or fix "
                              "MLFLOW_TRACKING_URI in mlflow.env") from None
        return
    if "://" in uri and not uri.startswith(("file://", "databricks")):
        raise ConfigError(f"MLflow tracking URI {uri} has an unsupported scheme; use sqlite:///, http(s):// or a path")


def _check_sqlite_store(uri: str) -> None:
    """The database file and its artefact folder can be written: tried, since root passes every mode check."""
    from caspl.study.storage import probe_writable

    db = Path(uri[len("sqlite:///"):])
    fix = "fix MLFLOW_TRACKING_URI in mlflow.env (or tracking.tracking_uri)"
    if not db.parent.is_dir():
        raise ConfigError(f"MLflow tracking URI {uri}: folder {db.parent} does not exist; {fix}")
    probe_writable(db.parent, "MLflow tracking folder")
    if db.exists():
        try:
            with open(db, "ab"):
                pass
        except OSError as exc:
            raise ConfigError(f"MLflow tracking database {db} cannot be written ({exc.strerror or exc}); "
                              f"{fix}") from None
    artifacts = db.parent / "mlartifacts"
    if artifacts.exists():
        probe_writable(artifacts, "MLflow artefact folder")


def client(settings: TrackingSettings):
    """This process's MlflowClient for the settings' store: one per tracking URI (a new client opens its store
    again, about 25 ms on SQLite, and trials log every epoch)."""
    return _client_for(settings.tracking_uri)


@functools.lru_cache(maxsize=8)
def _client_for(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(settings: TrackingSettings) -> str:
    mlflow_client = client(settings)
    found = mlflow_client.get_experiment_by_name(settings.experiment)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow_client.create_experiment(settings.experiment, artifact_location=settings.artifact_location)
    except Exception:  # created concurrently by another process
        return mlflow_client.get_experiment_by_name(settings.experiment).experiment_id


def check_parent_run(settings: TrackingSettings, run_id: str, folder: str) -> None:
    """ConfigError when the parent run recorded in a study's state is not in this tracking store."""
    from mlflow.exceptions import MlflowException

    try:
        run = client(settings).get_run(run_id)
    except MlflowException:
        run = None
    if run is None or run.info.lifecycle_stage != "active":
        raise ConfigError(f"the study in {folder} logs to parent run {run_id}, which tracking store "
                          f"{settings.tracking_uri} does not hold (another store, or deleted); use the study's "
                          "tracking store, or start over with --fresh")


def open_parent_run(settings: TrackingSettings, study: str, uid: str, tags: Mapping[str, str],
                    run_id: str | None) -> str:
    """The study's parent run, (re)opened as RUNNING: `run_id` from the study state, else the run tagged with the
    study's uid (a start killed between creating the run and recording it), else a new run."""
    mlflow_client = client(settings)
    if run_id is None:
        found = mlflow_client.search_runs([experiment_id(settings)], filter_string=f"tags.`{UID_TAG}` = '{uid}'")
        run_id = found[0].info.run_id if found else None
    if run_id is None:
        run = mlflow_client.create_run(experiment_id(settings), run_name=study,
                                       tags={STUDY_TAG: study, UID_TAG: uid, **tags})
        return run.info.run_id
    mlflow_client.update_run(run_id, status="RUNNING")
    return run_id


def trial_run(settings: TrackingSettings, parent_run_id: str, trial_id: str, run_name: str,
              tags: Mapping[str, str], known_run_id: str | None = None) -> str:
    """The child run of a trial: the one recorded in its checkpoint, else the one tagged with its id, else new.
    A run found again (a retried or resumed trial) is reopened unless it had finished."""
    mlflow_client = client(settings)
    run_id = known_run_id
    if run_id is None:
        found = mlflow_client.search_runs([experiment_id(settings)], filter_string=(
            f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`mlflow.parentRunId` = '{parent_run_id}'"))
        run_id = found[0].info.run_id if found else None
    if run_id is None:
        run = mlflow_client.create_run(experiment_id(settings), run_name=run_name,
                                       tags={"mlflow.parentRunId": parent_run_id, TRIAL_TAG: trial_id, **tags})
        return run.info.run_id
    if mlflow_client.get_run(run_id).info.status not in ("RUNNING", "FINISHED"):
        mlflow_client.update_run(run_id, status="RUNNING")
    return run_id


def child_runs(settings: TrackingSettings, parent_run_id: str) -> list:
    """Every (active) child run of a parent run, all pages."""
    mlflow_client, runs, token = client(settings), [], None
    while True:
        page = mlflow_client.search_runs([experiment_id(settings)], page_token=token, max_results=1000,
                                         filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def settle_trial_runs(settings: TrackingSettings, parent_run_id: str, statuses: Mapping[str, str]) -> list[str]:
    """Give each trial's child run its final status ({trial id: FINISHED | FAILED | KILLED}) and delete the runs of
    trials Tune never recorded; returns the deleted run ids.

    A study killed after a trial created its run but before Tune's next experiment-state save forgets that trial;
    on resume the searcher suggests again under a new trial id, so the old run would be a duplicate. (MLflow deletes
    softly: `mlflow gc` purges, the UI's "deleted" filter still shows them.)
    """
    mlflow_client, orphans = client(settings), []
    for run in child_runs(settings, parent_run_id):
        if run.data.tags.get(ROLE_TAG) == "baseline":
            continue
        status = statuses.get(run.data.tags.get(TRIAL_TAG))
        if status is None:
            mlflow_client.delete_run(run.info.run_id)
            orphans.append(run.info.run_id)
        elif run.info.status != status:
            mlflow_client.set_terminated(run.info.run_id, status)
    return orphans


def close_open_runs(settings: TrackingSettings, parent_run_id: str, status: str) -> None:
    """End the parent run and its still-open child runs with `status` (FAILED or KILLED), after a study broke off."""
    mlflow_client = client(settings)
    for run in child_runs(settings, parent_run_id):
        if run.info.status == "RUNNING":
            mlflow_client.set_terminated(run.info.run_id, status)
    mlflow_client.set_terminated(parent_run_id, status)


def log_metrics(settings: TrackingSettings, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    log_metric_steps(settings, run_id, [(step, metrics)])


def log_metric_steps(settings: TrackingSettings, run_id: str, steps: Sequence[tuple[int, Mapping[str, float]]]) -> None:
    """Log the numeric metrics of several steps (e.g. a finished run's epochs) in one write."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = [Metric(k.replace("@", "_"), float(v), now, step) for step, metrics in steps for k, v in metrics.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for start in range(0, len(values), 1000):  # MLflow's limit of metrics per batch
        client(settings).log_batch(run_id, metrics=values[start:start + 1000])


def log_params(settings: TrackingSettings, run_id: str, params: Mapping[str, object]) -> None:
    from mlflow.entities import Param

    mlflow_client = client(settings)
    existing = mlflow_client.get_run(run_id).data.params
    fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
    for start in range(0, len(fresh), 100):
        mlflow_client.log_batch(run_id, params=fresh[start:start + 100])


def log_inputs_once(settings: TrackingSettings, run_id: str, inputs: list) -> None:
    """Log dataset inputs (`mlflow.entities.DatasetInput`) on a run that has none yet (a resumed run keeps its own)."""
    mlflow_client = client(settings)
    run = mlflow_client.get_run(run_id)
    if inputs and not (run.inputs and run.inputs.dataset_inputs):
        mlflow_client.log_inputs(run_id, datasets=inputs)


def baseline_run(settings: TrackingSettings, parent_run_id: str, key: str, run_name: str, params: Mapping,
                 metrics: Mapping[str, float], tags: Mapping[str, str], inputs: list) -> str:
    """The method-alone child run with baseline key `key`: found again by key (a resumed study, another trial of the
    same method and seed), else created FINISHED with its parameters, metrics and inputs."""
    mlflow_client = client(settings)
    found = mlflow_client.search_runs([experiment_id(settings)], filter_string=(
        f"tags.`{BASELINE_KEY_TAG}` = '{key}' and tags.`mlflow.parentRunId` = '{parent_run_id}'"))
    finished = [run for run in found if run.info.status == "FINISHED"]
    if finished:
        return finished[0].info.run_id
    run_id = found[0].info.run_id if found else mlflow_client.create_run(
        experiment_id(settings), run_name=run_name,
        tags={"mlflow.parentRunId": parent_run_id, ROLE_TAG: "baseline", BASELINE_KEY_TAG: key, **tags}).info.run_id
    log_params(settings, run_id, params)
    log_metrics(settings, run_id, metrics, step=0)
    log_inputs_once(settings, run_id, inputs)
    mlflow_client.set_terminated(run_id, "FINISHED")
    return run_id


def mark_best(settings: TrackingSettings, parent_run_id: str, best_run_ids: set[str]) -> None:
    """Tag the best configuration's child runs `caspl.best=true`; a run that was best before loses the tag."""
    mlflow_client = client(settings)
    for run in child_runs(settings, parent_run_id):
        if run.info.run_id in best_run_ids:
            mlflow_client.set_tag(run.info.run_id, BEST_TAG, "true")
        elif BEST_TAG in run.data.tags:
            mlflow_client.delete_tag(run.info.run_id, BEST_TAG)


def set_description(settings: TrackingSettings, run_id: str, markdown: str) -> None:
    client(settings).set_tag(run_id, DESCRIPTION_TAG, markdown[:50000])

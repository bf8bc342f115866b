"""The study's Optuna trials in a real Optuna storage: `<storage>/<name>/optuna.db` (SQLite), for
`optuna.load_study`, `optuna-dashboard` and `optuna.visualization`.

Tune runs its searcher on an in-memory Optuna study that it pickles with its own state (DESIGN §4: an RDB storage
under the searcher breaks `Tuner.restore`). So the storage is an export, rebuilt whole from Tune's trials at the end
of every run (a resumed one too) and swapped in atomically: it always holds exactly the trials Tune finished, with
their parameters and objective, and user attributes that link each Optuna trial to its Tune trial and MLflow run.
One Optuna trial per sampled configuration, as the searcher sees it: with several seeds (Tune's `Repeater`), its
value is the mean objective over the seeds and its attributes list every seed's trial and run.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Mapping

from caspl.study.space import SearchSpace
from caspl.study.storage import OPTUNA_FILE, StudyFolder

Log = Callable[[str], None]
PLOTS = ("optimization_history", "parallel_coordinate", "param_importances")


def distributions(space: SearchSpace) -> dict:
    """Optuna distributions of every searched parameter (`method` included), as the define-by-run space samples."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    found = {"method": CategoricalDistribution(list(space.methods))}
    for name, spec in space.params.items():
        if spec["type"] == "categorical":
            found[name] = CategoricalDistribution(list(spec["choices"]))
        elif spec["type"] == "int":
            found[name] = IntDistribution(int(spec["low"]), int(spec["high"]), log=spec["log"],
                                          step=int(spec["step"] or 1))
        else:
            found[name] = FloatDistribution(float(spec["low"]), float(spec["high"]), log=spec["log"],
                                            step=spec["step"])
    return found


def storage_url(folder: StudyFolder) -> str:
    """The storage URL `optuna.load_study` and `optuna-dashboard` take (a local study folder's SQLite file)."""
    return f"sqlite:///{folder.path}/{OPTUNA_FILE}" if folder.is_local else f"{folder.path}/{OPTUNA_FILE}"


def optuna_trials(space: SearchSpace, rows: list[dict], run_ids: Mapping[str, str], objective: str) -> list:
    """Frozen Optuna trials from Tune's trial rows (see `report.trial_rows`; `status` set by the runner): one per
    configuration, COMPLETE when a seed finished (value: the mean objective of its finished seeds), PRUNED when a
    scheduler stopped it, FAIL when every seed errored; configurations still open (killed, running) are left out."""
    import optuna
    from optuna.trial import TrialState

    spaces = distributions(space)
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(json.dumps(row["params"], sort_keys=True, default=str), []).append(row)
    trials = []
    for members in groups.values():
        params = members[0]["params"]
        finished = [m for m in members if m["metrics"].get("finished")]
        if finished:
            state, value = TrialState.COMPLETE, sum(float(m["metrics"][objective]) for m in finished) / len(finished)
        elif any(m.get("status") == "FINISHED" for m in members):  # stopped early by the scheduler
            state, value = TrialState.PRUNED, None
        elif all(m["error"] is not None for m in members):
            state, value = TrialState.FAIL, None
        else:
            continue
        ended = finished or members
        attrs = {"tune_trial_id": ",".join(m["trial_id"] for m in ended),
                 "mlflow_run_id": ",".join(run_ids.get(m["trial_id"], "") for m in ended),
                 "seeds": len(finished)}
        for key in ("test_base", "test_novel", "test_hm"):
            values = [float(m["metrics"][key]) for m in finished if key in m["metrics"]]
            if values:
                attrs[key] = round(sum(values) / len(values), 4)
        last = [m["metrics"].get(objective) for m in members if m["metrics"].get(objective) is not None]
        intermediate = {0: float(last[-1])} if state == TrialState.PRUNED and last else None
        trials.append(optuna.trial.create_trial(
            state=state, value=value, params=params, user_attrs=attrs, intermediate_values=intermediate,
            distributions={name: spaces[name] for name in params if name in spaces}))
    return trials


def export_study(folder: StudyFolder, study_name: str, space: SearchSpace, rows: list[dict],
                 run_ids: Mapping[str, str], objective: str, attrs: Mapping[str, str]):
    """Rebuild `<folder>/optuna.db` from Tune's trials; returns the exported study (read from the new file)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in RDB ..." is no news
    with tempfile.TemporaryDirectory(prefix="caspl-optuna-") as tmp:
        local = Path(tmp) / OPTUNA_FILE
        storage = optuna.storages.RDBStorage(f"sqlite:///{local}")
        study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize")
        for key, value in {"objective": objective, **attrs}.items():
            study.set_user_attr(key, value)
        study.add_trials(optuna_trials(space, rows, run_ids, objective))
        in_memory = optuna.storages.InMemoryStorage()  # for plots and importances, once the file is published
        optuna.copy_study(from_study_name=study_name, from_storage=storage, to_storage=in_memory)
        storage.engine.dispose()
        folder.publish_file(local, OPTUNA_FILE)
    return optuna.load_study(study_name=study_name, storage=in_memory)


def importances(study) -> dict[str, float]:
    """Parameter importances (Optuna's default evaluator) over the parameters every completed trial has;
    {} with fewer than 2 completed trials or no spread in the objective."""
    import optuna
    from optuna.trial import TrialState

    values = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if len(values) < 2 or max(values) == min(values):
        return {}
    try:
        with warnings.catch_warnings():  # "less than 2 trials in a regime": the summary says how many trials
            warnings.simplefilter("ignore", UserWarning)
            found = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError, ZeroDivisionError):
        return {}
    return {name: float(value) for name, value in found.items() if not math.isnan(value)}


def plot_study(study, found: Mapping[str, float], folder: Path) -> list[Path]:
    """Optimisation history, parallel coordinates and (when computed) importances as PNGs in `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis
    from optuna.exceptions import ExperimentalWarning
    from optuna.trial import TrialState

    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 1:
        return []
    written = []
    makers = {"optimization_history": lambda s: vis.plot_optimization_history(s, target_name="objective"),
              "parallel_coordinate": lambda s: vis.plot_parallel_coordinate(s, target_name="objective")}
    if found:
        makers["param_importances"] = lambda s: _importance_bars(found)
    for name, make in makers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            logging.getLogger("optuna").setLevel(logging.ERROR)
            ax = make(study)
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 4.5)
        fig.tight_layout()
        path = folder / f"optuna_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _importance_bars(found: Mapping[str, float]):
    import matplotlib.pyplot as plt

    names = sorted(found, key=found.get)
    fig, ax = plt.subplots()
    bars = ax.barh(names, [found[n] for n in names], color="#4c72b0")
    ax.bar_label(bars, labels=[f"{found[n]:.2f}" for n in names], padding=3, fontsize=8)
    ax.set_xlabel("importance for the objective (Optuna, normalised)")
    ax.set_xlim(0, max(found.values()) * 1.2 or 1)
    ax.set_title("Parameter importances")
    return ax

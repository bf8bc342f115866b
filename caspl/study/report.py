"""The end of a study: group trials by configuration (mean over seeds), pick the best on the objective, report its
test numbers, and log a summary table and plots to the parent MLflow run."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Callable

from caspl.study.console import runs_view_url
from caspl.study.tracking import (TRIAL_TAG, baseline_run, child_runs, client, experiment_id, log_metrics,
                                  mark_best, set_description)
from caspl.train.metrics import harmonic_mean, spearman

SEARCHED_PREFIXES = ("boost.", "adapt.")
OBJECTIVE = "objective"  # the metric Tune and Optuna maximise: the value `search.objective` names
OBJECTIVE_KEYS = {"pseudo_novel": "pseudo_hm", "val_hm": "val_hm"}  # search.objective -> the metric it reads
OBJECTIVE_NAMES = {"pseudo_novel": "HM on pseudo-novel validation (no novel-class label)",
                   "val_hm": "validation HM on base and novel classes"}


def trial_rows(results) -> list[dict]:
    """One row per trial Tune knows: its id (its folder's name), parameters, seed index, metrics, error."""
    rows = []
    for result in results:
        config = dict(result.config or {})
        metrics = dict(result.metrics or {})
        rows.append({"trial_id": PurePosixPath(result.path).name,
                     "params": {k: v for k, v in config.items() if not k.startswith("__")},
                     "seed_index": config.get("__trial_index__", 0), "metrics": metrics,
                     "done": bool(metrics.get("finished")), "error": str(result.error) if result.error else None})
    return rows


def group_by_config(rows: list[dict]) -> list[dict]:
    """One entry per sampled configuration: mean of each final metric over its seeds; HM of the mean base/novel."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["done"]:
            groups[json.dumps(row["params"], sort_keys=True, default=str)].append(row)
    entries = []
    for key, members in groups.items():
        mean = lambda name: statistics.fmean(float(m["metrics"][name]) for m in members)  # noqa: E731
        entry = {"params": json.loads(key), "seeds": len(members), "objective": mean("objective"),
                 "val_hm": mean("val_hm"), "test_base": mean("test_base"), "test_novel": mean("test_novel")}
        entry["test_hm"] = harmonic_mean(entry["test_base"], entry["test_novel"])
        if all("pseudo_hm" in m["metrics"] for m in members):
            entry["pseudo_hm"] = mean("pseudo_hm")
        if all("baseline_test_base" in m["metrics"] for m in members):
            entry["baseline_test_base"] = mean("baseline_test_base")
            entry["baseline_test_novel"] = mean("baseline_test_novel")
            entry["baseline_test_hm"] = harmonic_mean(entry["baseline_test_base"], entry["baseline_test_novel"])
        entries.append(entry)
    return sorted(entries, key=lambda e: e["objective"], reverse=True)


OBJECTIVES = ("pseudo_hm", "val_hm")  # every objective a trial reports, whichever the searcher used


def objective_agreement(rows: list[dict]) -> dict[str, float]:
    """Spearman correlation over finished trials between each objective and test HM: how well it ranks trials."""
    done = [r["metrics"] for r in rows if r["metrics"].get("finished")]
    return {name: spearman([m[name] for m in done], [m["test_hm"] for m in done])
            for name in OBJECTIVES if done and all(name in m for m in done)}


def markdown_table(entries: list[dict], param_names: list[str]) -> str:
    """One row per configuration, best first, with the MLflow run name(s) and id(s) of its trials."""
    head = ["method", *param_names, "seeds", "objective", "test base", "test novel", "test HM", "method alone test HM",
            "run", "run id"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        runs = e.get("runs", [])
        cells = [e["params"]["method"], *[_fmt(e["params"].get(p, "")) for p in param_names], str(e["seeds"]),
                 *(f"{e[k]:.2f}" for k in ("objective", "test_base", "test_novel", "test_hm")),
                 f"{e['baseline_test_hm']:.2f}" if "baseline_test_hm" in e else "–",
                 "<br>".join(r["run_name"] for r in runs) or "–", "<br>".join(r["run_id"] for r in runs) or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def agreement_lines(agreement: dict[str, float], objective: str) -> str:
    """Markdown lines: how well each objective ranked the trials by test HM."""
    used = OBJECTIVE_KEYS[objective]
    lines = [f"- Spearman({name}, test HM) over finished trials: {rho:.2f}"
             + (" (the objective searched)" if name == used else "") for name, rho in agreement.items()]
    return ("\n" + "\n".join(lines) + "\n") if lines else ""


def plot_summary(entries: list[dict], param_names: list[str], folder: Path) -> list[Path]:
    """Validation HM against each searched boosting parameter (one colour per method, legend outside the axes),
    and each method's best configuration against the method alone on test HM (bars with their values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written = []
    methods = sorted({e["params"]["method"] for e in entries})
    for name in [p for p in param_names if p.startswith("boost.")]:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for method in methods:
            points = [(e["params"][name], e["objective"]) for e in entries
                      if e["params"]["method"] == method and name in e["params"]]
            if points:
                ax.scatter(*zip(*points), label=method, s=36, alpha=0.85)
        if all(isinstance(e["params"].get(name, 0), int) for e in entries):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # depths and lengths: no 3.2 layers
        ax.set_xlabel(name)
        ax.set_ylabel("objective")
        ax.set_title(f"objective against {name}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        path = folder / f"hm_vs_{name.replace('.', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    best = {m: next(e for e in entries if e["params"]["method"] == m) for m in methods}
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    xs = list(range(len(methods)))
    alone = ax.bar([x - 0.2 for x in xs], [best[m].get("baseline_test_hm", 0) for m in methods], 0.4,
                   label="method alone", color="#9aa5b1")
    cascaded = ax.bar([x + 0.2 for x in xs], [best[m]["test_hm"] for m in methods], 0.4,
                      label="+CasPL (best on the objective)", color="#4c72b0")
    ax.bar_label(alone, labels=[f"{best[m]['baseline_test_hm']:.1f}" if "baseline_test_hm" in best[m] else "n/a"
                                for m in methods], padding=2, fontsize=8)
    ax.bar_label(cascaded, labels=[f"{best[m]['test_hm']:.1f}" for m in methods], padding=2, fontsize=8)
    ax.set_xticks(xs, methods)
    ax.set_ylabel("test HM")
    ax.set_ylim(0, max([best[m]["test_hm"] for m in methods] + [best[m].get("baseline_test_hm", 0)
                                                                 for m in methods]) * 1.18 or 1)
    ax.set_title("each method alone and with CasPL", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    fig.tight_layout()
    path = folder / "methods_with_and_without_caspl.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return written + [path]


def summarise(prepared, rows: list[dict], parent_run_id: str, seconds: float, verdict: dict,
              log: Callable[[str], None]) -> dict:
    """Write the summary (JSON, table, plots, the Optuna study and its plots) to a fresh folder, log it to the
    parent run, publish it in the study folder (`<storage>/<name>/summary`, swapped in whole: only this run's files,
    never another study's), log the method-alone baselines as child runs, describe the parent run and tag its best
    child. Printing is the caller's (`console.summary_lines`), after Ray is done talking."""
    from caspl.study.optuna_store import export_study, importances, plot_study, storage_url

    tracking = prepared.tracking
    entries = group_by_config([row for row in rows if row["metrics"].get("finished")])
    param_names = list(prepared.space.params)
    runs = trial_run_index(tracking, parent_run_id)
    for entry in entries:
        key = json.dumps(entry["params"], sort_keys=True, default=str)
        entry["runs"] = [runs[r["trial_id"]] for r in rows if r["metrics"].get("finished") and r["trial_id"] in runs
                         and json.dumps(r["params"], sort_keys=True, default=str) == key]
    baselines = log_baseline_runs(prepared, parent_run_id, rows, runs)
    summary = {"study": prepared.study.name, "status": verdict["status"], "exit_code": verdict["exit_code"],
               "message": verdict["message"], "expected_trials": verdict["expected"], "trials": len(rows),
               "done": verdict["done"], "finished": sum(bool(r["metrics"].get("finished")) for r in rows),
               "errored": sum(r["error"] is not None for r in rows), "configs": len(entries),
               "wall_seconds": round(seconds, 1), "experiment_dir": prepared.experiment_dir,
               "model_build_seconds": round(prepared.phase_seconds.get("models", 0.0), 1),
               "teacher_cache_seconds": round(prepared.phase_seconds.get("teacher_cache", 0.0), 1),
               "phase_seconds": {name: round(value, 1) for name, value in prepared.phase_seconds.items()},
               "max_concurrent": prepared.study.search.max_concurrent,
               "driver_cpu_seconds": round(time.process_time(), 1),  # this process's, from its start
               **{f"trial_{key}": round(sum(float(r["metrics"].get(key, 0)) for r in rows), 1)
                  for key in ("compute_seconds", "compute_cpu_seconds", "report_seconds")},
               "tracking_uri": tracking.tracking_uri, "parent_run_id": parent_run_id,
               "objective": prepared.study.search.objective, "spearman_with_test_hm": objective_agreement(rows),
               "baseline_runs": len(set(baselines.values())),
               "optuna_storage": storage_url(prepared.folder), "importances": {}}
    with tempfile.TemporaryDirectory(prefix="caspl-summary-") as tmp:
        folder = Path(tmp)
        if entries:
            summary["best"] = entries[0]
            agreement = agreement_lines(summary["spearman_with_test_hm"], summary["objective"])
            (folder / "summary.md").write_text(markdown_table(entries, param_names) + agreement)
            plot_summary(entries, param_names, folder)
        study = export_study(prepared.folder, prepared.study.name, prepared.space, rows,
                             {tid: run["run_id"] for tid, run in runs.items()}, OBJECTIVE,
                             {"mlflow_parent_run_id": parent_run_id, "tune_experiment": prepared.experiment_dir})
        summary["importances"] = importances(study)
        plot_study(study, summary["importances"], folder)
        (folder / "summary.json").write_text(json.dumps({**summary, "configs_ranked": entries}, indent=1,
                                                        default=str))
        client(tracking).log_artifacts(parent_run_id, str(folder), artifact_path="summary")
        summary["summary_dir"] = prepared.folder.publish(folder)
    if entries:
        best = entries[0]
        log_metrics(tracking, parent_run_id, {f"best_{k}": round(best[k], 2) for k in
                                              ("objective", "test_base", "test_novel", "test_hm")}, step=0)
    agreement = {f"spearman_{k}_vs_test_hm": round(v, 4) for k, v in summary["spearman_with_test_hm"].items()
                 if v == v}
    log_metrics(tracking, parent_run_id, agreement, step=0)
    log_metrics(tracking, parent_run_id, {f"importance.{name}": round(value, 4)
                                          for name, value in summary["importances"].items()}, step=0)
    mark_best(tracking, parent_run_id, {run["run_id"] for run in (entries[0]["runs"] if entries else [])})
    summary["runs_url"] = runs_view_url(tracking.tracking_uri, experiment_id(tracking))
    summary["mlflow_ui_command"] = prepared.ui_command
    summary["dashboard_command"] = dashboard_command(summary["optuna_storage"])
    set_description(tracking, parent_run_id, describe(summary, entries, param_names))
    return summary


def trial_run_index(tracking, parent_run_id: str) -> dict[str, dict]:
    """{Tune trial id: {"run_id", "run_name"}} of the parent's trial runs."""
    return {run.data.tags[TRIAL_TAG]: {"run_id": run.info.run_id, "run_name": run.info.run_name}
            for run in child_runs(tracking, parent_run_id) if TRIAL_TAG in run.data.tags}


def log_baseline_runs(prepared, parent_run_id: str, rows: list[dict], runs: dict[str, dict]) -> dict[str, str]:
    """One child run per method-alone adapting run (tag `caspl.role=baseline`), keyed by that run's config hash as
    the artefact store keys it: trials of one method and seed share it, a resumed study finds it again. Each trial
    run gets the id of its baseline run as tag `caspl.baseline_run_id`. Returns {trial id: baseline run id}."""
    from dataclasses import replace

    from caspl.config import config_hash, from_dict
    from caspl.study.lineage import dataset_inputs
    from caspl.study.space import trial_configs
    from caspl.train.adapt import AdaptRunConfig

    study, tracking, found = prepared.study, prepared.tracking, {}
    for row in rows:
        metrics = {k[len("baseline_"):]: round(float(v), 2) for k, v in row["metrics"].items()
                   if k.startswith("baseline_") and isinstance(v, (int, float))}
        if not row["metrics"].get("finished") or not metrics:
            continue
        seed = study.search.seeds[int(row["seed_index"])]
        method, _, adapt = trial_configs(study, row["params"], seed)
        key = config_hash(replace(from_dict(AdaptRunConfig, adapt, "adapt"), boost=None))
        own = {k: v for k, v in row["params"].items() if not k.startswith("boost.")}  # what the baseline depends on
        name = f"{method} alone " + " ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in own.items()
                                             if k != "method") + f" seed={seed}"
        found[row["trial_id"]] = baseline_run(
            tracking, parent_run_id, key, name.replace("  ", " "), {**own, "seed": seed}, metrics,
            {"caspl.seed": str(seed), **prepared.run_tags}, dataset_inputs(prepared.datasets))
        if row["trial_id"] in runs:
            client(tracking).set_tag(runs[row["trial_id"]]["run_id"], "caspl.baseline_run_id",
                                     found[row["trial_id"]])
    return found


def dashboard_command(storage: str) -> str:
    if storage.startswith("sqlite:///"):
        return f"optuna-dashboard {storage}   (pip install 'caspl[dashboard]'; or: caspl study dashboard -c <config>)"
    return f"copy {storage} to this machine, then: optuna-dashboard sqlite:///<copy>"


def describe(summary: dict, entries: list[dict], param_names: list[str]) -> str:
    """The parent run's description (markdown): the outcome, the best child run, the summary table, importances."""
    lines = [f"**{summary['study']}**: {summary['status']}, {summary['message']}. Objective: "
             f"{OBJECTIVE_NAMES[summary['objective']]} (mean over seeds); {summary['configs']} configuration(s), "
             f"{summary['finished']} trial(s) finished."]
    if entries:
        best = entries[0]
        run = (best.get("runs") or [{}])[0]
        alone = f", method alone {best['baseline_test_hm']:.2f}" if "baseline_test_hm" in best else ""
        lines += ["", f"Best child run: **{run.get('run_name', '?')}** (`{run.get('run_id', '?')}`, tag "
                      f"`caspl.best=true`): objective {best['objective']:.2f}; test base {best['test_base']:.2f}, "
                      f"novel {best['test_novel']:.2f}, HM {best['test_hm']:.2f}{alone}."]
        lines += ["", markdown_table(entries, param_names)]
    if summary["importances"]:
        lines += ["Parameter importances (Optuna): " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                                 summary["importances"].items()) + "."]
    lines += ["", f"Optuna study `{summary['study']}` in `{summary['optuna_storage']}`; plots and tables under the "
                  "`summary/` artefacts."]
    return "\n".join(lines)

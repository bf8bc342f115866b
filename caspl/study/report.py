"""The end of a study: group trials by configuration (mean over seeds), pick the best on validation HM, report its
test numbers, and log a summary table and plots to the parent MLflow run."""

from __future__ import annotations

import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Callable

from caspl.study.tracking import client, log_metrics, log_params
from caspl.train.metrics import harmonic_mean, spearman

SEARCHED_PREFIXES = ("boost.", "adapt.")


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
    head = ["method", *param_names, "seeds", "objective", "test base", "test novel", "test HM", "method alone test HM"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        cells = [e["params"]["method"], *[_fmt(e["params"].get(p, "")) for p in param_names], str(e["seeds"]),
                 *(f"{e[k]:.2f}" for k in ("objective", "test_base", "test_novel", "test_hm")),
                 f"{e['baseline_test_hm']:.2f}" if "baseline_test_hm" in e else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def agreement_lines(agreement: dict[str, float], objective: str) -> str:
    """Markdown lines: how well each objective ranked the trials by test HM."""
    used = {"pseudo_novel": "pseudo_hm", "val_hm": "val_hm"}[objective]
    lines = [f"- Spearman({name}, test HM) over finished trials: {rho:.2f}"
             + (" (the objective searched)" if name == used else "") for name, rho in agreement.items()]
    return ("\n" + "\n".join(lines) + "\n") if lines else ""


def plot_summary(entries: list[dict], param_names: list[str], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    methods = sorted({e["params"]["method"] for e in entries})
    for name in [p for p in param_names if p.startswith("boost.")]:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method in methods:
            points = [(e["params"][name], e["objective"]) for e in entries
                      if e["params"]["method"] == method and name in e["params"]]
            if points:
                ax.scatter(*zip(*points), label=method)
        ax.set_xlabel(name)
        ax.set_ylabel("objective (validation HM)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / f"hm_vs_{name.replace('.', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    best = {m: next(e for e in entries if e["params"]["method"] == m) for m in methods}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = range(len(methods))
    ax.bar([x - 0.2 for x in xs], [best[m].get("baseline_test_hm", 0) for m in methods], 0.4, label="method alone")
    ax.bar([x + 0.2 for x in xs], [best[m]["test_hm"] for m in methods], 0.4, label="+CasPL (best objective)")
    ax.set_xticks(list(xs), methods)
    ax.set_ylabel("test HM")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = folder / "methods_with_and_without_caspl.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return written + [path]


def summarise(prepared, rows: list[dict], parent_run_id: str, seconds: float, verdict: dict,
              log: Callable[[str], None]) -> dict:
    """Write the summary (JSON, table, plots) to a fresh folder, log it to the parent run, and publish it in the
    study folder (`<storage>/<name>/summary`, swapped in whole): only this run's files, never another study's."""
    entries = group_by_config([row for row in rows if row["metrics"].get("finished")])
    param_names = list(prepared.space.params)
    summary = {"study": prepared.study.name, "status": verdict["status"], "exit_code": verdict["exit_code"],
               "message": verdict["message"], "expected_trials": verdict["expected"], "trials": len(rows),
               "done": verdict["done"], "finished": sum(bool(r["metrics"].get("finished")) for r in rows),
               "errored": sum(r["error"] is not None for r in rows), "configs": len(entries),
               "wall_seconds": round(seconds, 1), "experiment_dir": prepared.experiment_dir,
               "teacher_cache_seconds": round(prepared.teacher_cache_seconds, 1),
               "max_concurrent": prepared.study.search.max_concurrent,
               "trial_compute_seconds": round(sum(float(r["metrics"].get("compute_seconds", 0)) for r in rows), 1),
               "tracking_uri": prepared.tracking.tracking_uri, "parent_run_id": parent_run_id,
               "objective": prepared.study.search.objective, "spearman_with_test_hm": objective_agreement(rows)}
    with tempfile.TemporaryDirectory(prefix="caspl-summary-") as tmp:
        folder = Path(tmp)
        if entries:
            summary["best"] = entries[0]
            agreement = agreement_lines(summary["spearman_with_test_hm"], summary["objective"])
            (folder / "summary.md").write_text(markdown_table(entries, param_names) + agreement)
            plot_summary(entries, param_names, folder)
        (folder / "summary.json").write_text(json.dumps({**summary, "configs_ranked": entries}, indent=1,
                                                        default=str))
        client(prepared.tracking).log_artifacts(parent_run_id, str(folder), artifact_path="summary")
        summary["summary_dir"] = prepared.folder.publish(folder)
    if entries:
        best = entries[0]
        log_metrics(prepared.tracking, parent_run_id, {f"best_{k}": best[k] for k in
                                                       ("objective", "test_base", "test_novel", "test_hm")}, step=0)
        log_params(prepared.tracking, parent_run_id, {f"best.{k}": v for k, v in best["params"].items()})
    agreement = {f"spearman_{k}_vs_test_hm": v for k, v in summary["spearman_with_test_hm"].items() if v == v}
    log_metrics(prepared.tracking, parent_run_id, agreement, step=0)
    _print_summary(summary, prepared, log)
    return summary


def _print_summary(summary: dict, prepared, log) -> None:
    log(f"[study] {summary['status']}: {summary['message']} ({summary['finished']} finished, {summary['errored']} "
        f"errored, {summary['expected_trials']} configured) in {summary['wall_seconds']:.0f}s")
    if "best" in summary:
        best = summary["best"]
        log(f"[study] best on the objective, {summary['objective']} ({best['objective']:.2f}): {best['params']}")
        log(f"[study]   test base {best['test_base']:.2f}  novel {best['test_novel']:.2f}  HM {best['test_hm']:.2f}"
            f" (mean of {best['seeds']} seed(s))")
    for name, rho in summary["spearman_with_test_hm"].items():
        log(f"[study] Spearman({name}, test HM) over finished trials: {rho:.2f}")
    log(f"[study] summary table and plots: {summary['summary_dir']}")
    log(f"[study] Tune results: {prepared.experiment_dir}")
    uri = prepared.tracking.tracking_uri
    log(f"[study] MLflow: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   (parent run "
        f"{summary['parent_run_id']})")

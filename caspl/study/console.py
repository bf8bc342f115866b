"""What a study prints: a status table of the searched parameters and the objective while it runs, and a final
summary that is the last thing on the console.

Ray 2.60's output engine (on whenever AIR_VERBOSITY applies, i.e. by default) ignores a passed `CLIReporter`, and
its own table shows only parameters it finds as Tune search domains in `param_space`, which a define-by-run Optuna
space has none of. So the study runs Tune with `verbose=0` and prints its own table from a Tune `Callback` (the
supported extension point): one row per trial with its searched parameters, epoch, objective and test HM.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

from ray.tune import Callback

Log = Callable[[str], None]
QUIET_LOGGERS = ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage")  # per-checkpoint lines


def quiet_trial_logging() -> None:
    """In a trial's process: drop Ray's "Checkpoint successfully created at ..." line, logged at every report."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Plain aligned columns (no box drawing, no colour codes: it reads the same in a log file)."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in (header, *rows)]


class StatusTable(Callback):
    """Prints the trials' status table every `every` seconds while something changed, and when a trial ends."""

    def __init__(self, params: Sequence[str], objective: str, objective_label: str, every: float = 30.0):
        self.params = list(params)
        self.objective, self.objective_label = objective, objective_label
        self.every = every
        self._last_print = 0.0
        self._last_seen: tuple = ()
        self._epochs: dict[str, int] = {}  # the last adapting epoch each trial reported (its final result has none)

    def __getstate__(self) -> dict:  # pickled with the tuner: no clock state
        return {"params": self.params, "objective": self.objective, "objective_label": self.objective_label,
                "every": self.every}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if result.get("epoch") is not None:
            self._epochs[trial.trial_id] = result["epoch"]

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if self._seen(trials) != self._last_seen and time.monotonic() - self._last_print >= self.every:
            self._print(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._print(trials, {trial.trial_id: "TERMINATED"})  # Tune sets the status after its callbacks

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._print(trials, {trial.trial_id: "ERROR"})

    def _seen(self, trials: list) -> tuple:
        return tuple((t.trial_id, t.status, self._epochs.get(t.trial_id)) for t in trials)

    def lines(self, trials: list, status: dict[str, str] | None = None) -> list[str]:
        status = {t.trial_id: (status or {}).get(t.trial_id, t.status) for t in trials}
        counts: dict[str, int] = {}
        for trial in trials:
            counts[status[trial.trial_id]] = counts.get(status[trial.trial_id], 0) + 1
        scored = [t for t in trials if (t.last_result or {}).get(self.objective) is not None]
        head = f"[study] {len(trials)} trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        if scored:
            best = max(scored, key=lambda t: t.last_result[self.objective])
            head += f" | best {self.objective_label} so far {best.last_result[self.objective]:.2f} ({best.trial_id})"
        header = ["trial", "status", "method", *self.params, "epoch", self.objective_label, "test HM"]
        rows = []
        for trial in trials:
            result, config = trial.last_result or {}, trial.config or {}
            rows.append([trial.trial_id, status[trial.trial_id], _cell(config.get("method")),
                         *(_cell(config.get(p)) for p in self.params), _cell(self._epochs.get(trial.trial_id)),
                         _cell(result.get(self.objective)), _cell(result.get("test_hm"))])
        return [head, *("  " + line for line in table(header, rows))]

    def _print(self, trials: list, status: dict[str, str] | None = None) -> None:
        self._last_print = time.monotonic()
        self._last_seen = self._seen(trials)
        print("\n".join(self.lines(trials, status)), flush=True)


def runs_view_url(tracking_uri: str, experiment_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI page a user wants (the runs table; MLflow 3 opens on the GenAI overview otherwise)."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else ui
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


PHASE_NAMES = {"checks": "checks", "ray_start": "Ray start", "models": "models", "teacher_cache": "teacher cache",
               "open_parent_run": "parent run", "tune": "Tune (trials)", "report": "summary",
               "ray_shutdown": "Ray shutdown"}


def summary_lines(summary: dict) -> list[str]:
    """The final summary, each line starting `[study]`; the runs-view URL is the last line."""
    lines = [f"[study] {summary['status']}: {summary['message']} ({summary['finished']} finished, "
             f"{summary['errored']} errored, {summary['expected_trials']} configured) in "
             f"{summary['wall_seconds']:.0f} s (models {summary.get('model_build_seconds', 0):.0f} s, teacher cache "
             f"{summary['teacher_cache_seconds']:.0f} s)"]
    if summary.get("phase_seconds"):
        lines.append("[study] time by phase: " + ", ".join(
            f"{PHASE_NAMES.get(name, name)} {seconds:.1f} s" for name, seconds in summary["phase_seconds"].items()))
    best = summary.get("best")
    if best:
        run = (best.get("runs") or [{}])[0]
        lines.append(f"[study] best on the objective, {summary['objective']} ({best['objective']:.2f}): "
                     f"{run.get('run_name', best['params'])}"
                     + (f"  run {run['run_id']}" if run.get("run_id") else ""))
        alone = f"; method alone HM {best['baseline_test_hm']:.2f}" if "baseline_test_hm" in best else ""
        lines.append(f"[study]   test base {best['test_base']:.2f}  novel {best['test_novel']:.2f}  HM "
                     f"{best['test_hm']:.2f} (mean of {best['seeds']} seed(s)){alone}")
    for name, rho in summary.get("spearman_with_test_hm", {}).items():
        lines.append(f"[study] Spearman({name}, test HM) over finished trials: {rho:.2f}")
    if summary.get("importances"):
        lines.append("[study] parameter importances: " + ", ".join(
            f"{name} {value:.2f}" for name, value in summary["importances"].items()))
    lines.append(f"[study] summary table and plots: {summary['summary_dir']}")
    if summary.get("optuna_storage"):
        lines.append(f"[study] Optuna study {summary['study']!r}: {summary['dashboard_command']}")
    lines.append(f"[study] MLflow UI: {summary['mlflow_ui_command']}")
    lines.append(f"[study] MLflow runs: {summary['runs_url']}")
    return lines

"""Benchmark: where a study's wall time goes, how it scales with trial slots, and a trial's peak memory.

Each run is a fresh study (the embedded default, or --config) with its own Tune storage, SQLite MLflow store and
artefact store (so boosting and adapting run instead of being reused; the ToyWorld models are an input and are
built before the clock starts), run as users run it: `python studies/boost_sweep.py` in a process of its own, timed
from that process's start to its exit. For a run with c = search.max_concurrent trial slots:

    used            = Σ trial compute (boosting + adapting + evaluation, timed inside each trial)
                      + c × teacher-cache build (it occupies the machine before trials start)
    available       = c × study wall time (Ray start-up, Tune, MLflow, scheduling gaps all count against it)
    fraction        = used / available                    (target >= 0.85)
    trials_per_hour = finished trials / wall hours
    peak_rss_mb     = the largest peak resident memory a trial process reported (student, cached logits, images)
    phase_seconds   = where the wall time went: checks, Ray start, models, teacher cache, parent run, Tune (the
                      study's own timings, from its summary.json) and the other seconds of the process: its start
                      and imports, the summary, Ray's shutdown
    driver_cpu_seconds, machine_cpu_seconds = CPU spent by the driver process (from its start to the summary, its
                      imports included), and by the whole machine (Linux) during the run: the part that is not
                      trial compute competes with the trials once slots fill the cores
    trial_compute_cpu_seconds = Σ the trial processes' CPU seconds over the same spans as trial compute: wall
                      above CPU is time a trial waited (for a core, a lock, the disk)
    trial_report_seconds = Σ seconds the trials spent inside tune.report (checkpoint copy and Tune's hand-off)

    python studies/bench_study_overhead.py                          # the default study, 2 slots
    python studies/bench_study_overhead.py --slots 1 2              # scaling: 2 slots against 1 (target >= 1.8x)
    python studies/bench_study_overhead.py --image-scale 1 4        # peak trial memory at 1x and 4x the images
    python studies/bench_study_overhead.py --two-node               # also on a 2-node local cluster, 1 CPU each
    python studies/bench_study_overhead.py --slots 0 --side-by-side 3   # are two CoOp runs side by side slower?
    python studies/bench_study_overhead.py --slots 0 --side-by-side 3 --side-by-side-run boost   # two boostings?
    python studies/bench_study_overhead.py --smoke-test

Runs go one after the other (same seeds and trial count). The last line of stdout is JSON: every run and the ratios.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from studies.boost_sweep import DEFAULT_CONFIG, smoke_overrides  # noqa: E402
from studies.scratch import ScratchFolders  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--slots", type=int, nargs="+", default=None,
                        help="max_concurrent values (default: config; 0 alone: no study, e.g. with --side-by-side)")
    parser.add_argument("--image-scale", type=int, nargs="+", default=[1], help="ToyWorld training images x k")
    parser.add_argument("--two-node", action="store_true", help="also run on a 2-node local cluster, 1 CPU each")
    parser.add_argument("--side-by-side", type=int, default=0, metavar="REPEATS",
                        help="also time one run alone and two at once, in plain processes (no Ray)")
    parser.add_argument("--side-by-side-run", choices=("adapt", "boost"), default="adapt",
                        help="what --side-by-side times: CoOp adapting (default), or the study's boosting on its "
                             "cached teacher")
    parser.add_argument("--smoke-test", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the runs' work folders (studies, MLflow, stores)")
    return parser.parse_args(argv)


def study_data(args, slots: int | None, scale: int, work: Path) -> dict:
    from caspl.config import load_yaml

    data = load_yaml(args.config)
    if args.smoke_test:  # the code path only: one trial of one method (the smoke study has two of each)
        data = smoke_overrides(data)
        data["search"]["num_samples"], data["methods"] = 1, data["methods"][:1]
    if slots is not None:
        data["search"]["max_concurrent"] = slots
    if scale != 1:
        options = data["data"].setdefault("options", {})
        options["n_train"] = scale * options.get("n_train", _default_n_train())
    data["storage"] = str(work / "runs")
    data.setdefault("runtime", {})["store"] = str(work / "store")
    data["tracking"] = {"env_file": None, "tracking_uri": f"sqlite:///{work}/mlflow.db", "experiment": "bench"}
    return data


def _default_n_train() -> int:
    from caspl.data.toyworld import load_toyworld

    return inspect.signature(load_toyworld).parameters["n_train"].default


def run_study_process(data: dict, work: Path, env: dict | None = None) -> tuple[dict, float]:
    """The study as users run it, `python studies/boost_sweep.py --config … --fresh`, in a process of its own: run
    in this one, a second study would find the driver's imports (Tune, MLflow, Optuna's importances, matplotlib)
    done by the first. Returns its summary.json and the process's wall seconds (start-up and imports included)."""
    config = work / "study.yaml"
    config.write_text(yaml.safe_dump(data))
    began, machine = time.time(), machine_cpu_seconds()
    done = subprocess.run([sys.executable, str(REPO / "studies" / "boost_sweep.py"), "--config", str(config),
                           "--fresh"], env={**os.environ, **(env or {})}, stdout=sys.stderr)
    wall = time.time() - began
    path = work / "runs" / data["name"] / "summary" / "summary.json"
    if not path.exists():
        raise RuntimeError(f"the study exited {done.returncode} without a summary: python studies/boost_sweep.py "
                           f"--config {config}")
    summary = json.loads(path.read_text())
    if machine is not None:  # every process on the machine: trials, driver, Ray's own (raylet, GCS), anything else
        summary["machine_cpu_seconds"] = round(machine_cpu_seconds() - machine, 1)
    return summary, wall


def machine_cpu_seconds() -> float | None:
    """CPU seconds spent by the whole machine since boot (Linux /proc/stat; None elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    busy = sum(int(v) for i, v in enumerate(fields) if i not in (3, 4))  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def run_two_node(data: dict, work: Path) -> tuple[dict, float]:
    """The study submitted to a head and a second node on this machine (1 CPU each), as on a small cluster."""
    from studies.check_node_loss import start_cluster

    cluster = start_cluster({**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        return run_study_process(data, work, {"RAY_ADDRESS": cluster.address})
    finally:
        cluster.stop()


def peak_rss(data: dict) -> float:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(data["tracking"]["tracking_uri"])
    experiment = client.get_experiment_by_name(data["tracking"]["experiment"])
    runs = client.search_runs([experiment.experiment_id])
    return max((r.data.metrics.get("peak_rss_mb", 0.0) for r in runs), default=0.0)


def row(label: str, summary: dict, wall: float, data: dict) -> dict:
    slots, phases = summary["max_concurrent"], summary.get("phase_seconds", {})
    used = summary["trial_compute_seconds"] + slots * summary["teacher_cache_seconds"]
    return {"run": label, "trials": summary["finished"], "errored": summary["errored"], "max_concurrent": slots,
            "wall_seconds": round(wall, 1), "trial_compute_seconds": summary["trial_compute_seconds"],
            "trial_compute_cpu_seconds": summary["trial_compute_cpu_seconds"],
            "trial_report_seconds": summary["trial_report_seconds"],
            "teacher_cache_seconds": summary["teacher_cache_seconds"],
            "compute_fraction": round(used / (slots * wall), 3),
            "trials_per_hour": round(summary["finished"] / wall * 3600, 1), "peak_rss_mb": round(peak_rss(data), 1),
            "train_images_per_class": data["data"].get("options", {}).get("n_train", _default_n_train()),
            "phase_seconds": {**phases, "other": round(wall - sum(phases.values()), 1)},
            **{key: summary[key] for key in ("driver_cpu_seconds", "machine_cpu_seconds") if key in summary}}


def main(argv=None) -> int:
    args = parse_args(argv)
    _prebuild_models(args)
    with ScratchFolders(args.keep) as scratch:
        rows = []
        for scale in args.image_scale:
            for slots in [c for c in args.slots if c > 0] if args.slots else [None]:  # --slots 0: no study
                work = scratch.make("caspl-bench-study-")
                data = study_data(args, slots, scale, work)
                summary, wall = run_study_process(data, work)
                rows.append(row(f"local slots={summary['max_concurrent']} images x{scale}", summary, wall, data))
                print(json.dumps(rows[-1]), file=sys.stderr)
        side = side_by_side(args, scratch) if args.side_by_side else None
        if args.two_node:
            work = scratch.make("caspl-bench-study-")
            data = study_data(args, 2, 1, work)
            summary, wall = run_two_node(data, work)
            rows.append(row("two nodes x 1 CPU, slots=2", summary, wall, data))
        print(json.dumps({"runs": rows, "ratios": ratios(rows), **({"side_by_side": side} if side else {}),
                          "scratch": scratch.summary()}))
    return 0 if all(r["errored"] == 0 for r in rows) else 1


def side_by_side(args, scratch: ScratchFolders) -> dict:
    """Are two CPU-bound trials side by side slower by themselves? One run timed alone and two at once, rounds
    interleaved, each process with its own fresh store (the ToyWorld models, and for boosting the teacher cache,
    linked in): `caspl adapt` of CoOp (the toy config on the study's dataset and student, no boosting), or
    `caspl boost` with the study's boosting settings (depth 4, length 6: a mid-space trial)."""
    from caspl.artifacts import ArtifactStore
    from caspl.config import load_yaml

    study = smoke_overrides(load_yaml(args.config)) if args.smoke_test else load_yaml(args.config)
    config = scratch.make("caspl-bench-side-") / f"{args.side_by_side_run}.yaml"
    config.write_text(yaml.safe_dump(_side_config(args, study)))
    main_store = ArtifactStore().root
    if args.side_by_side_run == "boost":  # the teacher cache is an input, as in a study's trials: built once here
        subprocess.run([sys.executable, "-m", "caspl.cli", "cache", "-c", str(config)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        linked = ("toyworld_models", "toyworld_data", "teacher_logits", "teacher_text")
    else:
        linked = ("toyworld_models",)

    def start() -> tuple[subprocess.Popen, float]:
        store = scratch.make("caspl-bench-side-store-")
        for name in linked:
            if (main_store / name).is_dir():  # none to link for weights given as files
                (store / name).mkdir()
                for built in (main_store / name).iterdir():
                    (store / name / built.name).symlink_to(built)
        env = {**os.environ, "CASPL_CACHE": str(store)}
        command = [sys.executable, "-m", "caspl.cli", args.side_by_side_run, "-c", str(config)]
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), time.time()

    def timed(procs: list[tuple[subprocess.Popen, float]]) -> list[float]:
        seconds = []
        for proc, began in procs:
            if proc.wait() != 0:
                raise RuntimeError(f"side-by-side run failed: caspl {args.side_by_side_run} -c {config}")
            seconds.append(round(time.time() - began, 2))
        return seconds

    alone, together = [], []
    for _ in range(args.side_by_side):
        alone += timed([start()])
        together += timed([start(), start()])
    slowdown = statistics.median(together) / statistics.median(alone)
    print(json.dumps({"alone_seconds": alone, "side_by_side_seconds": together}), file=sys.stderr)
    return {"run": args.side_by_side_run, "alone_seconds": alone, "side_by_side_seconds": together,
            "slowdown": round(slowdown, 3)}


def _side_config(args, study: dict) -> dict:
    from caspl.config import load_yaml

    if args.side_by_side_run == "boost":
        return {**study["boost"], "student": study["student"], "teacher": study["teacher"], "data": study["data"],
                "method": {"text_length": 6, "vision_length": 6, "text_depth": 4, "vision_depth": 4,
                           "temperature": 1.0},
                "runtime": study.get("runtime", {})}
    data = load_yaml(REPO / "studies" / "configs" / "adapt" / "coop_toy.yaml")
    data.pop("boost")
    data.update(student=study["student"], seeds=[1], data={**data["data"], **study["data"]})
    if args.smoke_test:  # else the toy config's own budget: 200 epochs, about 20 s of compute per run here
        data.update(shots=study["adapt"]["shots"], optim={**data["optim"], **study["adapt"]["optim"]})
    return data


def ratios(rows: list[dict]) -> dict:
    """Side-by-side ratios: trial throughput of 2 slots over 1, peak memory of the largest image scale over 1x."""
    out = {}
    by_slots = {r["max_concurrent"]: r for r in rows if r["run"].startswith("local") and r["run"].endswith("x1")}
    if 1 in by_slots and 2 in by_slots:
        out["throughput_2_slots_over_1"] = round(by_slots[2]["trials_per_hour"] / by_slots[1]["trials_per_hour"], 3)
    local = [r for r in rows if r["run"].startswith("local")]
    scales = sorted({r["train_images_per_class"] for r in local})
    if len(scales) > 1:
        low = next(r for r in local if r["train_images_per_class"] == scales[0])
        high = next(r for r in local if r["train_images_per_class"] == scales[-1])
        out[f"peak_rss_{scales[-1] // scales[0]}x_images_over_1x"] = round(high["peak_rss_mb"] / low["peak_rss_mb"], 3)
    return out


def _prebuild_models(args) -> None:
    """Build the study's ToyWorld models (those of the smoke recipes for --smoke-test) before any clock starts."""
    import caspl.train  # noqa: F401  (registers the toyworld weight sources)
    from caspl.config import load_yaml
    from caspl.models import ModelSpec, load_clip

    data = load_yaml(args.config)
    if args.smoke_test:
        data = smoke_overrides(data)
    for role in ("student", "teacher"):
        if str(data[role].get("pretrained", "")).startswith("toyworld"):
            load_clip(ModelSpec(data[role]["name"], data[role]["pretrained"]))


if __name__ == "__main__":
    from caspl.startup import exit_with

    exit_with(main())

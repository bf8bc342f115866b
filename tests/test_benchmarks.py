"""Every script under studies/ has a CI-sized `--smoke-test`, and CI runs it: the benchmarks here (their JSON summary,
the last line of stdout, holds the ratios the README quotes), the studies, checks and tables in their own tests."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "studies"

# What each benchmark's JSON summary must hold: the ratio it exists to measure and what it is computed from.
BENCHMARK_KEYS = {
    "bench_cache_throughput.py": {"raw_views_per_s", "cache_views_per_s", "ratio", "raw_seconds", "cache_seconds"},
    "bench_inference.py": {"model", "repeats", "results"},
    "bench_startup.py": {"modules", "repeats", "default", "paused", "ratios", "seconds_saved_per_process"},
    "bench_study_overhead.py": {"runs", "ratios"},
    "bench_teacher_cache.py": {"speedup", "ideal_speedup", "fraction_of_ideal", "teacher_view_passes_later_trials"},
}


def test_every_benchmark_has_its_expected_summary_listed():
    assert sorted(p.name for p in STUDIES.glob("bench_*.py")) == sorted(BENCHMARK_KEYS)


def test_every_script_has_a_smoke_test_that_a_test_runs():
    tests = "\n".join(p.read_text() for p in (REPO / "tests").glob("test_*.py"))
    for script in sorted(STUDIES.glob("*.py")):
        if '__name__ == "__main__"' not in script.read_text():
            continue  # a module the scripts share (studies/scratch.py), not a script
        assert '"--smoke-test"' in script.read_text(), f"{script.name}: add a --smoke-test flag"
        assert script.name in tests or script.stem in tests, f"{script.name}: no test exercises it"


# serial, measured here: the longest start first under xdist
SMOKE_SECONDS = {"bench_study_overhead.py": 50, "bench_cache_throughput.py": 20, "bench_teacher_cache.py": 20,
                 "bench_inference.py": 8, "bench_startup.py": 5}


@pytest.mark.parametrize("script", [pytest.param(name, marks=pytest.mark.slow(seconds=SMOKE_SECONDS[name]))
                                    for name in sorted(BENCHMARK_KEYS)])
def test_benchmark_smoke_test_prints_its_summary_last(script, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}  # CASPL_CACHE: the session's store
    extra = ["--side-by-side", "1"] if script == "bench_study_overhead.py" else []
    done = subprocess.run([sys.executable, str(STUDIES / script), "--smoke-test", *extra], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert BENCHMARK_KEYS[script] <= set(summary), sorted(summary)
    if script in ("bench_study_overhead.py", "bench_teacher_cache.py"):  # the work folders they made are gone
        assert summary["scratch"]["folders"] and not summary["scratch"]["kept"]
        assert [folder for folder in summary["scratch"]["folders"] if Path(folder).exists()] == []
    if script == "bench_cache_throughput.py":
        assert summary["ratio"] == pytest.approx(summary["cache_views_per_s"] / summary["raw_views_per_s"], rel=0.05,
                                                 abs=0.001)  # printed to 3 decimals
    if script == "bench_study_overhead.py":
        assert summary["runs"] and all(run["errored"] == 0 and run["trials"] > 0 for run in summary["runs"])
        assert all(0 < run["trial_compute_cpu_seconds"] and 0 <= run["trial_report_seconds"]
                   < run["trial_compute_seconds"] for run in summary["runs"])
        side = summary["side_by_side"]  # one CoOp run alone, then two at once
        assert len(side["alone_seconds"]) == 1 and len(side["side_by_side_seconds"]) == 2
        assert side["slowdown"] == pytest.approx(statistics.median(side["side_by_side_seconds"])
                                                 / side["alone_seconds"][0], abs=0.001)
    if script == "bench_teacher_cache.py":  # later trials with other temperatures reuse the cache
        assert summary["teacher_view_passes_later_trials"] == [0, 0, 0]
    if script == "bench_inference.py":
        assert all(len(row["slowdown_pct_per_repeat"]) == summary["repeats"] for row in summary["results"])
    if script == "bench_startup.py":  # no full collection while the modules load with the collector paused
        assert summary["paused"]["full_collections"] == 0 < summary["default"]["full_collections"]
        assert all(len(summary[kind][key]["all"]) == summary["repeats"] for kind in ("default", "paused")
                   for key in ("import_seconds", "exit_seconds"))
        assert summary["ratios"]["exit"] == pytest.approx(summary["default"]["exit_seconds"]["median"]
                                                          / summary["paused"]["exit_seconds"]["median"], rel=0.01)


@pytest.mark.parametrize("run", ["adapt", "boost"])
def test_side_by_side_runs_are_valid_configs_of_their_command(run):
    """`bench_study_overhead.py --side-by-side-run {adapt,boost}` times `caspl adapt` / `caspl boost` on a config
    built from the study's: it must load as that command's config, on the study's student, data and budgets."""
    from caspl.config import from_dict, load_yaml
    from caspl.train.adapt import AdaptRunConfig
    from caspl.train.boost import BoostRunConfig
    from studies.bench_study_overhead import DEFAULT_CONFIG, _side_config, parse_args

    study = load_yaml(DEFAULT_CONFIG)
    config = _side_config(parse_args(["--slots", "0", "--side-by-side", "1", "--side-by-side-run", run]), study)
    loaded = from_dict({"adapt": AdaptRunConfig, "boost": BoostRunConfig}[run], config, run)
    assert loaded.student.name == study["student"]["name"] and loaded.data.dataset == study["data"]["dataset"]
    if run == "boost":
        assert loaded.teacher.name == study["teacher"]["name"] and loaded.teacher_mode == "cached"
        assert loaded.optim.epochs == study["boost"]["optim"]["epochs"]


def test_cpu_by_process_counts_a_burned_cpu_second_under_its_kind():
    """`studies/cpu_by_process.py --smoke-test` (the sampler behind the README's CPU-by-process-kind table): a
    process that burns one CPU second and then sleeps is counted under its own kind, with that second."""
    done = subprocess.run([sys.executable, str(STUDIES / "cpu_by_process.py"), "--smoke-test", "--interval", "0.2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    burn = summary["kinds"]["smoke burn"]
    assert burn["processes"] == 1 and 0.95 <= burn["cpu_seconds"] <= 1.3, summary
    assert summary["total_cpu_seconds"] >= burn["cpu_seconds"] and summary["wall_seconds"] >= 2.5
    assert "smoke burn" in done.stderr  # the table


def test_process_kinds_follow_what_each_process_runs_not_its_arguments():
    from studies.cpu_by_process import OTHER, kind_of

    python, ray = "/v/bin/python", "/v/lib/python3.11/site-packages/ray"
    assert kind_of(["ray::MapWorker(MapBatches(TeacherActor)).submit"]) == "teacher actors"
    assert kind_of(["ray::ImplicitFunc.train"]) == "trials"
    assert kind_of(["ray::_StatsActor"]) == "Ray Data and Tune helper actors"
    assert kind_of([python, "-u", f"{ray}/_private/log_monitor.py", "--session-dir=/tmp/ray/s"]) == "Ray's log monitors"
    assert kind_of([python, "-u", f"{ray}/autoscaler/_private/monitor.py"]) == "Ray's autoscaler monitors"
    assert kind_of([f"{ray}/core/src/ray/raylet/raylet", "--dashboard_agent_command=python dashboard/agent.py"]) \
        == "raylets"  # not a dashboard for naming one in its arguments
    assert kind_of([python, "studies/boost_sweep.py", "--config", "c.yaml"]) == "study drivers"
    assert kind_of([python, "-u", "-c", "import sys;exec(eval(sys.stdin.readline()))"]) == "xdist workers"
    assert kind_of([python, "-c", "\nimport ray\nray.init(include_dashboard=True)  # TeacherActor"]) == OTHER
    assert kind_of(["/usr/bin/sleep", "1"]) == OTHER and kind_of([]) == OTHER

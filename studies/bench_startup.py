"""Start-up and exit of a process that loads the study stack, with Python's default garbage collection against
caspl.startup (collector paused while the modules load, then frozen; frozen again before exit).

    python studies/bench_startup.py                  # 7 repeats of each, alternating
    python studies/bench_startup.py --smoke-test     # one repeat of each, torch only (CI)

Each repeat starts a fresh interpreter that imports the modules a study's driver loads and exits:
    import_seconds  = from the child's first line of code (the interpreter's own start excluded) to the last module
                      loaded
    exit_seconds    = from the child's last line to its exit, as its parent sees it (the interpreter's shutdown)
    full_collections = full (generation 2) collections while the modules loaded
The two kinds alternate so that a slower spell of the machine falls on both. The last line of stdout is a JSON summary
whose `ratios` are default / caspl.startup medians (above 1: caspl.startup is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# what `python studies/boost_sweep.py` imports over a study (its import block, then Ray Tune, MLflow's SQL store,
# Optuna and the summary's plotting)
DRIVER_MODULES = ["caspl.study.config", "caspl.study.runner", "ray.tune", "mlflow.store.tracking.sqlalchemy_store",
                  "optuna", "matplotlib.pyplot"]

CHILD = """
import sys, time
began = time.time()
import gc, importlib, json
from caspl.startup import before_exit, loading_modules
modules, paused = sys.argv[1].split(","), sys.argv[2] == "paused"
collections = gc.get_stats()[2]["collections"]
if paused:
    with loading_modules():
        for name in modules:
            importlib.import_module(name)
else:
    for name in modules:
        importlib.import_module(name)
loaded = time.time()
print(json.dumps({"import_seconds": loaded - began, "full_collections": gc.get_stats()[2]["collections"] - collections,
                  "tracked_objects": len(gc.get_objects()) + gc.get_freeze_count(), "last_line_at": time.time()}),
      flush=True)
if paused:
    before_exit()
"""


def measure(modules: list[str], kind: str) -> dict:
    """One fresh interpreter: its import and exit seconds."""
    done = subprocess.run([sys.executable, "-c", CHILD, ",".join(modules), kind], capture_output=True, text=True,
                          cwd=REPO)
    ended = time.time()
    if done.returncode != 0:
        raise SystemExit(f"bench_startup: the {kind} child failed:\n{done.stderr[-2000:]}")
    child = json.loads(done.stdout.strip().splitlines()[-1])
    return {"import_seconds": child["import_seconds"], "exit_seconds": ended - child["last_line_at"],
            "full_collections": child["full_collections"], "tracked_objects": child["tracked_objects"]}


def summarise(rows: list[dict]) -> dict:
    out = {}
    for key in ("import_seconds", "exit_seconds"):
        values = [row[key] for row in rows]
        out[key] = {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
                    "max": round(max(values), 3), "all": [round(v, 3) for v in values]}
    out["full_collections"] = statistics.median(row["full_collections"] for row in rows)
    out["tracked_objects"] = statistics.median(row["tracked_objects"] for row in rows)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="fresh interpreters of each kind")
    parser.add_argument("--modules", nargs="+", default=DRIVER_MODULES, help="what each interpreter imports")
    parser.add_argument("--smoke-test", action="store_true", help="one repeat of each, importing torch only")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.repeats, args.modules = 1, ["torch"]
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows: dict[str, list[dict]] = {"default": [], "paused": []}
    for repeat in range(args.repeats):
        for kind in ("default", "paused") if repeat % 2 == 0 else ("paused", "default"):
            rows[kind].append(measure(args.modules, kind))
            row = rows[kind][-1]
            print(f"[bench_startup] {repeat + 1}/{args.repeats} {kind:7s} import {row['import_seconds']:.2f} s, "
                  f"exit {row['exit_seconds']:.2f} s, {row['full_collections']} full collections", file=sys.stderr)
    default, paused = summarise(rows["default"]), summarise(rows["paused"])

    def ratio(key: str) -> float:
        return round(default[key]["median"] / max(paused[key]["median"], 1e-6), 3)

    total_default = statistics.median(r["import_seconds"] + r["exit_seconds"] for r in rows["default"])
    total_paused = statistics.median(r["import_seconds"] + r["exit_seconds"] for r in rows["paused"])
    print(json.dumps({"modules": args.modules, "repeats": args.repeats, "default": default, "paused": paused,
                      "seconds_saved_per_process": round(total_default - total_paused, 3),
                      "ratios": {"import": ratio("import_seconds"), "exit": ratio("exit_seconds"),
                                 "import_and_exit": round(total_default / max(total_paused, 1e-6), 3)}}))
    return 0


if __name__ == "__main__":
    from caspl.startup import exit_with

    exit_with(main())

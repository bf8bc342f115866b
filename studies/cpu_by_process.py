"""CPU seconds by process kind while a command runs: where a test session's (or a study's) CPU goes.

Every `--interval` seconds every process on the machine is read from Linux's /proc (user + system CPU time and the
command line). A process counts under the first kind whose pattern its command line contains (the last command
line seen: Ray renames its workers), with the CPU it used while the command ran. A process that ends between two
readings keeps its last one, so up to one interval of each short-lived process is missed.

    python studies/cpu_by_process.py -- python -m pytest -n auto --dist load --maxschedchunk 1   # the README table
    python studies/cpu_by_process.py -- python studies/boost_sweep.py --smoke-test
    python studies/cpu_by_process.py --smoke-test

Prints a table on stderr; the last line of stdout is JSON: CPU seconds and process count per kind, the total, the
command's wall seconds and its exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from caspl.procfs import stat_fields  # noqa: E402

# (kind, patterns): a process is of the first kind with a pattern in its program (see `program`); order matters
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("teacher actors", ("TeacherActor",)),
    ("trials", ("ray::ImplicitFunc",)),
    ("Ray Train workers and controller", ("ray::RayTrainWorker", "ray::TrainController")),
    ("Ray Data and Tune helper actors", ("ray::_", "ray::ActorLocationTracker", "ray::SplitCoordinator")),
    ("Ray's agents", ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "dashboard/agent.py", "runtime_env/agent/")),
    ("Ray's idle workers", ("ray::IDLE",)),
    ("other Ray workers", ("ray::",)),
    ("Ray's dashboards", ("dashboard/dashboard.py", "ray-dashboard-")),
    ("Ray's log monitors", ("_private/log_monitor.py",)),
    ("Ray's autoscaler monitors", ("autoscaler/_private/monitor.py",)),
    ("raylets", ("/raylet",)),
    ("GCS servers", ("/gcs_server",)),
    ("Ray Client servers", ("-m ray.util.client.server",)),
    ("Ray's command line", ("bin/ray",)),
    ("study drivers", ("studies/boost_sweep.py",)),
    ("other studies/ scripts", ("studies/",)),
    ("caspl commands", ("-m caspl.cli", "bin/caspl")),
    ("xdist workers", ("-c import sys;exec(",)),
    ("pytest", ("pytest",)),
    ("multiprocessing children", ("-c from multiprocessing",)),
)
OTHER = "other"
SMOKE_BURN = """# cpu_by_process smoke burn
import time
began = time.process_time()
while time.process_time() - began < 1.0:
    pass
time.sleep(1.5)
"""


def program(argv: list[str]) -> str:
    """What a process runs: Ray's title of its worker ("ray::IDLE"), a Python process's script, `-m module` or
    `-c <first line of the code>`, or else the executable. Not the rest of the command line: arguments (a raylet's
    worker commands, the code of `python -c`) would match other kinds' patterns."""
    if not argv:
        return ""
    if not os.path.basename(argv[0]).startswith("python"):
        return argv[0]
    rest = argv[1:]
    while rest and rest[0].startswith("-") and rest[0] not in ("-c", "-m"):
        rest = rest[2:] if rest[0] in ("-X", "-W") else rest[1:]
    if rest[:1] == ["-c"] and len(rest) > 1:
        return "-c " + next((line.strip() for line in rest[1].splitlines() if line.strip()), "")
    return " ".join(rest[:2]) if rest[:1] == ["-m"] else " ".join(rest[:1])


def kind_of(argv: list[str], kinds: tuple[tuple[str, tuple[str, ...]], ...] = KINDS) -> str:
    found = program(argv)
    return next((kind for kind, patterns in kinds if any(p in found for p in patterns)), OTHER)


def read_processes() -> dict[tuple[int, int], tuple[float, list[str]]]:
    """(pid, start time) -> (CPU seconds so far, command line) for every process this user can read. The start time
    tells a process from a later one that got the same pid (pids wrap at 32768 here). A kernel thread, or a process
    that has ended and not been waited for yet, has an empty command line."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = stat_fields(entry.path)
            argv = Path(entry.path, "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # ended meanwhile, or not ours to read
            continue
        cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14 and 15 of proc(5))
        found[(int(entry.name), int(fields[19]))] = (cpu, [arg for arg in argv if arg] if argv[0] else [])
    return found


def profile(command: list[str], interval: float, kinds: tuple[tuple[str, tuple[str, ...]], ...] = KINDS) -> dict:
    """Run `command`; CPU seconds and process counts by kind over its run."""
    if not Path("/proc/self/stat").exists():
        raise SystemExit("cpu_by_process: needs Linux's /proc")
    baseline = {process: cpu for process, (cpu, _) in read_processes().items()}
    used: dict[tuple[int, int], float] = {}
    names: dict[tuple[int, int], list[str]] = {}
    began = time.time()
    proc = subprocess.Popen(command)
    while True:
        for process, (cpu, argv) in read_processes().items():
            if process[0] != os.getpid():
                used[process] = cpu - baseline.get(process, 0.0)
                if argv or process not in names:  # a process that ended keeps its command line
                    names[process] = argv
        if proc.poll() is not None:
            break
        time.sleep(interval)
    wall = time.time() - began
    by_kind: dict[str, dict] = {}
    for process, cpu in used.items():
        if cpu <= 0:
            continue
        row = by_kind.setdefault(kind_of(names[process], kinds), {"cpu_seconds": 0.0, "processes": 0})
        row["cpu_seconds"] += cpu
        row["processes"] += 1
    ordered = dict(sorted(((k, {"cpu_seconds": round(v["cpu_seconds"], 1), "processes": v["processes"]})
                           for k, v in by_kind.items()), key=lambda kv: -kv[1]["cpu_seconds"]))
    return {"kinds": ordered, "total_cpu_seconds": round(sum(cpu for cpu in used.values() if cpu > 0), 1),
            "wall_seconds": round(wall, 1), "exit_code": proc.returncode, "interval": interval}


def print_table(summary: dict) -> None:
    print(f"{'process kind':<36} {'CPU s':>8} {'processes':>10}", file=sys.stderr)
    for kind, row in summary["kinds"].items():
        print(f"{kind:<36} {row['cpu_seconds']:>8.1f} {row['processes']:>10}", file=sys.stderr)
    print(f"{'all':<36} {summary['total_cpu_seconds']:>8.1f}   in {summary['wall_seconds']} s of wall",
          file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between two readings of /proc")
    parser.add_argument("--kind", action="append", default=[], metavar="LABEL=PATTERN",
                        help="a kind of your own, checked before the built-in ones (repeatable)")
    parser.add_argument("--smoke-test", action="store_true",
                        help="profile a Python process that burns 1 CPU second, then sleeps")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.smoke_test:
        command = [sys.executable, "-c", SMOKE_BURN]
        args.kind.append("smoke burn=cpu_by_process smoke burn")
    if not command:
        parser.error("give the command to profile after --, or --smoke-test")
    if any("=" not in k for k in args.kind):
        parser.error(f"--kind takes LABEL=PATTERN, got {[k for k in args.kind if '=' not in k]}")
    own = tuple((label, (pattern,)) for label, pattern in (k.split("=", 1) for k in args.kind))
    summary = profile(command, args.interval, own + KINDS)
    print_table(summary)
    print(json.dumps(summary))
    return summary["exit_code"]


if __name__ == "__main__":
    sys.exit(main())

"""`caspl study dashboard`: open optuna-dashboard on a study's Optuna storage (`<storage>/<name>/optuna.db`)."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from caspl.errors import ConfigError


def register(subparsers) -> None:
    study = subparsers.add_parser("study", help="a study's results: `caspl study dashboard -c <study config>`")
    actions = study.add_subparsers(dest="study_command", metavar="ACTION", required=True)
    dashboard = actions.add_parser("dashboard", help="open optuna-dashboard on the study's Optuna trials")
    dashboard.add_argument("--config", "-c", required=True, help="the study YAML the study ran with")
    dashboard.add_argument("--storage", help="Tune storage path or URI (as given to boost_sweep.py --storage)")
    dashboard.add_argument("--name", help="study name (as given to boost_sweep.py --name)")
    dashboard.add_argument("--smoke-test", action="store_true", help="the study's --smoke-test version")
    dashboard.add_argument("--host", default="127.0.0.1")
    dashboard.add_argument("--port", type=int, default=8080)
    dashboard.add_argument("--print", action="store_true", dest="print_only",
                           help="print the optuna-dashboard command instead of running it")
    dashboard.set_defaults(func=run_dashboard)


def dashboard_storage(config: str, storage: str | None = None, name: str | None = None,
                      smoke_test: bool = False) -> str:
    """The study's Optuna storage URL; ConfigError when the study has not written one yet."""
    from caspl.config import load_yaml
    from caspl.study.config import check_study_name
    from caspl.study.optuna_store import storage_url
    from caspl.study.storage import OPTUNA_FILE, StudyFolder, normalise_storage

    data = load_yaml(config)
    name = name or (f"{data.get('name', 'study')}-smoke" if smoke_test else data.get("name"))
    check_study_name(name)
    folder = StudyFolder(normalise_storage(storage or data.get("storage", "runs")), name)
    if not folder.is_local:
        raise ConfigError(f"the study's Optuna storage {folder.path}/{OPTUNA_FILE} is not on this machine; copy "
                          "it here and run: optuna-dashboard sqlite:///<copy>")
    if not (Path(folder.path) / OPTUNA_FILE).is_file():
        raise ConfigError(f"{folder.path}/{OPTUNA_FILE} does not exist: the study has not ended a run yet (run it, "
                          "or pass the --storage and --name it ran with)")
    return storage_url(folder)


def run_dashboard(args: argparse.Namespace) -> int:
    url = dashboard_storage(args.config, args.storage, args.name, args.smoke_test)
    command = ["optuna-dashboard", url, "--host", args.host, "--port", str(args.port)]
    if args.print_only:
        print(" ".join(command))
        return 0
    executable = shutil.which("optuna-dashboard")
    if executable is None:
        raise ConfigError("optuna-dashboard is not installed; pip install 'caspl[dashboard]' (or: pip install "
                          "optuna-dashboard)")
    print(f"optuna-dashboard on http://{args.host}:{args.port}/ (Ctrl-C stops it)", flush=True)
    os.execv(executable, command)
    return 0  # not reached

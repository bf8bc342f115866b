"""The study: config validation before Ray, an end-to-end tiny study with MLflow, resume after kill -9, and
submission to a running Ray head with `ray job submit`."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from caspl.errors import CasplError
from caspl.study.config import load_study_config
from caspl.study.runner import prepare_study

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "studies" / "boost_sweep.py"


def tiny_study(tmp_path: Path, **changes) -> dict:
    data = {
        "name": "tiny",
        "student": {"name": "caspl-tiny"}, "teacher": {"name": "caspl-tiny-teacher"},
        "data": {"dataset": "toy_shapes", "options": {"n_train": 4, "n_val": 2, "n_test": 2}},
        "methods": ["coop", "ivlp"],
        "search": {"num_samples": 3, "seeds": [1], "max_concurrent": 1, "space": {
            "boost.depth": {"type": "int", "low": 1, "high": "max"},
            "boost.length": {"type": "int", "low": 2, "high": 4},
            "boost.temperature": {"type": "float", "low": 0.5, "high": 4.0, "log": True},
            "coop.n_ctx": {"type": "categorical", "choices": [2, 4]}}},
        "boost": {"optim": {"lr": 0.01, "epochs": 2, "batch_size": 16, "warmup_epochs": 1},
                  "cache": {"views": 2, "batch_size": 64, "crop_scale": [0.5, 1.0]}},
        "adapt": {"shots": 2, "optim": {"lr": 0.01, "epochs": 3, "batch_size": 8, "warmup_epochs": 1},
                  "methods": {"ivlp": {"text_length": 2, "vision_length": 2, "text_depth": 2, "vision_depth": 2}}},
        "storage": str(tmp_path / "runs"),
        "tracking": {"env_file": None, "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "tiny"},
        "resources": {"trial_cpus": 0.5},
        "runtime": {"threads": 1},
    }
    for dotted, value in changes.items():
        target = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            target = target[part]
        target[leaf] = value
    return data


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_registered_base_method_can_be_searched_in_a_study(tmp_path):
    """Studies take their methods from the registry: each base method's trials build at both ends of the space."""
    from caspl.methods import BASE, list_methods
    from caspl.study.runner import check_study
    from conftest import METHOD_CASES

    methods = list_methods(BASE)
    defaults = {m: {k: v for k, v in METHOD_CASES[m].items() if k != "method"} for m in methods}
    study = load_study_config(tiny_study(tmp_path, methods=methods, **{"adapt.methods": defaults}))
    space = check_study(study)
    assert space.methods == methods and "coop.n_ctx" in space.params


def _space(**params) -> dict:
    """tiny_study's search space with some parameters changed (None drops one)."""
    space = {"boost.depth": {"type": "int", "low": 1, "high": "max"},
             "boost.length": {"type": "int", "low": 2, "high": 4},
             "boost.temperature": {"type": "float", "low": 0.5, "high": 4.0, "log": True},
             "coop.n_ctx": {"type": "categorical", "choices": [2, 4]}}
    space.update(params)
    return {k: v for k, v in space.items() if v is not None}


def _int(low, high, **more) -> dict:
    return {"type": "int", "low": low, "high": high, **more}


def _file(path: str):
    def make(tmp: Path, data: dict) -> None:
        target = Path(path.format(tmp=tmp))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("not a folder\n")
    return make


def _folder(path: str):
    return lambda tmp, data: Path(path.format(tmp=tmp)).mkdir(parents=True, exist_ok=True)


def _study_link(tmp: Path, data: dict) -> None:
    (tmp / "elsewhere").mkdir()
    (tmp / "runs" / "tiny").symlink_to(tmp / "elsewhere")


def _study_state(parent_run_id: str | None, config_hash: str | None = None):
    def make(tmp: Path, data: dict) -> None:
        from caspl.config import config_hash as hash_of
        from caspl.study.tracking import TrackingSettings, experiment_id

        experiment_id(TrackingSettings(data["tracking"]["tracking_uri"], "tiny"))  # the store exists, run or not
        state = {"uid": "u", "config_hash": config_hash or hash_of(load_study_config(data)),
                 "parent_run_id": parent_run_id}
        (tmp / "runs" / "tiny").mkdir()
        (tmp / "runs" / "tiny" / "caspl_study.json").write_text(json.dumps(state))
    return make


# Bad inputs, by class, each a representative per field: (changes to tiny_study, message regex, setup or None).
# "{tmp}" in a value stands for the test's folder. All must fail before Ray starts, with exit code 2 and one line.
BAD_INPUTS = {
    # names
    "name empty": ({"name": ""}, "study name '' must be"),
    "name ..": ({"name": ".."}, r"study name '\.\.' must be"),
    "name .": ({"name": "."}, r"study name '\.' must be"),
    "name with a path": ({"name": "../other"}, "study name '../other' must be"),
    "name absolute": ({"name": "/tmp/x"}, "study name '/tmp/x' must be"),
    "name with a space": ({"name": "my study"}, "study name 'my study' must be"),
    "name too long": ({"name": "x" * 101}, "study name 'x+' must be 1-100"),
    "unknown method": ({"methods": ["coop", "nosuch"]}, "base methods"),
    # datasets and the objective
    "no dataset": ({"data": []}, r"data must name at least one dataset, each once \(got \[\]\)"),
    "dataset twice": ({"data": [{"dataset": "toy_shapes"}, {"dataset": "toy_shapes"}]}, "each once"),
    "boost.data with several datasets": ({"data": [{"dataset": "toy_shapes"}, {"dataset": "toy_sketch"}],
                                          "boost.data": {"dataset": "toy_shapes"}}, "boosts on each of them"),
    "asha with several datasets": ({"data": [{"dataset": "toy_shapes"}, {"dataset": "toy_sketch"}],
                                    "search.scheduler": "asha"}, "with a single dataset"),
    "unknown objective": ({"search.objective": "test_hm"}, r"search.objective is 'test_hm'; choose one of"),
    "methods repeated": ({"methods": ["coop", "coop"]}, "distinct base methods"),
    "experiment name blank": ({"tracking.experiment": " "}, "tracking.experiment must be a non-empty"),
    # lengths: searched (every value of a range or choice list), fixed, in a method's defaults
    "boost length 0 searched": ({"search.space": _space(**{"boost.length": _int(0, 4)})},
                                r"boost.method.text_length must be an integer >= 1, got 0 \(in trials with"),
    "boost length negative searched": ({"search.space": _space(**{"boost.length": _int(-2, 4)})},
                                       "text_length must be an integer >= 1, got -2"),
    "boost length 0 fixed": ({"boost.method": {"text_length": 0}}, "boost.method.text_length must be an integer"),
    "boost vision length negative fixed": ({"boost.method": {"vision_length": -1}},
                                           "boost.method.vision_length must be an integer >= 1, got -1"),
    "coop context 0 among choices": ({"search.space": _space(**{"coop.n_ctx": {"type": "categorical",
                                                                               "choices": [2, 0, 4]}})},
                                     "adapt.method.n_ctx must be an integer >= 1, got 0"),
    "ivlp length 0 in method defaults": ({"adapt.methods": {"ivlp": {"text_length": 0}}},
                                         "ivlp.text_length must be an integer >= 1, got 0"),
    "ivlp length 0 searched": ({"search.space": _space(**{"ivlp.vision_length": _int(0, 2)})},
                               "adapt.method.vision_length must be an integer >= 1, got 0"),
    # depths against the student's 3 layers: searched, fixed, defaulted, in a method's defaults
    "boost depth searched beyond": ({"search.space": _space(**{"boost.depth": _int(1, 9)})}, "must lie in 1..3"),
    "boost depth searched 0": ({"search.space": _space(**{"boost.depth": _int(0, 2)})}, "must lie in 1..3"),
    "boost depth fixed beyond": ({"search.space": _space(**{"boost.depth": None}),
                                  "boost.method": {"text_depth": 2, "vision_depth": 9}},
                                 r"boost.vision_depth 9 is outside 1..3 \(the model's vision tower has 3 layers\)"),
    "boost depth default 12": ({"search.space": _space(**{"boost.depth": None})},
                               "boost.text_depth 12 is outside 1..3"),
    "ivlp depth beyond in method defaults": ({"adapt.methods": {"ivlp": {"text_depth": 5, "vision_depth": 2}}},
                                             "ivlp.text_depth 5 is outside 1..3"),
    "ivlp depth searched beyond": ({"search.space": _space(**{"ivlp.vision_depth": _int(1, 4)})},
                                   r"ivlp.vision_depth 4 is outside 1..3 .* \(in trials with method=ivlp"),
    # shots, seeds, concurrency, samples, workers, CPUs
    "shots 0": ({"adapt.shots": 0}, "shots >= 1"),
    "validation shots negative": ({"adapt.val_shots": -1}, "val_shots >= 0"),
    "seeds empty": ({"search.seeds": []}, "search.seeds must name at least one adapting seed"),
    "seeds repeated": ({"search.seeds": [1, 1]}, r"search.seeds repeats a seed"),
    "max_concurrent 0": ({"search.max_concurrent": 0}, "search.max_concurrent must be >= 1, got 0"),
    "max_concurrent negative": ({"search.max_concurrent": -2}, "search.max_concurrent must be >= 1, got -2"),
    "num_samples 0": ({"search.num_samples": 0}, "search.num_samples must be >= 1, got 0"),
    "num_samples negative": ({"search.num_samples": -3}, "search.num_samples must be >= 1, got -3"),
    "boost workers negative": ({"boost.workers": -1}, "boost.workers must be >= 0"),
    "boost cpus per worker 0": ({"boost.cpus_per_worker": 0}, "boost.cpus_per_worker > 0"),
    "boost workers beyond the CPUs": ({"boost.workers": 2, "resources": {"trial_cpus": 1, "ray_num_cpus": 2}},
                                      r"boost.workers x boost.cpus_per_worker = 3 CPUs exceeds the 2 CPUs"),
    "trial cpus 0": ({"resources": {"trial_cpus": 0}}, "resources.trial_cpus must be > 0"),
    "trial cpus beyond the CPUs": ({"resources": {"trial_cpus": 3, "ray_num_cpus": 2}},
                                   "resources.trial_cpus = 3 CPUs exceeds the 2 CPUs of the local Ray"),
    "cache actors beyond the CPUs": ({"boost.cache": {"actors": 8, "actor_num_cpus": 0.5},
                                      "resources": {"trial_cpus": 0.5, "ray_num_cpus": 2}},
                                     "boost.cache.actors x actor_num_cpus = 4 CPUs exceeds the 2 CPUs"),
    "ray cpus 0": ({"resources": {"ray_num_cpus": 0}}, "resources.ray_num_cpus must be >= 1"),
    "trial gpus negative": ({"resources": {"trial_gpus": -1}}, "resources.trial_gpus must be >= 0"),
    "max_failures negative": ({"resources": {"max_failures": -1}}, "resources.max_failures must be >= 0"),
    # scheduler and search parameters
    "unknown scheduler": ({"search.scheduler": "hyperband"}, r"search.scheduler is 'hyperband'; choose one of"),
    "asha grace period 0": ({"search.scheduler": "asha", "search.grace_period": 0},
                            "search.grace_period must be >= 1"),
    "asha reduction factor 1": ({"search.reduction_factor": 1}, "search.reduction_factor must be >= 2"),
    "log range from 0": ({"search.space": _space(**{"boost.length": _int(0, 4, log=True)})},
                         "must be > 0 for a log-scaled parameter"),
    "negative step": ({"search.space": _space(**{"boost.length": _int(2, 4, step=-1)})}, "step must be > 0"),
    "step with log": ({"search.space": _space(**{"boost.length": _int(2, 4, step=1, log=True)})},
                      "cannot be combined with log"),
    "fractional int bound": ({"search.space": _space(**{"boost.length": _int(1.5, 4)})}, "must be integers"),
    "low above high": ({"search.space": _space(**{"boost.length": _int(4, 2)})}, "need low <= high"),
    "non-positive temperature": ({"search.space": _space(**{"boost.temperature": {"type": "float", "low": 0.0,
                                                                                  "high": 2.0}})},
                                 "temperatures must be > 0"),
    "non-positive learning rate": ({"search.space": _space(**{"adapt.optim.lr": {"type": "float", "low": 0.0,
                                                                                 "high": 0.1}})},
                                   "learning rates must be > 0"),
    "empty search space": ({"search.space": {}}, "search.space is empty"),
    "unknown parameter prefix": ({"search.space": _space(**{"nosuch.n_ctx": _int(1, 2)})}, "the prefix must be"),
    "unknown parameter": ({"search.space": _space(**{"boost.nosuch": _int(1, 2)})}, "boost.method.nosuch"),
    "point of an unknown parameter": ({"search.points_to_evaluate": [{"method": "coop", "boost.depthh": 1}]},
                                      "not a searched parameter or method"),
    "point with a bad value": ({"search.points_to_evaluate": [{"method": "coop", "boost.length": 0}]},
                               "text_length must be an integer >= 1, got 0"),
    "unknown key": ({"adapt.optim": {"lr": 0.01, "epochz": 2}}, "adapt.optim.epochz"),
    # devices
    "unknown device": ({"runtime": {"device": "tpu"}}, "runtime.device 'tpu' must be cpu, cuda or cuda:N"),
    "cuda without trial GPUs": ({"runtime": {"device": "cuda"}}, "needs resources.trial_gpus > 0"),
    "boost on GPUs without cuda": ({"boost.use_gpu": True}, "boost.use_gpu: true needs runtime.device cuda"),
    # data, models, paths
    "unknown dataset": ({"data": {"dataset": "imagenet-9000"}}, "imagenet-9000"),
    "data root missing": ({"data.root": "{tmp}/no_such_root"}, "data.root .*/no_such_root is not an existing folder"),
    "boost data root missing": ({"boost.data": {"dataset": "toy_shapes", "root": "{tmp}/gone"}},
                                "boost.data.root .*/gone is not an existing folder"),
    "teacher weights missing": ({"teacher.pretrained": "{tmp}/teacher.safetensors"},
                                "checkpoint file .*teacher.safetensors does not exist"),
    "storage is a file": ({"storage": "{tmp}/afile"}, "storage .*/afile is a file, not a folder", _file("{tmp}/afile")),
    "storage under a file": ({"storage": "{tmp}/afile/runs"}, "storage .*/afile/runs is not a writable folder",
                             _file("{tmp}/afile")),
    "study folder is a file": ({}, "study folder .*/runs/tiny is a file", _file("{tmp}/runs/tiny")),
    "study folder is a link": ({}, "study folder .*/runs/tiny is a symbolic link", _study_link),
    "study folder holds another's files": ({}, "holds files but no caspl_study.json",
                                           _file("{tmp}/runs/tiny/notes.txt")),
    "store under a file": ({"runtime.store": "{tmp}/afile/store"}, "artefact store .* is not a writable folder",
                           _file("{tmp}/afile")),
    "store on a read-only filesystem": ({"runtime.store": "/proc/caspl-store"},
                                        "artefact store .*/proc/caspl-store is not a writable folder"),
    "store inside the study folder": ({"runtime.store": "{tmp}/runs/tiny/store"},
                                      "the artefact store .* lies inside study folder"),
    "study folder inside the store": ({"runtime.store": "{tmp}/runs"},
                                      "study folder .*/runs/tiny lies inside the artefact store"),
    "tracking database inside the study folder": ({"tracking.tracking_uri": "sqlite:///{tmp}/runs/tiny/mlflow.db"},
                                                  "the MLflow database .* lies inside study folder",
                                                  _folder("{tmp}/runs/tiny")),
    "tracking folder missing": ({"tracking.tracking_uri": "sqlite:///{tmp}/nowhere/mlflow.db"},
                                "folder .*/nowhere does not exist"),
    "tracking database is a folder": ({"tracking.tracking_uri": "sqlite:///{tmp}/db"},
                                      "MLflow tracking database .*/db cannot be written", _folder("{tmp}/db")),
    "tracking folder read-only": ({"tracking.tracking_uri": "sqlite:////proc/mlflow.db"},
                                  "MLflow tracking folder /proc is not a writable folder"),
    "unreachable tracking server": ({"tracking": {"env_file": None, "tracking_uri": "http://127.0.0.1:9"}},
                                    "unreachable"),
    "resumed study with another config": ({}, "holds a study with another config", _study_state("r", "other")),
    "resumed study's parent run missing": ({}, "logs to parent run 0123abcd, which tracking store .* does not hold",
                                           _study_state("0123abcd")),
}


def _fill(value, tmp: Path):
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, dict):
        return {k: _fill(v, tmp) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, tmp) for v in value]
    return value


def tree_digest(folder: Path) -> str:
    """sha256 over every path (links as links) and file content under `folder`."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_symlink():
            digest.update(os.readlink(path).encode())
        elif path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_study_inputs_exit_2_with_one_line_before_ray_and_change_nothing(tmp_path, case, capsys, without_ray):
    from studies.boost_sweep import main

    changes, message, *setup = BAD_INPUTS[case]
    data = tiny_study(tmp_path, **_fill(changes, tmp_path))
    sibling = tmp_path / "runs" / "other_study"  # another study's results, next to this one's folder
    sibling.mkdir(parents=True)
    (sibling / "summary.json").write_text('{"best": 1}\n')
    for make in setup:
        make(tmp_path, data)
    path = _write(tmp_path, data)
    before = tree_digest(tmp_path)
    capsys.readouterr()  # what the setup printed
    code = main(["--config", str(path)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert re.search(message, lines[0]), lines[0]
    assert tree_digest(tmp_path) == before  # nothing written, created or deleted
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_bad_config_exits_2_with_one_line_and_no_ray(tmp_path):
    """The same through a fresh interpreter: nothing before the check starts Ray."""
    path = _write(tmp_path, tiny_study(tmp_path, methods=["coop", "nosuch"]))
    done = subprocess.run([sys.executable, str(SWEEP), "--config", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "base methods" in lines[0]
    assert "Started a local Ray instance" not in done.stdout + done.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_requested_without_a_gpu_is_refused_before_ray(tmp_path):
    changes = {"runtime": {"device": "cuda"}, "resources": {"trial_cpus": 0.5, "trial_gpus": 1}}
    with pytest.raises(CasplError, match="has no CUDA GPU; use device: cpu"):
        prepare_study(load_study_config(tiny_study(tmp_path, **changes)), REPO)


def test_corner_trials_cover_every_value_of_every_parameter(tmp_path):
    """The pre-Ray check builds each extreme of each parameter (the highest reachable value of a stepped range)."""
    from caspl.study.checks import corner_trials
    from caspl.study.runner import check_study

    space = _space(**{"boost.length": _int(2, 7, step=2), "coop.n_ctx": {"type": "categorical", "choices": [2, 6, 4]}})
    study = load_study_config(tiny_study(tmp_path, **{"search.space": space}))
    corners = list(corner_trials(study, check_study(study)))
    assert {c["boost.length"] for c in corners} == {2, 6}  # 7 is not reachable from 2 in steps of 2
    assert {c["coop.n_ctx"] for c in corners if c["method"] == "coop"} == {2, 4, 6}
    assert all("coop.n_ctx" not in c for c in corners if c["method"] == "ivlp")
    assert {c["boost.depth"] for c in corners} == {1, 3}


def _runs(db: Path, experiment: str = "tiny") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def _finished_children(db: Path) -> list[str]:
    """Ids of FINISHED child runs, read straight from MLflow's SQLite tables: fast enough to poll every 50 ms."""
    import sqlite3
    from contextlib import closing

    query = ("SELECT runs.run_uuid FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid "
             "WHERE tags.key = 'mlflow.parentRunId' AND runs.status = 'FINISHED'")
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as connection:
            return [row[0] for row in connection.execute(query)]
    except sqlite3.Error:  # not created yet, or locked by a writer
        return []


def _wait_until_still(folder: Path, quiet: float = 3.0, timeout: float = 60.0) -> None:
    """Wait until nothing under `folder` has changed for `quiet` seconds (at most `timeout`)."""
    def newest() -> float:
        times = [0.0]
        for path in folder.rglob("*"):
            try:
                times.append(path.stat().st_mtime)
            except FileNotFoundError:  # a temporary file renamed meanwhile
                continue
        return max(times)

    deadline = time.time() + timeout
    while time.time() < deadline and time.time() - newest() < quiet:
        time.sleep(0.5)


def _children(runs):
    """The trial runs among `runs` (child runs that are not method-alone baselines)."""
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.data.tags.get("caspl.role") != "baseline"]


def _env(tmp_path):
    venv_bin = str(Path(sys.executable).parent)  # `python` in a job's entrypoint must be this interpreter
    return {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
            "CASPL_CACHE": os.environ["CASPL_CACHE"], "RAY_AUTH_MODE": "disabled",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONUNBUFFERED": "1"}


# Instants of the start-up, in order, each a distinct state of the study folder (see caspl.study.storage). Files
# that stay, not temporary ones: a poll can miss a file that lives a millisecond. (The instant between creating the
# parent run and recording it is covered by test_a_parent_run_created_but_not_recorded_is_found_again_by_the_study_uid.)
STARTUP_KILLS = (
    "caspl_study.json",  # the study state written; no parent run yet
    ".validate_storage_marker",  # parent run recorded, Tune's storage set up; no tuner.pkl
    "tuner.pkl",  # Tune started; no session state yet
    "experiment_state-*.json",  # Tune's first session: the experiment state, its searcher's maybe not yet
    "searcher-state-*.pkl",  # a complete session
)


@pytest.mark.slow(seconds=140)
def test_a_study_on_uri_storage_survives_kills_at_startup_instants_kill_9_and_ctrl_c(tmp_path):
    """On storage given as a URI (as for a cloud bucket), beside another study's folder, the same command:
    SIGKILL at each instant of the start-up (never more than one parent run); kill -9 right after a trial finished;
    Ctrl-C while a trial runs (exit 130, runs KILLED, the Optuna export written). The rerun resumes into the same
    parent run and ends with one FINISHED child run per configured trial; trials finished before a kill were not run
    again; the other study's folder is untouched. A failure after the parent run reopened ends it FAILED.
    (One test, not two: each driver starts its own Ray, and the kills share the study's later rounds.)"""
    from mlflow.tracking import MlflowClient

    from studies.check_resume_instants import first_match, folder_digest, run_and_signal

    data = tiny_study(tmp_path, **{"search.num_samples": 4, "storage": f"file://{tmp_path}/uri"})
    command = [sys.executable, str(SWEEP), "--config", str(_write(tmp_path, data))]
    folder, log, env, db = tmp_path / "uri" / "tiny", tmp_path / "rounds.log", _env(tmp_path), tmp_path / "mlflow.db"
    sibling = tmp_path / "uri" / "other_study"
    sibling.mkdir(parents=True)
    (sibling / "summary.json").write_text('{"best": 1}\n')
    sibling_before = folder_digest(sibling)

    for pattern in STARTUP_KILLS:
        killed = run_and_signal(command, folder, first_match(pattern), env, log, renewed=True)
        assert killed["signalled_at"] is not None, (pattern, log.read_text()[-3000:])
        assert len([r for r in _runs(db) if "mlflow.parentRunId" not in r.data.tags]) <= 1

    client = MlflowClient(f"sqlite:///{db}")
    first = subprocess.Popen(command, stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not _finished_children(db):
        time.sleep(0.05)
    assert first.poll() is None, log.read_text()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)  # kill -9 right after a trial finished
    first.wait()
    _wait_until_still(folder)  # Ray's workers outlive their driver briefly: a late checkpoint is not the next run's
    end_times = {run_id: client.get_run(run_id).info.end_time for run_id in _finished_children(db)}

    interrupted = run_and_signal(command, folder, first_match("*/checkpoint_*/trial_state.json"), env, log,
                                 sig=signal.SIGINT)  # Ctrl-C while a trial runs
    assert interrupted["exit_code"] == 130, log.read_text()[-3000:]
    parents = [r for r in _runs(db) if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parents] == ["KILLED"]
    assert not [r for r in _children(_runs(db)) if r.info.status == "RUNNING"]
    finished = [r for r in _children(_runs(db)) if r.info.status == "FINISHED"]
    _assert_optuna_holds_what_tune_finished(folder, finished)  # exported by the interrupted run too

    _assert_the_rerun_finishes_the_study(command, env, data, folder, db)
    for run in _children(_runs(db)):  # trials finished before the kill were not run again
        if run.info.run_id in end_times:
            assert client.get_run(run.info.run_id).info.end_time == end_times[run.info.run_id]
    assert (folder / "caspl_study.json").exists()  # the study state lives in the URI storage
    parent_id = next(run.info.run_id for run in _runs(db) if "mlflow.parentRunId" not in run.data.tags)
    # killed attempts' scratch folders: emptied by the trial's next attempt, or by the study at its end
    assert list(Path(tempfile.gettempdir()).glob(f"caspl-trial-{parent_id[:12]}-*")) == []

    (folder / "tuner.pkl").write_bytes(b"damaged")  # Tune cannot read its own state after the parent run reopened
    late = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert late.returncode == 1 and "Traceback" in late.stderr
    runs = _runs(db)
    assert [r.info.status for r in runs if "mlflow.parentRunId" not in r.data.tags] == ["FAILED"]
    assert {r.info.status for r in _children(runs)} == {"FINISHED"}
    assert folder_digest(sibling) == sibling_before


def _assert_the_rerun_finishes_the_study(command: list[str], env: dict, data: dict, folder: Path, db: Path) -> None:
    """The same command again resumes Tune's state and ends with one parent run, one FINISHED child run per
    configured trial, and the Optuna storage holding every finished trial."""
    from studies.check_resume_instants import check_outcome

    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout, rerun.stdout[-3000:]
    outcome = check_outcome(data, folder)
    assert all(outcome["checks"].values()), outcome
    _assert_optuna_holds_what_tune_finished(folder, _children(_runs(db)))


@pytest.mark.slow(seconds=60)
def test_a_trial_on_a_lost_node_resumes_on_the_other_from_its_last_epoch(tmp_path):
    """`studies/check_node_loss.py --smoke-test`: a two-node local cluster loses the node of a running trial."""
    done = subprocess.run([sys.executable, str(REPO / "studies" / "check_node_loss.py"), "--smoke-test",
                           "--work", str(tmp_path)], capture_output=True, text=True, env=_env(tmp_path), timeout=900)
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and reports and reports[0]["ok"], done.stdout[-3000:] + done.stderr[-3000:]
    first = reports[0]
    assert first["exit_code"] == 0 and first["trials"] == 2 and all(first["checks"].values())
    assert first["processes_left"] == 0  # both nodes stopped whole: no orphaned agent or dashboard process
    assert first["resumed_at_epoch"] == first["epochs_before_kill"] + 1


def test_a_nodes_ports_are_distinct_and_never_one_its_flags_already_name():
    """`ray start --port=P` with an agent port also P fails: the agents' free ports avoid the node's own flags'
    and are chosen together (a port released by one pick could come back from the next)."""
    from studies.check_node_loss import _agent_ports, free_ports

    for _ in range(100):
        (gcs,) = free_ports(1)  # released at once, as when the head's port is picked before its agents' ports
        agents = [int(flag.split("=")[1]) for flag in _agent_ports({gcs})]
        assert len(set(agents)) == 4 and gcs not in agents


@pytest.mark.slow(seconds=65)
def test_ray_job_submit_runs_the_smoke_test_of_the_embedded_default_on_a_running_head(tmp_path):
    """`ray_jobs/submit.py -- --smoke-test` on a running head: the embedded default's smoke test (ToyWorld models,
    built on first use; MLflow via mlflow.env and the environment) logs one parent and its trials, the runs explain
    themselves, the Optuna storage holds what Tune finished, and the job's console ends on the summary."""
    from studies.check_node_loss import free_ports, session_pids, start_node

    env = _env(tmp_path)
    gcs, dashboard = free_ports(2)
    # short: Ray's unix socket paths must stay < 108 bytes; `<RAY_TMPDIR>/ray`, where Ray looks for a running cluster
    temp_dir = str(Path(tempfile.mkdtemp(prefix="rj", dir="/tmp")) / "ray")
    head = start_node(["--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--num-cpus=2",
                       "--include-dashboard=true"], temp_dir, env)
    try:
        submit = subprocess.run(
            [sys.executable, str(REPO / "ray_jobs" / "submit.py"), "--address", f"http://127.0.0.1:{dashboard}",
             "--storage", str(tmp_path / "runs"), "--", "--smoke-test", "--name", "submitted"],
            capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        # without $RAY_ADDRESS a command starts a Ray of its own, even with this head found in Ray's temp folder
        local = subprocess.run([sys.executable, "-c", "import ray; from caspl.ray_env import ensure_ray; "
                                "ensure_ray(num_cpus=1); print(ray.get_runtime_context().gcs_address)"],
                               capture_output=True, text=True, env={**env, "RAY_TMPDIR": str(Path(temp_dir).parent)},
                               timeout=120)
        found = Path(temp_dir, "ray_current_cluster").read_text().strip()  # what Ray's own lookup would join
        assert found.endswith(f":{gcs}")
        assert local.returncode == 0 and local.stdout.strip() not in ("", found), local.stderr[-2000:]
    finally:
        head.kill()  # this head only: `ray stop` would also stop the Rays of other tests
    assert not session_pids(head.session)  # no orphan left (a leaked agent once burned 42.7 CPU s in 48 s)
    shutil.rmtree(Path(temp_dir).parent)  # the folder this test made for its head
    lines = submit.stdout.splitlines()
    assert re.fullmatch(r"Job \S+ succeeded", lines[-1]), lines[-5:]
    console = "\n".join(lines[1:-1])  # the job's own output, between submit.py's "submitted" and "succeeded" lines

    runs = _runs(tmp_path / "mlflow.db", "caspl")  # mlflow.env's experiment, the tracking URI from the environment
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["caspl.study"] == "submitted"
    parent = parents[0]
    assert parent.info.status == "FINISHED" and "best_test_hm" in parent.data.metrics
    children = _children(runs)
    assert len(children) == 2 and {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"val_hm", "test_hm", "adapt/loss", "adapt/val_acc", "boost/kd_loss"} <= set(child.data.metrics)
    study_folder = tmp_path / "runs" / "submitted"
    _assert_runs_explain_themselves(runs, parent, children)
    _assert_optuna_holds_what_tune_finished(study_folder, children)
    _assert_every_checkpoint_kept(study_folder)
    summary = json.loads((study_folder / "summary" / "summary.json").read_text())
    assert {"teacher_cache_seconds", "model_build_seconds"} <= set(summary)
    assert 0 < summary["trial_compute_cpu_seconds"] <= summary["trial_compute_seconds"] * 1.1  # one thread per trial
    assert 0 <= summary["trial_report_seconds"] < summary["trial_compute_seconds"]  # milliseconds per report
    assert set(summary["phase_seconds"]) == {"checks", "ray_start", "models", "teacher_cache", "open_parent_run",
                                             "tune"}  # report and ray_shutdown end after summary.json is written
    assert sum(summary["phase_seconds"].values()) <= summary["wall_seconds"] + summary["phase_seconds"]["checks"] \
        + summary["phase_seconds"]["ray_start"] + 1
    _assert_console_ends_on_the_summary(console, parent.info.experiment_id)


def _assert_every_checkpoint_kept(study_folder: Path) -> None:
    """One checkpoint per report (result.json's lines), numbered from 0 without a gap: Tune deleted none (a deletion
    raced the state snapshot that names the newer checkpoint; see `runner.checkpoint_config`)."""
    trials = [t for t in study_folder.iterdir() if t.is_dir() and (t / "params.json").exists()]
    assert trials
    for trial in trials:
        reports = len((trial / "result.json").read_text().splitlines())
        names = sorted(p.name for p in trial.glob("checkpoint_*"))
        assert reports >= 3 and names == [f"checkpoint_{i:06d}" for i in range(reports)], (trial, reports, names)


def _assert_runs_explain_themselves(runs, parent, children) -> None:
    """Every run: git commit, source and user tags, the data set as inputs; each trial run's parameters are the
    search-space names (no parameter under a second name); baselines are their own runs; the parent's description
    names the best child, which alone carries the best tag."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    space = set(load_study_config(yaml.safe_load((REPO / "studies/configs/study/toy_default.yaml").read_text()))
                .search.space)
    for run in runs:
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == commit.strip(), run.info.run_name
        assert tags["mlflow.source.name"] == "studies/boost_sweep.py" and tags["mlflow.user"]
        assert tags["caspl.git.dirty"] in ("true", "false")
        inputs = {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}
        assert {name for name, _ in inputs} == {"toy_faded/train", "toy_faded/val", "toy_faded/test"}, inputs
        assert all(len(digest) == 16 for _, digest in inputs)
    for child in children:
        params = set(child.data.params)
        assert params <= space | {"method", "seed"} and {"method", "seed"} <= params, params
    baselines = [r for r in runs if r.data.tags.get("caspl.role") == "baseline"]
    methods = {r.data.params["method"] for r in children}
    assert {r.data.params["method"] for r in baselines} == methods and len(baselines) == len(methods)
    assert all(r.info.status == "FINISHED" and "test_hm" in r.data.metrics for r in baselines)
    assert {r.data.tags["caspl.baseline_run_id"] for r in children} == {r.info.run_id for r in baselines}
    best = [r for r in children if r.data.tags.get("caspl.best") == "true"]
    assert len(best) == 1 and not any("caspl.best" in r.data.tags for r in baselines)
    description = parent.data.tags["mlflow.note.content"]
    assert f"Best child run: **{best[0].info.run_name}** (`{best[0].info.run_id}`" in description
    assert all(r.info.run_id in description for r in children)  # the summary table names every trial's run
    assert all(value == round(value, 2) for key, value in best[0].data.metrics.items() if key.startswith("test_"))


def _assert_optuna_holds_what_tune_finished(study_folder: Path, children) -> None:
    """`optuna.load_study` on the study's storage: one COMPLETE trial per finished Tune trial (`children`: their
    MLflow runs), with Tune's parameters and objective, linked to the Tune trial and its MLflow run."""
    import optuna

    run_of = {r.data.tags["caspl.trial_id"]: r.info.run_id for r in children}
    finished = {}
    for trial in study_folder.iterdir():  # trial folders; a killed run may leave some of trials Tune forgot
        if trial.name not in run_of:
            continue
        results = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()] \
            if (trial / "result.json").exists() else []
        if results and results[-1].get("finished"):
            config = json.loads((trial / "params.json").read_text())
            finished[trial.name] = ({k: v for k, v in config.items() if not k.startswith("__")},
                                    results[-1]["objective"])
    study = optuna.load_study(study_name=study_folder.name, storage=f"sqlite:///{study_folder}/optuna.db")
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == len(finished) == len(children)
    for trial in complete:
        tune_id = trial.user_attrs["tune_trial_id"]
        assert (trial.params, trial.value) == finished[tune_id]
        assert trial.user_attrs["mlflow_run_id"] == run_of[tune_id]


def _assert_console_ends_on_the_summary(console: str, experiment_id: str) -> None:
    lines = [line for line in console.splitlines() if line.strip()]
    url = f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    assert lines[-1] == f"[study] MLflow runs: {url}", lines[-12:]
    tail = lines[lines.index(next(line for line in lines if line.startswith("[study] FINISHED:"))):]
    assert all(line.startswith("[study]") for line in tail), tail  # nothing of Ray's after the summary
    assert any("optuna-dashboard sqlite:///" in line for line in tail) and any("best on the objective" in line
                                                                              for line in tail)
    assert any(line.split()[:6] == ["trial", "status", "method", "boost.depth", "boost.length",
                                    "boost.temperature"] for line in lines)  # the status table shows the search
    assert not [line for line in lines if "tensorboard" in line.lower()]
    assert not [line for line in lines if "core_worker.cc" in line and re.search(r"\bE\d{4}\b| ERROR ", line)]
    assert not [line for line in lines if re.search(r"\bERROR\b|\bE\d{4} \d\d:|Traceback", line)], lines
    assert not [line for line in lines if "Checkpoint successfully created" in line or "\x1b[" in line]


def test_trial_runs_get_their_final_status_and_unknown_trials_runs_are_deleted(tmp_path):
    from caspl.study.tracking import TrackingSettings, open_parent_run, settle_trial_runs, trial_run

    settings = TrackingSettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="orphans")
    parent = open_parent_run(settings, "orphans", "uid-1", {}, None)
    runs = {tid: trial_run(settings, parent, tid, f"trial {tid}", {}) for tid in ("a", "b", "c", "lost")}
    statuses = {"a": "FINISHED", "b": "FAILED", "c": "KILLED"}
    assert settle_trial_runs(settings, parent, statuses) == [runs["lost"]]
    children = _children(_runs(tmp_path / "mlflow.db", "orphans"))
    assert {r.data.tags["caspl.trial_id"]: r.info.status for r in children} == statuses
    assert settle_trial_runs(settings, parent, statuses) == []
    # a retried trial finds its run again and reopens it; a finished one stays finished
    assert trial_run(settings, parent, "b", "trial b", {}) == runs["b"]
    assert trial_run(settings, parent, "a", "trial a", {}) == runs["a"]
    status = {r.data.tags["caspl.trial_id"]: r.info.status for r in _children(_runs(tmp_path / "mlflow.db",
                                                                                     "orphans"))}
    assert status == {"a": "FINISHED", "b": "RUNNING", "c": "KILLED"}


def test_a_parent_run_created_but_not_recorded_is_found_again_by_the_study_uid(tmp_path):
    """A start killed between creating the parent run and writing its id into the study state: one parent run."""
    from caspl.study.tracking import TrackingSettings, close_open_runs, open_parent_run, trial_run

    settings = TrackingSettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="uid")
    first = open_parent_run(settings, "s", "uid-1", {}, None)
    assert open_parent_run(settings, "s", "uid-1", {}, None) == first  # no id recorded: found by the uid
    assert open_parent_run(settings, "s", "uid-2", {}, None) != first  # another start (--fresh): a new run
    child = trial_run(settings, first, "t", "trial t", {})
    close_open_runs(settings, first, "KILLED")  # what a failure or interrupt after the start does
    runs = {r.info.run_id: r.info.status for r in _runs(tmp_path / "mlflow.db", "uid")}
    assert runs[first] == runs[child] == "KILLED"


def test_signals_outside_tune_raise_and_inside_tune_are_noted_and_handed_to_its_graceful_stop():
    from caspl.study import signals

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(signals.Interrupted) as raised, signals.handled():
        os.kill(os.getpid(), signal.SIGTERM)  # outside Tuner.fit: the study stops here
        time.sleep(1)
    assert raised.value.exit_code == 143 and signal.getsignal(signal.SIGINT) is before
    tune_stops = []
    with signals.handled() as interrupts:
        signal.signal(signal.SIGINT, lambda signum, frame: tune_stops.append(signum))  # what Tune.fit installs
        signals.InterruptWatch().setup()  # Tune calls this inside fit, after installing its handler
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert interrupts.signum == signal.SIGINT and tune_stops == [signal.SIGINT]
        with pytest.raises(signals.Interrupted):  # a second signal does not wait for the graceful stop
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before


# --- the study folder: guarded deletes, Tune's sessions, atomic summaries ----------------------------------------


def _tune_session(folder: Path, session: str, trials: list[str], counter: int | None = None,
                  asked: list[str] | None = None, missing: tuple[str, ...] = ()) -> None:
    """Tune's three per-session state files, as Tune writes them (contents reduced to what is checked)."""
    import pickle

    from ray import cloudpickle

    files = {f"experiment_state-{session}.json": json.dumps(
                 {"trial_data": [[json.dumps({"trial_id": t}), "{}"] for t in trials]}).encode(),
             f"search_gen_state-{session}.json": cloudpickle.dumps({"counter": len(trials) if counter is None
                                                                    else counter}),
             f"searcher-state-{session}.pkl": pickle.dumps({"_ot_trials": {t: None for t in
                                                                           (trials if asked is None else asked)}})}
    for name, data in files.items():
        if not any(name.startswith(m) for m in missing):
            (folder / name).write_bytes(data)


@pytest.mark.parametrize("newest, restorable, kept", [
    ({}, True, "2"),  # complete: restored as it is
    ({"missing": ("searcher-state",)}, True, "1"),  # killed between Tune's files: the older session
    ({"missing": ("search_gen_state", "searcher-state")}, True, "1"),
    ({"counter": 3}, True, "1"),  # the generator counted a trial the experiment state does not hold
    ({"asked": ["a", "b", "c"]}, True, "1"),  # the searcher was asked for a trial Tune never recorded
])
def test_tune_state_is_restored_from_the_newest_complete_session(tmp_path, newest, restorable, kept):
    from caspl.study.storage import StudyFolder

    folder = StudyFolder(str(tmp_path), "s")
    root = tmp_path / "s"
    root.mkdir()
    (root / "caspl_study.json").write_text("{}")
    (root / "tuner.pkl").write_bytes(b"tuner")
    _tune_session(root, "1", ["a"])
    _tune_session(root, "2", ["a", "b"], **newest)
    assert folder.settle_tune_state(repeats=1) is restorable
    sessions = {p.name.split("-", 1)[1].split(".")[0].split("-")[-1] for p in root.glob("experiment_state-*")}
    assert max(sessions) == kept and (root / "caspl_study.json").exists()


def test_tune_files_without_a_complete_session_are_cleared_but_the_study_state_kept(tmp_path):
    from caspl.study.storage import StudyFolder

    root = tmp_path / "s"
    (root / "summary").mkdir(parents=True)
    (root / "caspl_study.json").write_text("{}")
    (root / "tuner.pkl").write_bytes(b"tuner")  # killed after tuner.pkl, before Tune's first state
    (root / ".validate_storage_marker").write_text("")
    (root / "0badc0de").mkdir()
    (root / ".tuner.pkl.abc.tmp").write_bytes(b"tun")  # a write a kill interrupted
    _tune_session(root, "1", ["a"], missing=("search_gen_state",))
    assert StudyFolder(str(tmp_path), "s").settle_tune_state(repeats=1) is False
    assert sorted(p.name for p in root.iterdir()) == ["caspl_study.json", "summary"]


def test_fresh_deletes_only_the_study_folder_and_a_half_deleted_one_is_finished(tmp_path):
    from caspl.study.storage import StudyFolder

    for name in ("mine", "other"):
        (tmp_path / name / "trial").mkdir(parents=True)
        (tmp_path / name / "trial" / "result.json").write_text(name)
        (tmp_path / name / "caspl_study.json").write_text("{}")
    (tmp_path / "mine" / "link").symlink_to(tmp_path / "other")  # a link inside is unlinked, never followed
    before = tree_digest(tmp_path / "other")
    assert StudyFolder(str(tmp_path), "mine").remove() is True
    assert not (tmp_path / "mine").exists() and tree_digest(tmp_path / "other") == before
    assert StudyFolder(str(tmp_path), "mine").remove() is False
    half = tmp_path / "half"  # a --fresh killed halfway: marked, some files gone, the marker last
    half.mkdir()
    (half / "caspl_study.json").write_text('{"deleting": true}')
    (half / "tuner.pkl").write_bytes(b"x")
    assert StudyFolder(str(tmp_path), "half").remove() is True and not half.exists()


def test_fresh_refuses_a_folder_that_is_not_a_study(tmp_path):
    from caspl.study.storage import StudyFolder

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(CasplError, match="holds files but no caspl_study.json"):
        StudyFolder(str(tmp_path), "photos").remove()
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"meow"


def test_summary_is_published_whole_into_the_study_folder(tmp_path):
    from caspl.study.storage import StudyFolder

    folder = StudyFolder(str(tmp_path / "storage"), "s")
    for run, files in enumerate((["summary.json", "old_plot.png"], ["summary.json"])):
        local = tmp_path / f"local{run}"
        local.mkdir()
        for name in files:
            (local / name).write_text(f"run {run}")
        published = Path(folder.publish(local))
    assert published == tmp_path / "storage" / "s" / "summary"
    assert sorted(p.name for p in published.iterdir()) == ["summary.json"]  # no stale plot of the first run
    assert (published / "summary.json").read_text() == "run 1"
    assert sorted(p.name for p in published.parent.iterdir()) == ["summary"]  # no temporary folders left


def test_files_written_through_the_atomic_filesystem_appear_whole(tmp_path):
    import pyarrow.fs as pafs

    from caspl.study.storage import atomic_local_filesystem

    fs = atomic_local_filesystem()
    stream = fs.open_output_stream(str(tmp_path / "state.json"))
    stream.write(b'{"half": ')
    assert not (tmp_path / "state.json").exists()  # nothing under the name while it is written
    stream.write(b"1}")
    stream.close()
    assert (tmp_path / "state.json").read_bytes() == b'{"half": 1}'
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_bytes(b"a" * 100000)
    fs.create_dir(str(tmp_path / "dst"))  # as Ray does before it uploads a folder
    pafs.copy_files(str(tmp_path / "src"), str(tmp_path / "dst"), destination_filesystem=fs)
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["a"] and (tmp_path / "dst" / "a").stat().st_size == 1e5


@pytest.mark.slow(seconds=25)
def test_a_study_over_two_datasets_searches_a_label_free_objective_and_reports_its_agreement(tmp_path, ray_local):
    """Each trial boosts and adapts on both datasets; the objective is the pseudo-novel HM of their averages (what
    Tune saw), test numbers are the HM of the averaged base and novel accuracies, and the summary reports how each
    objective ranks the trials by test HM."""
    from caspl.study.runner import run_study

    data = [{"dataset": "toy_shapes", "options": {"n_train": 4, "n_val": 2, "n_test": 2}},
            {"dataset": "toy_sketch", "options": {"n_train": 4, "n_val": 2, "n_test": 2}}]
    changes = {"data": data, "search.num_samples": 3, "methods": ["coop"], "baselines": False,
               "search.space": {"boost.length": {"type": "int", "low": 2, "high": 4},
                                "boost.depth": {"type": "int", "low": 1, "high": "max"}},
               "boost.optim": {"lr": 0.01, "epochs": 1, "batch_size": 16, "warmup_epochs": 0},
               "adapt.optim": {"lr": 0.01, "epochs": 1, "batch_size": 8, "warmup_epochs": 0}}
    summary = run_study(load_study_config(tiny_study(tmp_path, **changes)), REPO, log=lambda line: None)
    assert (summary["status"], summary["finished"]) == ("FINISHED", 3)
    assert summary["objective"] == "pseudo_novel" and set(summary["spearman_with_test_hm"]) == {"pseudo_hm", "val_hm"}
    children = [child.data.metrics for child in _children(_runs(tmp_path / "mlflow.db"))]
    for m in children:
        assert m["objective"] == m["pseudo_hm"]
        shown = {"abs": 0.011}  # MLflow holds final metrics rounded to 2 decimals
        assert m["test_base"] == pytest.approx((m["toy_shapes/test_base"] + m["toy_sketch/test_base"]) / 2, **shown)
        assert m["test_hm"] == pytest.approx(2 * m["test_base"] * m["test_novel"] / (m["test_base"] + m["test_novel"]),
                                             **shown)
        assert {"toy_shapes/boost/kd_loss", "toy_sketch/adapt/loss"} <= set(m)
    assert any("toy_sketch/adapt/objective_hm" in m for m in children)  # per epoch where it trained (not reused)
    parent = [r for r in _runs(tmp_path / "mlflow.db") if "mlflow.parentRunId" not in r.data.tags][0]
    assert {"spearman_pseudo_hm_vs_test_hm", "spearman_val_hm_vs_test_hm"} & set(parent.data.metrics)
    assert "Spearman(pseudo_hm, test HM)" in (tmp_path / "runs" / "tiny" / "summary" / "summary.md").read_text()


@pytest.mark.slow(seconds=11)
def test_an_errored_trial_fails_its_run_the_study_and_the_exit_code(tmp_path, ray_local):
    """A trial that raises (boosting batches larger than the data, found only when the trial loads its images):
    its run FAILED, the parent FAILED, exit code 1 with the count; the summary says so."""
    from caspl.study.runner import run_study

    changes = {"search.num_samples": 1, "methods": ["coop"], "resources": {"trial_cpus": 0.5, "max_failures": 0},
               "boost.optim": {"lr": 0.01, "epochs": 2, "batch_size": 4096, "warmup_epochs": 1}}
    summary = run_study(load_study_config(tiny_study(tmp_path, **changes)), REPO, log=lambda line: None)
    assert (summary["status"], summary["exit_code"], summary["errored"]) == ("FAILED", 1, 1)
    assert "only 0 of the 1 configured trials finished (1 errored)" in summary["message"]
    runs = _runs(tmp_path / "mlflow.db")
    assert [r.info.status for r in runs if "mlflow.parentRunId" not in r.data.tags] == ["FAILED"]
    assert [r.info.status for r in _children(runs)] == ["FAILED"]
    published = json.loads((tmp_path / "runs" / "tiny" / "summary" / "summary.json").read_text())
    assert published["status"] == "FAILED" and published["expected_trials"] == 1

"""MLflow env files: dotenv syntax is read as written, and only MLflow's own keys ever reach the environment."""

import os

import pytest

from caspl.errors import ConfigError
from caspl.study.tracking import tracking_settings

MLFLOW_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_USERNAME", "MLFLOW_HTTP_TIMEOUT")
FOREIGN_KEYS = ("PYTHONPATH", "RAY_ADDRESS", "CASPL_CACHE", "LD_PRELOAD")


@pytest.fixture
def clean_environ():
    """os.environ without the keys under test, restored exactly afterwards (tracking_settings writes into it)."""
    saved = dict(os.environ)
    for key in MLFLOW_KEYS + FOREIGN_KEYS:
        os.environ.pop(key, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _env_file(tmp_path, text):
    path = tmp_path / "mlflow.env"
    path.write_text(text)
    return path


@pytest.mark.parametrize("line, experiment", [
    ("MLFLOW_EXPERIMENT_NAME=plain", "plain"),
    ("export MLFLOW_EXPERIMENT_NAME=exported", "exported"),
    ("MLFLOW_EXPERIMENT_NAME=commented  # the team's experiment", "commented"),
    ("export MLFLOW_EXPERIMENT_NAME=both # exported and commented", "both"),
    ('MLFLOW_EXPERIMENT_NAME="a # inside quotes"  # outside', "a # inside quotes"),
    ("MLFLOW_EXPERIMENT_NAME='single quoted'", "single quoted"),
    ("  MLFLOW_EXPERIMENT_NAME = spaced  ", "spaced"),
], ids=["plain", "export", "comment", "export+comment", "quoted-hash", "single-quotes", "spaces"])
def test_env_file_syntax(tmp_path, clean_environ, line, experiment):
    path = _env_file(tmp_path, f"# tracking for caspl\n\nexport MLFLOW_TRACKING_URI=sqlite:///runs/mlflow.db  # db\n"
                               f"{line}\n")
    before = dict(os.environ)
    settings = tracking_settings(path)
    assert settings.experiment == experiment
    # a relative SQLite path is taken relative to the env file, not the current directory
    assert settings.tracking_uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert dict(os.environ) == before  # the URI and experiment go into the settings, not into the environment


def test_only_mlflow_keys_reach_the_environment(tmp_path, clean_environ):
    path = _env_file(tmp_path, "\n".join([
        "export PYTHONPATH=/somewhere/else",
        "RAY_ADDRESS=ray://10.0.0.1:10001  # a cluster",
        "CASPL_CACHE=/tmp/elsewhere",
        "LD_PRELOAD=/tmp/evil.so",
        "MLFLOW_EXPERIMENT_NAME=study",
        "export MLFLOW_TRACKING_USERNAME=alice  # credentials for a tracking server",
        "MLFLOW_HTTP_TIMEOUT=30",
    ]) + "\n")
    before = dict(os.environ)
    lines = []
    settings = tracking_settings(path, log=lines.append)
    assert settings.experiment == "study"
    assert all(key not in os.environ for key in FOREIGN_KEYS)
    added = {k: v for k, v in os.environ.items() if k not in before}
    assert added == {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_HTTP_TIMEOUT": "30"}
    assert lines == ["[study] mlflow.env: ignoring non-MLflow keys CASPL_CACHE, LD_PRELOAD, PYTHONPATH, RAY_ADDRESS"]


def test_environment_wins_over_the_file(tmp_path, clean_environ):
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "from-env"
    os.environ["MLFLOW_HTTP_TIMEOUT"] = "5"
    path = _env_file(tmp_path, "MLFLOW_EXPERIMENT_NAME=from-file\nMLFLOW_HTTP_TIMEOUT=30\n")
    assert tracking_settings(path).experiment == "from-env"
    assert os.environ["MLFLOW_HTTP_TIMEOUT"] == "5"
    assert tracking_settings(path, experiment="explicit").experiment == "explicit"


@pytest.mark.parametrize("text, message", [
    ("MLFLOW_EXPERIMENT_NAME\n", "has no '='; write KEY=VALUE"),
    (None, "does not exist; create it or set tracking.env_file"),
], ids=["no-equals", "missing-file"])
def test_bad_env_file_is_one_line(tmp_path, clean_environ, text, message):
    path = _env_file(tmp_path, text) if text is not None else tmp_path / "absent.env"
    before = dict(os.environ)
    with pytest.raises(ConfigError, match=message) as caught:
        tracking_settings(path)
    assert "\n" not in str(caught.value) and str(path.name) in str(caught.value)
    assert dict(os.environ) == before

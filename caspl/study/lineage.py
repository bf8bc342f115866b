"""What a study's MLflow runs say about where they came from: the code (git commit, branch, dirty flag), the
script, the user, and the data set each run read.

Runs are created with `MlflowClient.create_run`, which sets none of the tags MLflow's fluent API sets; these
functions compute the same tags once, in the driver, and every run (parent, trials, baselines) gets them.
A job submitted with `ray job submit --working-dir .` runs in a copy of the repository without `.git`: there the
submitting machine's values arrive as `CASPL_GIT_*` environment variables (see `ray_jobs/submit.py`).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

GIT_COMMIT = "mlflow.source.git.commit"
GIT_BRANCH = "mlflow.source.git.branch"
GIT_REPO_URL = "mlflow.source.git.repoURL"
GIT_DIRTY = "caspl.git.dirty"  # MLflow has no tag of its own for uncommitted changes
SOURCE_NAME = "mlflow.source.name"
SOURCE_TYPE = "mlflow.source.type"
USER = "mlflow.user"
ENV_PREFIX = "CASPL_GIT_"  # CASPL_GIT_COMMIT, CASPL_GIT_BRANCH, CASPL_GIT_DIRTY, CASPL_GIT_REPO_URL
DATA_CONTEXT = "mlflow.data.context"


def _git(repo: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(repo), *args], capture_output=True,
                              text=True, timeout=20)  # no optional locks: `status` must not rewrite the index
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(repo: Path) -> dict[str, str]:
    """{commit, branch, dirty, repo_url} of the repository holding `repo` (values absent when unknown); the
    `CASPL_GIT_*` environment variables when `repo` is no git checkout (a submitted job's copy)."""
    commit = _git(repo, "rev-parse", "HEAD")
    if commit is None:
        names = {"commit": "COMMIT", "branch": "BRANCH", "dirty": "DIRTY", "repo_url": "REPO_URL"}
        return {key: os.environ[ENV_PREFIX + name] for key, name in names.items() if os.environ.get(ENV_PREFIX + name)}
    state = {"commit": commit}
    branch = _git(repo, "rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        state["branch"] = branch
    changes = _git(repo, "status", "--porcelain", "--untracked-files=no")
    if changes is not None:
        state["dirty"] = "true" if changes else "false"
    url = _git(repo, "remote", "get-url", "origin")
    if url:
        state["repo_url"] = url
    return state


def git_env(repo: Path) -> dict[str, str]:
    """`git_state` as the `CASPL_GIT_*` environment variables a submitted job reads."""
    return {ENV_PREFIX + key.upper(): value for key, value in git_state(repo).items()}


def source_tags(repo: Path, script: str | None = None) -> dict[str, str]:
    """The tags MLflow's fluent API would set on a run started by `script` (default: this process's script) from
    the checkout `repo`, plus the dirty flag."""
    git = git_state(repo)
    names = {"commit": GIT_COMMIT, "branch": GIT_BRANCH, "repo_url": GIT_REPO_URL, "dirty": GIT_DIRTY}
    tags = {names[key]: value for key, value in git.items()}
    script = script or (sys.argv[0] if sys.argv and sys.argv[0] else "python")
    tags[SOURCE_NAME] = _relative(Path(script).resolve(), repo) if script not in ("-c", "-m") else script
    tags[SOURCE_TYPE] = "LOCAL"
    try:
        tags[USER] = getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry
        pass
    return tags


def _relative(path: Path, repo: Path) -> str:
    try:
        return str(path.relative_to(repo.resolve()))
    except ValueError:
        return str(path)


# --- the data set as a run input ----------------------------------------------------------------------------------
def split_digest(root: str, items) -> str:
    """A short digest of one split: the sorted (path relative to the data set's root, label) pairs. It changes when
    an image is added, removed, moved or relabelled; it does not read the images."""
    digest = hashlib.sha256()
    for path, label in sorted((os.path.relpath(item.path, root), item.label) for item in items):
        digest.update(f"{path}\t{label}\n".encode())
    return digest.hexdigest()[:16]


def dataset_specs(dataset, splits: dict[str, str]) -> list[dict]:
    """What the runs read of `dataset` (a caspl Dataset): one entry per split, e.g. {"train": "train"} (split: its
    use), as plain data (it travels to the trials): name `<data set>/<split>`, the split's digest, the folder."""
    return [{"name": f"{dataset.name}/{split}", "digest": split_digest(dataset.root, getattr(dataset, split)),
             "source": dataset.root, "context": context} for split, context in splits.items()]


def dataset_inputs(specs: list[dict]) -> list:
    """MLflow `DatasetInput`s of `dataset_specs` entries (what `mlflow.data` logs for a dataset: name, digest,
    source type and source), each tagged with its context."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for spec in specs:
        scheme = spec["source"].split("://", 1)[0] if "://" in spec["source"] else "local"
        dataset = Dataset(name=spec["name"], digest=spec["digest"], source_type=scheme,
                          source=json.dumps({"uri": spec["source"]}))
        inputs.append(DatasetInput(dataset, tags=[InputTag(DATA_CONTEXT, spec["context"])]))
    return inputs

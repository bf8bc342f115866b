"""Where a study keeps its files: `<storage>/<name>/` and nowhere else, on a local disk or any URI Tune accepts.

`StudyFolder` is the only way the study touches its storage. Its path is checked before Ray starts: the name is a
safe identifier, so the folder is a direct child of the storage folder; on a local disk it must not be a symbolic
link, and a folder that holds files but no `caspl_study.json` belongs to someone else and is never written or
deleted. `--fresh` deletes that folder only, marker last, so a kill halfway leaves a folder the next run still
recognises (and finishes deleting).

Atomic files: every file the study, Tune and the trials write into a local storage goes through
`AtomicLocalFileSystem` (temporary name, then a rename), so a kill at any instant leaves each file whole or absent.
On URI storage (s3://, gs://) an object appears whole when its upload ends. `settle_tune_state` then decides whether
Tune's files form a state that `Tuner.restore` continues from: the newest session whose experiment state, search
generator state and searcher state are all present and agree; newer, partial sessions are removed, and with no
complete session Tune's files are cleared so the study starts Tune afresh under the same parent run.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow
import pyarrow.fs as pafs

from caspl.errors import ConfigError

STATE_FILE = "caspl_study.json"
SUMMARY_DIR = "summary"
OPTUNA_FILE = "optuna.db"  # the study's Optuna trials (SQLite), rewritten whole at the end of every run
OWN_ENTRIES = (STATE_FILE, SUMMARY_DIR, OPTUNA_FILE)  # what survives clearing Tune's files
TUNER_FILE = "tuner.pkl"
SESSION_FILES = ("experiment_state-{}.json", "search_gen_state-{}.json", "searcher-state-{}.pkl")
_SESSION = re.compile(r"^experiment_state-(.+)\.json$")


class _AtomicFile:
    """A binary writer that becomes visible under its name only when closed (temporary file + rename)."""

    def __init__(self, path: str):
        self.path = path
        folder, name = os.path.split(path)
        self.tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
        self.file = open(self.tmp, "wb")
        self.closed = False

    def write(self, data) -> int:
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def tell(self) -> int:
        return self.file.tell()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False


class AtomicLocalFileSystem(pafs.FileSystemHandler):
    """pyarrow's local filesystem, except that files are written atomically and deletes never follow links.

    Used as Tune's `storage_filesystem` for local storage (picklable: trials on other nodes of the same machine or
    a shared mount write their checkpoints through it too). Wrap it: `pafs.PyFileSystem(AtomicLocalFileSystem())`.
    """

    def __init__(self):
        self.local = pafs.LocalFileSystem()

    def __eq__(self, other) -> bool:
        return isinstance(other, AtomicLocalFileSystem)

    def __ne__(self, other) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "caspl-atomic-local"

    def normalize_path(self, path):
        return self.local.normalize_path(path)

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        _remove_local(path)  # a link is unlinked, never followed

    def delete_dir_contents(self, path, missing_dir_ok=False):
        if not os.path.isdir(path):
            if missing_dir_ok:
                return
            raise FileNotFoundError(path)
        for entry in os.scandir(path):
            _remove_local(entry.path)

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the contents of the filesystem root")

    def delete_file(self, path):
        os.unlink(path)

    def move(self, src, dest):
        os.replace(src, dest)

    def copy_file(self, src, dest):
        with self.local.open_input_stream(src) as source, self.open_output_stream(dest, None) as target:
            target.write(source.read())

    def open_input_stream(self, path):
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        return self.local.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return pyarrow.PythonFile(_AtomicFile(path), mode="w")

    def open_append_stream(self, path, metadata):
        return self.local.open_append_stream(path)


def _remove_local(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def atomic_local_filesystem() -> pafs.FileSystem:
    return pafs.PyFileSystem(AtomicLocalFileSystem())


def normalise_storage(storage: str) -> str:
    """An absolute local path (for paths and file:// URIs) or the URI itself (s3://, gs://, ...)."""
    if storage.startswith("file://"):
        storage = storage[len("file://"):]
    if "://" in storage:
        return storage.rstrip("/")
    return str(Path(storage).expanduser().resolve())


@dataclass(frozen=True)
class StudyFolder:
    """`<storage>/<name>`: the study's own folder (Tune's experiment folder, the study state, the summary)."""

    storage: str  # from `normalise_storage`
    name: str

    @property
    def is_local(self) -> bool:
        return "://" not in self.storage

    @property
    def path(self) -> str:
        return f"{self.storage}/{self.name}"

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        """(filesystem, the folder's path in it): Tune's `storage_filesystem` and ours."""
        if self.is_local:
            return atomic_local_filesystem(), self.path
        fs, path = pafs.FileSystem.from_uri(self.path)
        return fs, path

    def tune_storage(self) -> tuple[str, pafs.FileSystem]:
        """(storage path, filesystem) for Tune's `RunConfig(storage_path=..., storage_filesystem=...)`."""
        fs, path = self.filesystem()
        return path.rsplit("/", 1)[0], fs

    # --- checks (before Ray) ------------------------------------------------------------------------------------
    def check(self, forbidden: dict[str, Path]) -> None:
        """ConfigError unless the study can own its folder: local storage is (or can be) a writable folder, the
        study folder is a real folder (not a link or a file) that holds a study or nothing, and it neither contains
        nor lies inside any of `forbidden` ({what: path}, e.g. the artefact store, the tracking database)."""
        if not self.is_local:
            return
        storage, folder = Path(self.storage), Path(self.path)
        if storage.exists() and not storage.is_dir():
            raise ConfigError(f"storage {storage} is a file, not a folder; point storage at a folder")
        self.check_ours()
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"study folder {folder} is a file; remove it or choose another name")
        if folder.resolve().parent != storage.resolve():
            raise ConfigError(f"study folder {folder} resolves outside storage {storage}")
        for what, path in forbidden.items():
            path = path.resolve()
            if path == folder or folder in path.parents:
                raise ConfigError(f"the {what} {path} lies inside study folder {folder}, which --fresh deletes; "
                                  "choose another storage or name")
        store = forbidden.get("artefact store")
        if store is not None and store.resolve() in folder.parents:
            raise ConfigError(f"study folder {folder} lies inside the artefact store {store.resolve()}; choose a "
                              "storage outside it")
        probe_writable(storage, "storage")

    def check_ours(self) -> None:
        """ConfigError when the folder is a link (on a local disk) or holds files but no study state: then it
        belongs to something else, and the study neither writes into it nor deletes it."""
        if self.is_local and Path(self.path).is_symlink():
            raise ConfigError(f"study folder {self.path} is a symbolic link; a study writes only into its own folder "
                              "(remove the link or choose another name)")
        fs, path = self.filesystem()
        entries = [e for e in _list(fs, path) if not _leftover(e)]
        if entries and STATE_FILE not in entries:
            raise ConfigError(f"{self.path} holds files but no {STATE_FILE}: it is not a caspl study, so the study "
                              "neither writes into it nor deletes it; choose another name or storage")

    # --- the study state ---------------------------------------------------------------------------------------
    def read_state(self) -> dict:
        fs, path = self.filesystem()
        file = f"{path}/{STATE_FILE}"
        if fs.get_file_info(file).type == pafs.FileType.NotFound:
            return {}
        with fs.open_input_stream(file) as stream:
            try:
                return json.loads(stream.read().decode())
            except (ValueError, UnicodeDecodeError):
                raise ConfigError(f"{file} is damaged (not JSON); delete the study with --fresh") from None

    def write_state(self, state: dict) -> None:
        fs, path = self.filesystem()
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path}/{STATE_FILE}") as stream:  # whole or absent (see the module docstring)
            stream.write(json.dumps(state, indent=1).encode())

    # --- deletion (--fresh) ------------------------------------------------------------------------------------
    def remove(self) -> bool:
        """Delete the study folder (False when there is none). The state is marked `deleting` first and removed
        last, so a kill halfway leaves a folder that the next run recognises and finishes deleting."""
        self.check_ours()
        fs, path = self.filesystem()
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return False
        self.write_state({**self.read_state(), "deleting": True})
        for entry in _list(fs, path):
            if entry != STATE_FILE:
                _delete(fs, f"{path}/{entry}")
        fs.delete_file(f"{path}/{STATE_FILE}")
        fs.delete_dir(path)
        return True

    # --- Tune's files ------------------------------------------------------------------------------------------
    def settle_tune_state(self, repeats: int) -> bool:
        """True when Tune's files form a state to restore (after removing newer, partial sessions); otherwise
        clear Tune's files (the study state and summary stay) and return False."""
        fs, path = self.filesystem()
        for entry in _list(fs, path):
            if _leftover(entry):
                _delete(fs, f"{path}/{entry}", missing_ok=True)
        entries = _list(fs, path)
        sessions = sorted((m.group(1) for m in map(_SESSION.match, entries) if m), reverse=True)
        if TUNER_FILE in entries:
            for newer, session in enumerate(sessions):
                if _complete_session(fs, path, session, repeats):
                    for stale in sessions[:newer]:
                        for template in SESSION_FILES:
                            _delete(fs, f"{path}/{template.format(stale)}", missing_ok=True)
                    return True
        for entry in entries:
            if entry not in OWN_ENTRIES:
                _delete(fs, f"{path}/{entry}")
        return False

    def publish_file(self, local_file: Path, name: str) -> str:
        """Copy `local_file` to `<folder>/<name>`, whole (a temporary name, then a rename, on a local disk)."""
        fs, path = self.filesystem()
        target = f"{path}/{name}"
        fs.create_dir(path, recursive=True)
        with open(local_file, "rb") as source, fs.open_output_stream(target) as stream:
            shutil.copyfileobj(source, stream, 1 << 20)
        return target

    # --- the summary -------------------------------------------------------------------------------------------
    def publish(self, local_folder: Path) -> str:
        """Copy `local_folder` to `<folder>/summary` as a whole: written under a temporary name, then swapped in.
        (Object stores cannot rename folders: there each file is replaced whole, and stale files are removed.)"""
        fs, path = self.filesystem()
        final = f"{path}/{SUMMARY_DIR}"
        if not self.is_local:
            fresh = {p.name for p in local_folder.iterdir()}
            for stale in set(_list(fs, final)) - fresh:
                _delete(fs, f"{final}/{stale}", missing_ok=True)
            fs.create_dir(final, recursive=True)
            pafs.copy_files(str(local_folder), final, destination_filesystem=fs)
            return final
        tmp = f"{path}/.{SUMMARY_DIR}.{time.time_ns()}.tmp"
        fs.create_dir(tmp, recursive=True)
        pafs.copy_files(str(local_folder), tmp, destination_filesystem=fs)
        if fs.get_file_info(final).type != pafs.FileType.NotFound:
            old = f"{path}/.{SUMMARY_DIR}.{time.time_ns()}.old"
            fs.move(final, old)
            fs.move(tmp, final)
            fs.delete_dir(old)
        else:
            fs.move(tmp, final)
        return final


def _complete_session(fs: pafs.FileSystem, path: str, session: str, repeats: int) -> bool:
    """Whether a Tune session's three state files are present, readable and agree on the trials."""
    from ray import cloudpickle

    try:
        experiment, generator, searcher = (_read(fs, f"{path}/{t.format(session)}") for t in SESSION_FILES)
        trial_ids = {json.loads(trial[0])["trial_id"] for trial in json.loads(experiment)["trial_data"]}
        counter = cloudpickle.loads(generator)["counter"]
        asked = pickle.loads(searcher).get("_ot_trials", {})
    except (OSError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError):
        return False
    groups = -(-len(trial_ids) // repeats)  # Tune's Repeater asks the searcher once per group of `repeats`
    return counter == len(trial_ids) and set(asked) <= trial_ids and len(asked) == groups


def probe_writable(folder: Path, what: str) -> None:
    """ConfigError unless a file can be created in `folder` (created if missing). Writing, not `os.access`: root
    passes every mode check but still fails on a read-only mount or a path under a file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".caspl-write-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {folder} is not a writable folder ({exc.strerror or exc}); fix the path or its "
                          "permissions") from None


def _leftover(name: str) -> bool:
    """A temporary file or folder of a write that a kill interrupted (see `_AtomicFile`, `publish`)."""
    return name.startswith(".") and name.endswith((".tmp", ".old"))


def _list(fs: pafs.FileSystem, path: str) -> list[str]:
    """Names in folder `path`; none when it is missing or not a folder."""
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(path)))


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()


def _delete(fs: pafs.FileSystem, path: str, missing_ok: bool = False) -> None:
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind != pafs.FileType.NotFound:
        fs.delete_file(path)
    elif not missing_ok:
        raise FileNotFoundError(path)

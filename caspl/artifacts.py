"""Content-addressed artefact store.

Every expensive artefact (pretrained ToyWorld models, few-shot splits, teacher features and logits, boosting
prompts) lives in a folder named by the hash of everything that determines it:

    <root>/<kind>/<key>/
        MANIFEST.json      {"key": ..., "meta": {...}, "files": {"name": {"sha256": ..., "bytes": ...}}}
        <files...>

A build writes into a temporary sibling folder and renames it into place (atomic on one filesystem, see
`atomic_folder`); a lock file serialises concurrent builders of the same key so the work is done once. A read checks
every file against the manifest; a folder that fails the check, or has no manifest at all (a damaged build), is moved
aside with one line saying so and rebuilt, never trusted because it exists. Inside `read_only()` the store changes
nothing: a damaged folder reads as missing and a build raises `WouldBuildError` (what `caspl cache --inspect` uses).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterator

MANIFEST = "MANIFEST.json"
_READ_ONLY: ContextVar[bool] = ContextVar("caspl_store_read_only", default=False)


class CorruptArtifactError(RuntimeError):
    """An artefact folder whose files do not match its manifest."""


class WouldBuildError(RuntimeError):
    """Inside `read_only()`, an artefact that is missing (or damaged) and would have to be built."""

    def __init__(self, kind: str, key: str, folder: Path):
        self.kind, self.key, self.folder = kind, key, folder
        super().__init__(f"{kind}/{key} is not built yet (read-only: nothing is built)")


@contextmanager
def read_only() -> Iterator[None]:
    """Within this block (this thread or task) no store moves, builds or deletes anything; see `WouldBuildError`."""
    token = _READ_ONLY.set(True)
    try:
        yield
    finally:
        _READ_ONLY.reset(token)


def is_read_only() -> bool:
    return _READ_ONLY.get()


def default_cache_root() -> Path:
    """`$CASPL_CACHE`, else `~/.cache/caspl`."""
    return Path(os.environ.get("CASPL_CACHE", Path.home() / ".cache" / "caspl")).expanduser().resolve()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_jsonable)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot hash object of type {type(obj).__name__}")


def content_key(*parts: Any, length: int = 20) -> str:
    """A short, stable hex key for JSON-able parts (dicts are order-insensitive)."""
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()[:length]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, key: str, meta: dict | None = None) -> dict:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            rel = path.relative_to(folder).as_posix()
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"key": key, "meta": meta or {}, "files": files, "created": time.time()}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify_folder(folder: Path, key: str | None = None) -> dict:
    """Check every file of `folder` against its manifest; return the manifest or raise CorruptArtifactError."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CorruptArtifactError(f"{folder}: no {MANIFEST} (an interrupted or damaged build)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptArtifactError(f"{manifest_path}: unreadable manifest ({_one_line(exc)})") from None
    if not _manifest_is_well_formed(manifest):
        raise CorruptArtifactError(f"{manifest_path}: not a manifest (needs key and files with sha256 and bytes)")
    if key is not None and manifest["key"] != key:
        raise CorruptArtifactError(f"{folder}: manifest key {manifest['key']!r} != expected {key!r}")
    for rel, info in manifest["files"].items():
        path = folder / rel
        try:
            intact = path.is_file() and path.stat().st_size == info["bytes"] and sha256_file(path) == info["sha256"]
        except OSError as exc:  # e.g. another process moved a damaged folder aside while this one read it
            raise CorruptArtifactError(f"{path}: unreadable ({_one_line(exc)})") from None
        if not intact:
            raise CorruptArtifactError(f"{path}: checksum mismatch with {manifest_path}")
    return manifest


def _manifest_is_well_formed(manifest: Any) -> bool:
    if not isinstance(manifest, dict) or not isinstance(manifest.get("key"), str):
        return False
    files = manifest.get("files")
    return isinstance(files, dict) and all(
        isinstance(info, dict) and isinstance(info.get("sha256"), str) and isinstance(info.get("bytes"), int)
        for info in files.values())


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _verifies(folder: Path, key: str) -> bool:
    try:
        verify_folder(folder, key)
    except CorruptArtifactError:
        return False
    return True


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextmanager
def atomic_folder(target: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `target`; when the block succeeds it becomes `target` in one rename.

    `replace=True` swaps out an existing `target` (moved aside, then deleted); otherwise an existing `target` is an
    error. When the block fails the temporary folder is deleted and `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.build."))
    try:
        yield tmp
        if replace and target.exists():
            old = target.with_name(f".{target.name}.old.{time.time_ns()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class ArtifactStore:
    """Folders keyed by content under `root/<kind>/<key>`; see the module docstring."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser().resolve() if root is not None else default_cache_root()

    def folder(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def get(self, kind: str, key: str) -> Path | None:
        """The verified folder for (kind, key), or None when absent; a damaged folder is moved aside (one line).

        Inside `read_only()` a damaged folder is reported as None and left where it is.
        """
        folder = self.folder(kind, key)
        if _verifies(folder, key):
            return folder
        if not folder.exists() or is_read_only():
            return None
        with self._lock(kind, key):  # another process may be replacing it right now: decide under the lock
            return self._verified_or_quarantined(kind, key)

    def status(self, kind: str, key: str) -> str:
        """"complete", "damaged" or "absent", read-only: nothing is moved, built or deleted."""
        folder = self.folder(kind, key)
        if not folder.exists():
            return "absent"
        try:
            verify_folder(folder, key)
        except CorruptArtifactError:
            return "damaged"
        return "complete"

    def get_or_build(
        self,
        kind: str,
        key: str,
        build: Callable[[Path], dict | None],
        *,
        log: Callable[[str], None] | None = print,
    ) -> Path:
        """Return the folder for (kind, key), building it with `build(tmp_folder) -> meta` if needed.

        Concurrent builders of one key (threads or processes) build it once: the others wait on its lock file and
        then read the result.
        """
        folder = self.folder(kind, key)
        if _verifies(folder, key):
            return folder
        if is_read_only():
            raise WouldBuildError(kind, key, folder)
        with self._lock(kind, key):
            if (found := self._verified_or_quarantined(kind, key)) is not None:
                return found  # built by another process while we waited
            with atomic_folder(folder) as tmp:
                meta = build(tmp) or {}
                write_manifest(tmp, key, meta)
        if log:
            log(f"[caspl] built {kind}/{key} -> {folder}")
        return folder

    def _lock(self, kind: str, key: str):
        return file_lock(self.root / kind / f".{key}.lock")

    def _verified_or_quarantined(self, kind: str, key: str) -> Path | None:
        """Under the key's lock: the folder if it verifies, else None (a damaged folder is moved aside first)."""
        folder = self.folder(kind, key)
        if not folder.exists():
            return None
        try:
            verify_folder(folder, key)
        except CorruptArtifactError as exc:
            self._quarantine(folder, str(exc))
            return None
        return folder

    def _quarantine(self, folder: Path, reason: str) -> None:
        target = folder.with_name(f".{folder.name}.corrupt.{time.time_ns()}")
        try:
            os.rename(folder, target)
        except FileNotFoundError:  # moved by a process that does not take the lock (an older caspl)
            return
        print(f"[caspl] warning: {reason}; moved {folder.name} aside to {target.name}, to be rebuilt")

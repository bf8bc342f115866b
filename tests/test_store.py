"""The artefact store heals: a damaged folder is moved aside with one line and rebuilt, once, whoever asks."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caspl.artifacts import MANIFEST, ArtifactStore, WouldBuildError, read_only, verify_folder

ROOT = Path(__file__).resolve().parents[1]
KIND, KEY = "things", "k1"


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and folder under `root` (hidden ones included) -> sha256 of its bytes ("dir" for folders)."""
    return {p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def _build_into(folder: Path, calls: list | None = None) -> dict:
    if calls is not None:
        calls.append(folder)
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 4)
    (folder / "sub").mkdir()
    (folder / "sub" / "info.json").write_text('{"answer": 42}')
    return {"what": "test"}


def _damage_manifest(text: str):
    def damage(folder: Path) -> None:
        (folder / MANIFEST).write_text(text)
    return damage


def _truncate_manifest(folder: Path) -> None:
    data = (folder / MANIFEST).read_bytes()
    (folder / MANIFEST).write_bytes(data[: len(data) // 2])


def _wrong_key(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "key": "some-other-key"}))


def _flip_a_byte(folder: Path) -> None:  # same size, other content: only the checksum catches it
    data = bytearray((folder / "weights.bin").read_bytes())
    data[100] ^= 0xFF
    (folder / "weights.bin").write_bytes(bytes(data))


DAMAGES = {
    "no-manifest": (lambda folder: (folder / MANIFEST).unlink(), "no MANIFEST.json"),
    "truncated-json": (_truncate_manifest, "unreadable manifest"),
    "not-json": (_damage_manifest("\x00\x01 garbage"), "unreadable manifest"),
    "json-list": (_damage_manifest("[1, 2, 3]"), "not a manifest"),
    "no-files-entry": (_damage_manifest(json.dumps({"key": KEY})), "not a manifest"),
    "wrong-key": (_wrong_key, "manifest key 'some-other-key' != expected 'k1'"),
    "checksum": (_flip_a_byte, "checksum mismatch"),
    "missing-file": (lambda folder: (folder / "sub" / "info.json").unlink(), "checksum mismatch"),
    "truncated-file": (lambda folder: (folder / "weights.bin").write_bytes(b"short"), "checksum mismatch"),
}


@pytest.fixture
def store(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    store.get_or_build(KIND, KEY, _build_into, log=None)
    store.get_or_build("bystanders", "b1", _build_into, log=None)  # must not change whatever happens to k1
    return store


@pytest.mark.parametrize("damage, detail", DAMAGES.values(), ids=DAMAGES.keys())
def test_damaged_folder_is_moved_aside_with_one_line_and_rebuilt(store, capsys, damage, detail):
    folder = store.folder(KIND, KEY)
    good = tree_digest(folder)
    bystanders = tree_digest(store.root / "bystanders")
    damage(folder)
    damaged = tree_digest(folder)
    capsys.readouterr()
    calls = []
    rebuilt = store.get_or_build(KIND, KEY, lambda tmp: _build_into(tmp, calls), log=None)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and detail in lines[0] and f"moved {KEY} aside to .{KEY}.corrupt." in lines[0], lines
    assert rebuilt == folder and len(calls) == 1
    verify_folder(folder, KEY)
    assert {k: v for k, v in tree_digest(folder).items() if k != MANIFEST} == {
        k: v for k, v in good.items() if k != MANIFEST}  # the manifest differs only by its creation time
    aside = [p for p in (store.root / KIND).iterdir() if p.name.startswith(f".{KEY}.corrupt.")]
    assert len(aside) == 1 and tree_digest(aside[0]) == damaged  # kept as it was, for a post-mortem
    assert tree_digest(store.root / "bystanders") == bystanders
    assert store.get_or_build(KIND, KEY, lambda tmp: _build_into(tmp, calls), log=None) == folder and len(calls) == 1
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("damage, detail", DAMAGES.values(), ids=DAMAGES.keys())
def test_get_moves_a_damaged_folder_aside_and_reports_it_missing(store, capsys, damage, detail):
    damage(store.folder(KIND, KEY))
    capsys.readouterr()
    assert store.get(KIND, KEY) is None
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and detail in lines[0] and str(store.folder(KIND, KEY)) in lines[0]
    assert not store.folder(KIND, KEY).exists() and store.status(KIND, KEY) == "absent"


@pytest.mark.parametrize("damage", [d for d, _ in DAMAGES.values()] + [None],
                         ids=list(DAMAGES) + ["intact"])
def test_read_only_store_changes_nothing(store, capsys, damage):
    if damage is not None:
        damage(store.folder(KIND, KEY))
    before = tree_digest(store.root)
    capsys.readouterr()
    with read_only():
        assert store.status(KIND, KEY) == ("complete" if damage is None else "damaged")
        assert store.status(KIND, "never-built") == "absent"
        assert (store.get(KIND, KEY) is None) == (damage is not None)
        assert store.get(KIND, "never-built") is None
        with pytest.raises(WouldBuildError, match="never-built is not built yet"):
            store.get_or_build(KIND, "never-built", _build_into)
        if damage is not None:
            with pytest.raises(WouldBuildError, match=f"{KIND}/{KEY} is not built yet"):
                store.get_or_build(KIND, KEY, _build_into)
    assert tree_digest(store.root) == before
    assert capsys.readouterr().out == ""


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    store = ArtifactStore(tmp_path / "store")

    def fails(folder: Path) -> dict:
        _build_into(folder)
        raise KeyboardInterrupt  # a kill in the middle of a build

    with pytest.raises(KeyboardInterrupt):
        store.get_or_build(KIND, KEY, fails)
    assert [p.name for p in (store.root / KIND).iterdir()] == [f".{KEY}.lock"]
    assert store.get(KIND, KEY) is None


# Several processes ask for the same key at once; the build takes a while and records each call in a log file.
BUILDER = """
import json, sys, time
from pathlib import Path
from caspl.artifacts import ArtifactStore

root, go, log = sys.argv[1:4]

def build(folder):
    with open(log, "a") as handle:
        handle.write("built\\n")
    time.sleep(0.5)
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 4)
    return {}

while not Path(go).exists():
    time.sleep(0.01)
print(json.dumps(str(ArtifactStore(root).get_or_build("things", "k1", build, log=None))))
"""


def test_a_folder_moved_away_while_it_is_verified_reads_as_damaged_not_as_a_crash(tmp_path, monkeypatch):
    """A process verifying a folder outside the key's lock can see another process move it aside mid-read (a
    damaged build being quarantined): that is a failed verification, which then waits for the lock."""
    import caspl.artifacts as artifacts
    from caspl.artifacts import CorruptArtifactError

    store = ArtifactStore(tmp_path / "store")
    folder = store.get_or_build(KIND, KEY, _build_into, log=None)
    real_sha256 = artifacts.sha256_file

    def moved_first(path):
        if folder.exists():
            folder.rename(folder.with_name(f".{KEY}.corrupt.0"))
        return real_sha256(path)

    monkeypatch.setattr(artifacts, "sha256_file", moved_first)
    with pytest.raises(CorruptArtifactError, match="unreadable"):
        verify_folder(folder, KEY)


@pytest.mark.parametrize("start", ["absent", "damaged"])
def test_concurrent_builders_build_once(tmp_path, start):
    store = ArtifactStore(tmp_path / "store")
    if start == "damaged":
        store.get_or_build(KIND, KEY, _build_into, log=None)
        _flip_a_byte(store.folder(KIND, KEY))
    go, log = tmp_path / "go", tmp_path / "builds.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(store.root), str(go), str(log)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    time.sleep(1.0)  # let every process reach its start line
    go.touch()
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    answers = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert answers == [str(store.folder(KIND, KEY))] * 4
    assert log.read_text() == "built\n"
    verify_folder(store.folder(KIND, KEY), KEY)
    warnings = [line for out, _ in outputs for line in out.splitlines() if "moved k1 aside" in line]
    assert len(warnings) == (1 if start == "damaged" else 0)

"""The teacher cache under damage, bad input, reordering and a killed actor, through the real CLI where it can be.

`caspl cache --inspect` must change nothing (the whole store tree is hashed before and after); bad teacher weights
fail in the driver with one line before Ray starts; the same cache built with other batch and shard sizes is bit-equal
and trains bit-equal boosting prompts whatever order its shards hold; a teacher actor killed mid-build is replaced and
the cache equals an uninterrupted build, with no error line from Ray's core worker.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import caspl.ray_env
from caspl.artifacts import MANIFEST, ArtifactStore, write_manifest
from caspl.cli import main
from caspl.config import from_dict
from caspl.distill.cache import KIND, LogitsCache
from caspl.models import ModelSpec, check_weights, load_clip
from caspl.train.boost import BoostRunConfig, prepare_boost, train_boost
from conftest import start_test_ray

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 80  # toy_shapes: 40 classes x n_train 2


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and folder under `root` (hidden ones included) -> sha256 of its bytes ("dir" for folders)."""
    return {p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def _config(store: Path, teacher: dict | None = None, cache: dict | None = None) -> dict:
    return {
        "student": {"name": "caspl-tiny"}, "teacher": teacher or {"name": "caspl-tiny-teacher"},
        "data": {"dataset": "toy_shapes", "root": str(store), "options": {"n_train": 2, "n_val": 1, "n_test": 1}},
        "method": {"text_length": 2, "vision_length": 2, "text_depth": 2, "vision_depth": 2},
        "optim": {"epochs": 2, "batch_size": 8, "lr": 0.05, "warmup_epochs": 1},
        "cache": {"views": 2, "batch_size": 40, "shard_size": 40, "crop_scale": [0.5, 1.0], **(cache or {})},
        "runtime": {"store": str(store), "threads": 1},
    }


def _write_config(path: Path, store: Path, **kw) -> str:
    path.write_text(yaml.safe_dump(_config(store, **kw)))
    return str(path)


def _cli(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err.splitlines()


# --- caspl cache --inspect: complete / partial / damaged / absent, and nothing changes ---------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A store holding the ToyWorld data and a finished teacher cache of 2 shards, built through `caspl cache`."""
    start_test_ray()
    store = tmp_path_factory.mktemp("built") / "store"
    config = _write_config(store.parent / "boost.yaml", store)
    assert main(["cache", "-c", config]) == 0
    (key,) = [p.name for p in (store / KIND).iterdir() if not p.name.startswith(".")]
    return store, key


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _as_partial(folder: Path) -> Path:
    """The finished cache turned back into the partial folder of a build that was killed before its last rename."""
    partial = folder.with_name(f".{folder.name}.partial")
    os.rename(folder, partial)
    (partial / MANIFEST).unlink()
    return partial


def _partial_missing_a_shard(folder: Path) -> None:
    partial = _as_partial(folder)
    for stale in partial.glob("shard-00001.*"):
        stale.unlink()


def _partial_with_a_corrupt_shard(folder: Path) -> None:
    partial = _as_partial(folder)
    shard = partial / "shard-00001.npz"
    shard.write_bytes(shard.read_bytes()[:-50])


INSPECT_CASES = {
    "complete": (None, "complete", N_IMAGES, 0),
    "damaged": (lambda folder: _flip_last_byte(folder / "shard-00000.npz"), "damaged", 0, 0),
    "manifest-gone": (lambda folder: (folder / MANIFEST).unlink(), "damaged", 0, 0),
    "partial": (_partial_missing_a_shard, "partial", N_IMAGES // 2, 0),
    "partial-corrupt-shard": (_partial_with_a_corrupt_shard, "partial", N_IMAGES // 2, 1),
    "absent": (lambda folder: shutil.rmtree(folder), "absent", 0, 0),
}


@pytest.mark.parametrize("damage, state, done, bad_shards", INSPECT_CASES.values(), ids=INSPECT_CASES.keys())
def test_inspect_reports_the_state_and_changes_nothing(built, tmp_path, capsys, damage, state, done, bad_shards):
    source, key = built
    store = tmp_path / "store"
    shutil.copytree(source, store)
    if damage is not None:
        damage(store / KIND / key)
    config = _write_config(tmp_path / "boost.yaml", store)
    before = tree_digest(store)
    code, out, err = _cli(capsys, "cache", "-c", config, "--inspect")
    assert code == 0 and err == []
    report = json.loads("\n".join(out))  # the JSON report and nothing else
    assert (report["key"], report["state"], report["images"]) == (key, state, N_IMAGES)
    assert (report["images_done"], report["shards_damaged"]) == (done, bad_shards)
    assert tree_digest(store) == before


def test_inspect_builds_nothing_when_the_inputs_are_missing(tmp_path, capsys):
    """An empty store: the ToyWorld data is not built yet, so the cache is absent, and inspect does not build it."""
    store = tmp_path / "store"
    store.mkdir()
    config = _write_config(tmp_path / "boost.yaml", store)
    code, out, err = _cli(capsys, "cache", "-c", config, "--inspect")
    report = json.loads("\n".join(out))
    assert code == 0 and err == [] and report["state"] == "absent" and report["missing"].startswith("toyworld_data/")
    assert list(store.iterdir()) == []


@pytest.mark.parametrize("damage, warning", [
    (lambda folder: _flip_last_byte(folder / "shard-00000.npz"), "checksum mismatch"),
    (_partial_with_a_corrupt_shard, "teacher shard shard-00001.npz fails its checksum"),
], ids=["damaged", "partial-corrupt-shard"])
def test_a_build_heals_what_inspect_reported(built, tmp_path, capsys, damage, warning):
    source, key = built
    store = tmp_path / "store"
    shutil.copytree(source, store)
    damage(store / KIND / key)
    config = _write_config(tmp_path / "boost.yaml", store)
    code, out, err = _cli(capsys, "cache", "-c", config)
    assert code == 0 and not [line for line in err if "teacher logits" not in line and line.strip()]  # tqdm only
    warnings = [line for line in out if line.startswith("[caspl] warning")]
    assert len(warnings) == 1 and warning in warnings[0], out
    code, out, _ = _cli(capsys, "cache", "-c", config, "--inspect")
    assert json.loads("\n".join(out))["state"] == "complete"
    healed, original = LogitsCache(store / KIND / key), LogitsCache(source / KIND / key)
    ids = original.usable_ids
    assert healed.usable_ids == ids and len(ids) == N_IMAGES
    for view in (0, 1):
        assert torch.equal(healed.lookup(ids, [view] * len(ids)), original.lookup(ids, [view] * len(ids)))


# --- bad teacher weights: one line from the driver, before Ray starts --------------------------------------------


def _not_a_checkpoint(path: Path) -> Path:
    path = path.with_suffix(".pt")
    path.write_bytes(b"this is not a checkpoint\n" * 10)
    return path


def _truncated_safetensors(path: Path) -> Path:
    from safetensors.torch import save_file

    path = path.with_suffix(".safetensors")
    save_file({k: v.contiguous() for k, v in load_clip(ModelSpec("caspl-tiny-teacher")).model.state_dict().items()},
              str(path))
    path.write_bytes(path.read_bytes()[:1000])
    return path


def _wrong_architecture(path: Path) -> Path:  # the student's weights given as the teacher's
    path = path.with_suffix(".pt")
    torch.save(load_clip(ModelSpec("caspl-tiny")).model.state_dict(), path)
    return path


def _not_a_state_dict(path: Path) -> Path:
    path = path.with_suffix(".pt")
    torch.save({"epoch": 3, "note": "a training log, not weights"}, path)
    return path


BAD_WEIGHTS = {
    "not-a-checkpoint": (_not_a_checkpoint, "as a weights-only state dict"),
    "truncated-safetensors": (_truncated_safetensors, "is not a readable safetensors file"),
    "wrong-architecture": (_wrong_architecture, "does not fit architecture caspl-tiny-teacher"),
    "not-a-state-dict": (_not_a_state_dict, "holds no state dict of tensors"),
    "missing-file": (lambda path: path.with_suffix(".pt"), "does not exist"),
}


@pytest.fixture
def ray_must_not_start(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started although the teacher's weights are bad")

    monkeypatch.setattr(caspl.ray_env, "ensure_ray", refuse)


@pytest.mark.parametrize("make, message", BAD_WEIGHTS.values(), ids=BAD_WEIGHTS.keys())
def test_bad_teacher_weights_fail_in_the_driver_before_ray(tmp_path, capsys, ray_must_not_start, make, message):
    weights = make(tmp_path / "teacher_weights")
    store = tmp_path / "store"
    config = _write_config(tmp_path / "boost.yaml", store,
                           teacher={"name": "caspl-tiny-teacher", "pretrained": str(weights)})
    from caspl.data import build_dataset

    build_dataset("toy_shapes", store, n_train=2, n_val=1, n_test=1)  # the data exists: only the weights are bad
    before = tree_digest(store)
    started = time.perf_counter()
    code, out, err = _cli(capsys, "cache", "-c", config)
    assert code == 2 and out == []
    assert len(err) == 1 and err[0].startswith("caspl: error: ") and message in err[0] and weights.name in err[0]
    assert tree_digest(store) == before  # no partial folder, no teacher text features, nothing
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_good_teacher_weights_pass_the_driver_check(tmp_path, suffix):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in load_clip(ModelSpec("caspl-tiny-teacher")).model.state_dict().items()}
    path = tmp_path / f"teacher{suffix}"
    torch.save(state, path) if suffix == ".pt" else save_file(state, str(path))
    check_weights(ModelSpec("caspl-tiny-teacher", pretrained=str(path)))


# --- deterministic content: batching, shard order and boosting ---------------------------------------------------


def _rewrite_shards_shuffled(folder: Path, key: str, seed: int = 0, rows_per_shard: int = 7) -> None:
    """The same cache rows, shuffled and cut into shards of another size (the shard format of caspl.distill.cache)."""
    arrays = {name: [] for name in ("id", "ok", "error", "sims")}
    for shard in sorted(folder.glob("shard-*.npz")):
        with np.load(shard, allow_pickle=False) as npz:
            for name in arrays:
                arrays[name].append(npz[name])
        shard.unlink()
        shard.with_suffix(".json").unlink()
    rows = {name: np.concatenate(parts) for name, parts in arrays.items()}
    order = np.random.default_rng(seed).permutation(len(rows["id"]))
    for index, start in enumerate(range(0, len(order), rows_per_shard)):
        chosen = order[start:start + rows_per_shard]
        path = folder / f"shard-{index:05d}.npz"
        np.savez(path, **{name: values[chosen] for name, values in rows.items()})
        path.with_suffix(".json").write_text(json.dumps({"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                                         "images": len(chosen)}))
    (folder / MANIFEST).unlink()
    write_manifest(folder, key, {"kind": KIND, "images": len(order)})


@pytest.mark.slow(seconds=15)
def test_boosting_is_bit_equal_whatever_the_batching_and_shard_order(tmp_path, ray_local):
    first = from_dict(BoostRunConfig, _config(tmp_path / "a"))
    other = from_dict(BoostRunConfig, _config(tmp_path / "b", cache={"batch_size": 1, "shard_size": 13, "actors": 2}))
    inputs_a, report_a = prepare_boost(first, ArtifactStore(tmp_path / "a"), progress=False)
    inputs_b, report_b = prepare_boost(other, ArtifactStore(tmp_path / "b"), progress=False)
    assert report_a.key == report_b.key and report_b.computed == N_IMAGES
    # a third copy whose shards hold the same rows in a shuffled order
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    _rewrite_shards_shuffled(tmp_path / "c" / KIND / report_a.key, report_a.key)
    inputs_c, report_c = prepare_boost(first, ArtifactStore(tmp_path / "c"), progress=False)
    assert report_c.computed == 0
    caches = [LogitsCache(Path(i.store_root) / KIND / i.cache_key) for i in (inputs_a, inputs_b, inputs_c)]
    assert list(caches[0].row) != list(caches[2].row)  # the shards really hold another order
    ids = caches[0].usable_ids
    for cache in caches[1:]:  # the teacher's numbers do not depend on how the images were batched
        assert cache.usable_ids == ids
        for view in (0, 1):
            assert torch.equal(cache.lookup(ids, [view] * len(ids)), caches[0].lookup(ids, [view] * len(ids)))
    prompts = [train_boost(first, inputs, None)["prompts"] for inputs in (inputs_a, inputs_b, inputs_c)]
    for other_prompts in prompts[1:]:
        assert other_prompts.keys() == prompts[0].keys()
        assert all(torch.equal(other_prompts[k], prompts[0][k]) for k in prompts[0])


# --- a teacher actor killed mid-build --------------------------------------------------------------------------

# Builds a reference cache, then the same cache in a second store while a thread kills the teacher actor's process
# (found through Ray's state API) as soon as the first shard is written. The actor is slowed down (0.3 s per batch)
# so that the kill lands mid-build. Prints one JSON line at the end.
KILL_SCRIPT = r"""
import json, os, signal, sys, threading, time
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image

import caspl.distill.cache as cache_module
from caspl.artifacts import ArtifactStore
from caspl.distill.cache import CacheConfig, LogitsCache, UnlabeledImages, build_logits_cache
from caspl.models import ModelSpec

torch.set_num_threads(1)
root = Path(sys.argv[1])
rng = np.random.default_rng(0)
paths = []
for i in range(48):
    path = root / "images" / f"img{i:03d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(path)
    paths.append(str(path))
images = UnlabeledImages.from_paths(paths)
cfg = CacheConfig(views=2, batch_size=4, shard_size=8, crop_scale=(0.5, 1.0))
ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=True, configure_logging=False)


def build(store):
    return build_logits_cache(ModelSpec("caspl-tiny-teacher"), ["red circle", "blue square", "green star"],
                              "a photo of a {}.", images, cfg, ArtifactStore(store), progress=False)


reference = build(root / "reference")


class SlowTeacher(cache_module.TeacherActor):
    def __call__(self, batch):
        time.sleep(0.3)
        return super().__call__(batch)


cache_module.TeacherActor = SlowTeacher
killed = []


def kill_the_teacher_after_the_first_shard():
    from ray.util.state import list_actors

    while not list((root / "killed" / "teacher_logits").glob(".*.partial/shard-*.json")):
        time.sleep(0.02)
    for actor in list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")]):
        if "SlowTeacher" in actor.class_name:
            os.kill(actor.pid, signal.SIGKILL)
            killed.append(actor.pid)


threading.Thread(target=kill_the_teacher_after_the_first_shard, daemon=True).start()
survivor = build(root / "killed")
a, b = LogitsCache(reference.folder), LogitsCache(survivor.folder)
ids = a.usable_ids
equal = b.usable_ids == ids and all(torch.equal(a.lookup(ids, [v] * len(ids)), b.lookup(ids, [v] * len(ids)))
                                    for v in range(cfg.views))
print(json.dumps({"killed": killed, "images": len(ids), "computed": survivor.computed, "reused": survivor.reused,
                  "same_key": survivor.key == reference.key, "equal": equal}), flush=True)
"""


@pytest.mark.slow(seconds=38)
def test_a_killed_teacher_actor_is_replaced_and_the_cache_completes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "TMPDIR": str(tmp_path), "RAY_TMPDIR": tempfile.gettempdir()}  # Ray's dashboard left a /tmp/pymp-* folder
    env.pop("RAY_ADDRESS", None)  # (Ray's own folder stays short: its socket paths must be under 108 bytes)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=240)
    seconds = time.perf_counter() - started
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["killed"]) == 1, output[-3000:]
    assert result["same_key"] and result["equal"] and result["images"] == 48
    assert (result["computed"], result["reused"]) == (48, 0)  # every image written once, none lost
    restarts = [line for line in output.splitlines() if line.startswith("[caspl] a teacher actor died")]
    assert len(restarts) == 1 and "restart 1 of 3" in restarts[0], output[-3000:]
    assert "core_worker.cc" not in output, [line for line in output.splitlines() if "core_worker.cc" in line]
    assert seconds < 120

"""The teacher logits cache: Ray Data streams unlabeled images through teacher actors once per view set.

Key = hash(teacher identity incl. weights sha256, class list, template, view geometry, view count, view seed, image
ids). Layout under the artefact store:

    teacher_logits/.<key>.partial/shard-<n>.npz (+ .json with sha256)   while running; finished shards survive a kill
    teacher_logits/<key>/…  + MANIFEST.json                            once every image is done (atomic rename)

A shard holds, per image: id, ok flag, error message, and cosine similarities [V, C] for its V views. An unreadable
image is skipped, counted and named (strict mode: an error). A shard whose checksum fails is deleted and recomputed.

Failures: the driver checks the teacher's weights (keys and shapes, no model in memory) before Ray starts, so bad
weights are one line, not a traceback per actor. A teacher actor that dies fails the Ray Data execution; the driver
keeps every finished shard and starts a fresh pool for the images left (`cache.actor_restarts` times). Ray's own actor
restarts stay off: Ray Data passes its pool's constructor state (the pickled map function with our constructor
arguments, and its DataContext) as object-store references, for which Ray 2.60 does not guarantee a restart and logs
an error line per actor when restarts are on (ray-project/ray#53727, #57733).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from caspl.artifacts import (ArtifactStore, atomic_write_bytes, atomic_write_text, content_key, read_only,
                             sha256_file, write_manifest)
from caspl.data.base import load_image
from caspl.data.views import make_view
from caspl.distill.teacher import FORWARD_VIEWS
from caspl.errors import ConfigError, DataError
from caspl.models import ModelSpec, check_weights, model_identity, resolve_checkpoint
from caspl.startup import freeze_loaded

KIND = "teacher_logits"
CACHE_VERSION = 2  # 2: scores in fixed-size teacher passes (bit-identical whatever the batching; see FORWARD_VIEWS)


@dataclass
class CacheConfig:
    views: int = 4  # augmented views per image
    seed: int = 0  # view seed: view v of image i is the same crop/flip for teacher and student
    actors: int = 1  # teacher actor pool size
    actor_num_cpus: float = 0.5
    actor_num_gpus: float = 0.0
    batch_size: int = 64  # images per actor call
    shard_size: int = 512  # images per shard file
    strict: bool = False  # an unreadable image is an error instead of a skip
    crop_scale: tuple[float, float] = (0.08, 1.0)
    actor_restarts: int = 3  # times a fresh actor pool takes over the images left after a teacher actor died
    actor_threads: int | None = None  # torch threads per actor; None: the machine's cores shared by the pool (the
    #                                   cache is built before trials start, so it may use every core)

    def __post_init__(self):
        if self.views < 1 or self.actors < 1 or self.batch_size < 1 or self.shard_size < 1:
            raise ConfigError("cache.views, cache.actors, cache.batch_size and cache.shard_size must be >= 1")
        if self.actor_threads is not None and self.actor_threads < 1:
            raise ConfigError(f"cache.actor_threads must be >= 1 or null (got {self.actor_threads})")
        if self.actor_restarts < 0:
            raise ConfigError(f"cache.actor_restarts must be >= 0 (got {self.actor_restarts})")


@dataclass
class UnlabeledImages:
    """Images identified by content: id = sha256 of the file bytes (first 24 hex digits)."""

    ids: list[str]
    paths: list[str]

    @classmethod
    def from_paths(cls, paths: Sequence[str], threads: int = 8) -> "UnlabeledImages":
        unique = sorted(set(paths))
        with ThreadPoolExecutor(threads) as pool:
            ids = list(pool.map(_content_id, unique))
        seen: dict[str, str] = {}
        for image_id, path in zip(ids, unique):  # byte-identical files are one image
            seen.setdefault(image_id, path)
        order = sorted(seen)
        return cls(order, [seen[i] for i in order])


def _content_id(path: str) -> str:
    try:
        return sha256_file(Path(path))[:24]
    except OSError as exc:
        raise DataError(f"{path}: cannot read image file ({exc}); fix or remove it") from None


def cache_key(teacher_identity: dict, classnames: Sequence[str], template: str, cfg: CacheConfig,
              image_ids: Sequence[str]) -> str:
    return content_key(CACHE_VERSION, FORWARD_VIEWS, teacher_identity, list(classnames), template,
                       list(cfg.crop_scale), cfg.views, cfg.seed, list(image_ids))


class TeacherActor:
    """Ray Data callable class: {"id", "path"} batches -> {"id", "ok", "error", "sims" [n, V, C]}."""

    def __init__(self, teacher: dict, weights: tuple[str | None, dict], store_root: str, classnames: list[str],
                 template: str, crop_scale: list[float], views: int, seed: int, threads: int = 1):
        from caspl.distill.teacher import TeacherScorer, load_teacher, teacher_text_features

        torch.set_num_threads(max(1, threads))
        loaded = load_teacher(ModelSpec(**teacher), weights)  # weights resolved by the driver: actors build nothing
        text = teacher_text_features(loaded, classnames, template, ArtifactStore(store_root))
        self.scorer = TeacherScorer(loaded, text, crop_scale, pass_size=FORWARD_VIEWS)
        self.spec = self.scorer.view_spec
        self.views, self.seed, self.n_classes = views, seed, len(classnames)
        freeze_loaded()  # modules and teacher live as long as the actor: out of the collector's walks (caspl.startup)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, paths = [str(i) for i in batch["id"]], [str(p) for p in batch["path"]]
        ok, errors, tensors = [], [], []
        for image_id, path in zip(ids, paths):
            try:
                image = load_image(path)
                tensors += [make_view(image, image_id, v, self.seed, self.spec) for v in range(self.views)]
                ok.append(True)
                errors.append("")
            except DataError as exc:
                ok.append(False)
                errors.append(" ".join(str(exc).split())[:300])  # one line, whatever the decoder said
        sims = np.zeros((len(ids), self.views, self.n_classes), dtype=np.float32)
        if tensors:
            scores = self.scorer(torch.stack(tensors)).numpy().reshape(-1, self.views, self.n_classes)
            sims[np.array(ok)] = scores
        return {"id": np.array(ids), "ok": np.array(ok), "error": np.array(errors), "sims": sims}


@dataclass
class BuildReport:
    folder: Path
    key: str
    computed: int = 0  # images run through the teacher in this call
    reused: int = 0  # images found in finished shards
    skipped: list[dict] = field(default_factory=list)
    teacher_views: int = 0  # teacher forward passes (one per view) in this call
    seconds: float = 0.0


def build_logits_cache(
    teacher: ModelSpec,
    classnames: Sequence[str],
    template: str,
    images: UnlabeledImages,
    cfg: CacheConfig,
    store: ArtifactStore,
    *,
    progress: bool = True,
) -> BuildReport:
    """Make sure the cache for these inputs exists; compute only what no finished shard holds."""
    start = time.perf_counter()
    key = cache_key(model_identity(teacher), classnames, template, cfg, images.ids)
    if (done := store.get(KIND, key)) is not None:
        skipped = _manifest_skips(done)
        _check_strict(cfg, skipped)  # built earlier without strict (strict is not part of the key)
        return BuildReport(done, key, reused=len(images.ids), skipped=skipped)
    resolved = resolve_checkpoint(teacher)
    check_weights(teacher, resolved)  # bad weights: one line here, before anything is written or any actor starts
    partial = store.root / KIND / f".{key}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    finished = _finished_ids(partial)
    todo = [(i, p) for i, p in zip(images.ids, images.paths) if i not in finished]
    report = BuildReport(store.folder(KIND, key), key, reused=len(images.ids) - len(todo))
    if todo:
        actor_kwargs = dict(  # the driver's resolved weights: actors neither build nor download anything
            teacher=asdict(teacher), weights=resolved, store_root=str(store.root), classnames=list(classnames),
            template=template, crop_scale=list(cfg.crop_scale), views=cfg.views, seed=cfg.seed,
            threads=cfg.actor_threads or max(1, (os.cpu_count() or 1) // cfg.actors))
        _run_teacher(actor_kwargs, cfg, partial, todo, report, progress)
    _finalise(partial, key, store, report, cfg, len(images.ids))
    report.seconds = time.perf_counter() - start
    return report


def _run_teacher(actor_kwargs: dict, cfg: CacheConfig, partial: Path, todo: list[tuple[str, str]],
                 report: "BuildReport", progress: bool) -> None:
    """Score `todo` through a Ray Data actor pool, one shard per `cfg.shard_size` images; survive dead actors."""
    from ray.exceptions import RayActorError

    from caspl.ray_env import ensure_ray

    ensure_ray()
    bar = _progress(len(todo), progress)
    restarts = 0
    while True:
        try:
            _stream_through_pool(actor_kwargs, cfg, partial, todo, report, bar)
            break
        except RayActorError as exc:
            finished = _finished_ids(partial)
            todo = [(i, p) for i, p in todo if i not in finished]
            if restarts == cfg.actor_restarts:
                raise RuntimeError(
                    f"teacher actors died {restarts + 1} time(s) ({_first_line(exc)}); {len(todo)} images are left "
                    f"and the finished shards are kept in {partial}: run again, and check the actors' memory "
                    "(cache.batch_size, cache.actor_num_cpus/actor_num_gpus)") from exc
            restarts += 1
            print(f"[caspl] a teacher actor died ({_first_line(exc)}); a new actor pool takes the {len(todo)} "
                  f"images left (restart {restarts} of {cfg.actor_restarts})", flush=True)
    if bar is not None:
        bar.close()


def _stream_through_pool(actor_kwargs: dict, cfg: CacheConfig, partial: Path, todo: list[tuple[str, str]],
                         report: "BuildReport", bar) -> None:
    import ray.data
    from ray.data import ActorPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.from_items([{"id": i, "path": p} for i, p in todo])
    with warnings.catch_warnings():
        # Ray 2.60 takes max_restarts only through its deprecated **ray_remote_args: that deprecation is ours to
        # handle (when Ray 2.64 removes them), not the user's, so it is not shown on every build.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
        ds = ds.map_batches(
            TeacherActor,
            fn_constructor_kwargs=actor_kwargs,
            compute=ActorPoolStrategy(size=cfg.actors),
            batch_size=cfg.batch_size,
            num_cpus=cfg.actor_num_cpus,
            num_gpus=cfg.actor_num_gpus or None,
            batch_format="numpy",
            max_restarts=0,  # restarts by the driver, from the finished shards (see the module docstring)
            max_task_retries=0,
        )
    next_shard = _next_shard_index(partial)
    for batch in ds.iter_batches(batch_size=cfg.shard_size, batch_format="numpy"):
        skipped = [{"id": i, "error": e} for i, ok, e in zip(batch["id"], batch["ok"], batch["error"]) if not ok]
        _check_strict(cfg, skipped)  # before the shard is written: a rerun meets the same error
        _write_shard(partial / f"shard-{next_shard:05d}.npz", batch)
        next_shard += 1
        n, n_ok = len(batch["id"]), int(batch["ok"].sum())
        report.computed += n
        report.teacher_views += n_ok * cfg.views
        for skip in skipped:
            print(f"[caspl] skipped image {skip['id']}: {skip['error']}")
        if bar is not None:
            bar.update(n)


def _check_strict(cfg: CacheConfig, skipped: list[dict]) -> None:
    if cfg.strict and skipped:
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        raise DataError(f"unreadable image {skipped[0]['id']}: {skipped[0]['error']}{more} (cache.strict is on)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160]}" if text else type(exc).__name__


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="teacher logits", unit="img", mininterval=2.0)


def _write_shard(path: Path, batch: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, id=batch["id"].astype(str), ok=batch["ok"].astype(bool), error=batch["error"].astype(str),
             sims=batch["sims"].astype(np.float32))
    data = buffer.getvalue()
    atomic_write_bytes(path, data)  # data first, then its checksum: a shard without a sidecar is not finished
    atomic_write_text(path.with_suffix(".json"), json.dumps({"sha256": hashlib.sha256(data).hexdigest(),
                                                              "images": len(batch["id"])}))


def _read_shard(path: Path, repair: bool = True) -> dict[str, np.ndarray] | None:
    """A shard's arrays, or None when it is unfinished or fails its checksum (then, with `repair`, it is deleted)."""
    sidecar = path.with_suffix(".json")
    try:
        expected = json.loads(sidecar.read_text())["sha256"]
        if sha256_file(path) == expected:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        if repair:
            print(f"[caspl] warning: teacher shard {path.name} fails its checksum; recomputing its images")
    except (OSError, ValueError, KeyError):
        pass
    if repair:
        for stale in (path, sidecar):
            stale.unlink(missing_ok=True)
    return None


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.npz"))


def _finished_ids(partial: Path, repair: bool = True) -> set[str]:
    ids: set[str] = set()
    for shard in _shards(partial):
        if (arrays := _read_shard(shard, repair)) is not None:
            ids.update(arrays["id"].tolist())
    return ids


@dataclass
class CacheStatus:
    key: str
    state: str  # complete | partial | damaged | absent
    images: int
    images_done: int
    folder: Path
    shards_damaged: int = 0  # partial: shards that fail their checksum (the next build recomputes their images)


def inspect_cache(teacher: ModelSpec, classnames: Sequence[str], template: str, images: UnlabeledImages,
                  cfg: CacheConfig, store: ArtifactStore) -> CacheStatus:
    """Where the cache for these inputs stands, read-only: nothing is computed, moved or deleted.

    complete: the finished folder verifies; damaged: it exists but fails its manifest (the next build moves it aside
    and recomputes); partial: some shards are finished; absent: nothing yet. Runs inside `read_only()`, so a weight
    source that would have to build the teacher raises WouldBuildError instead.
    """
    with read_only():
        key = cache_key(model_identity(teacher), classnames, template, cfg, images.ids)
        n = len(images.ids)
        state = store.status(KIND, key)
        if state != "absent":
            return CacheStatus(key, state, n, n if state == "complete" else 0, store.folder(KIND, key))
        partial = store.root / KIND / f".{key}.partial"
        shards = _shards(partial) if partial.is_dir() else []
        readable = [arrays for shard in shards if (arrays := _read_shard(shard, repair=False)) is not None]
        done = len({i for arrays in readable for i in arrays["id"].tolist()})
        return CacheStatus(key, "partial" if done else "absent", n, done, partial, len(shards) - len(readable))


def _next_shard_index(partial: Path) -> int:
    indices = [int(p.stem.split("-")[1]) for p in _shards(partial)]
    return max(indices, default=-1) + 1


def _finalise(partial: Path, key: str, store: ArtifactStore, report: BuildReport, cfg: CacheConfig,
              n_images: int) -> None:
    skipped = []
    for shard in _shards(partial):
        arrays = _read_shard(shard)
        if arrays is None:
            raise RuntimeError(f"teacher shard {shard} vanished while finishing the cache; run again")
        skipped += [{"id": i, "error": e} for i, ok, e in zip(arrays["id"], arrays["ok"], arrays["error"]) if not ok]
    _check_strict(cfg, skipped)  # shards written by an earlier run without strict
    report.skipped = skipped
    write_manifest(partial, key, {"kind": KIND, "images": n_images, "views": cfg.views, "skipped": skipped})
    try:
        os.rename(partial, store.folder(KIND, key))
    except OSError:  # a concurrent builder finished first; its folder is equivalent
        pass


def _manifest_skips(folder: Path) -> list[dict]:
    return json.loads((folder / "MANIFEST.json").read_text())["meta"].get("skipped", [])


class LogitsCache:
    """Read side: cosine similarities of the teacher for (image id, view), verified on open.

    The similarity arrays stay on disk: each shard's `sims` is memory-mapped inside its (uncompressed) npz, and a
    lookup reads only the rows it asks for, so a trial's memory does not grow with the unlabeled set.
    """

    def __init__(self, folder: Path):
        self.shards: list[np.ndarray] = []  # per shard: sims [images, views, classes], memory-mapped
        self.row: dict[str, tuple[int, int]] = {}  # image id -> (shard, row)
        self.ok: dict[str, bool] = {}
        for index, shard in enumerate(_shards(folder)):
            with np.load(shard, allow_pickle=False) as npz:
                ids, ok = npz["id"].tolist(), npz["ok"].tolist()
            self.shards.append(mapped_member(shard, "sims"))
            self.row.update((image_id, (index, r)) for r, image_id in enumerate(ids))
            self.ok.update(zip(ids, ok))

    @classmethod
    def open(cls, store: ArtifactStore, key: str) -> "LogitsCache":
        folder = store.get(KIND, key)
        if folder is None:
            raise DataError(f"teacher cache {key} is missing or damaged in {store.root}; build it with `caspl cache`")
        return cls(folder)

    @property
    def usable_ids(self) -> list[str]:
        """Ids of the images the teacher scored, sorted: the order shards were written in is not part of the key."""
        return sorted(i for i, ok in self.ok.items() if ok)

    def lookup(self, ids: Sequence[str], views: Sequence[int]) -> torch.Tensor:
        """Similarities [len(ids), classes] of view `views[k]` of image `ids[k]`, read from the mapped shards."""
        rows = [self.shards[shard][row, view] for (shard, row), view in zip((self.row[i] for i in ids), views)]
        return torch.from_numpy(np.stack(rows).astype(np.float32, copy=False))


def mapped_member(path: Path, name: str) -> np.ndarray:
    """Array `name` of an uncompressed npz (what np.savez writes), memory-mapped read-only; loaded if compressed."""
    import zipfile

    member = f"{name}.npy"
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            return np.load(path, allow_pickle=False)[name]
    with open(path, "rb") as handle:  # the local file header: 30 bytes, then the name and an extra field
        handle.seek(info.header_offset)
        local = handle.read(30)
        handle.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little")
                    + int.from_bytes(local[28:30], "little"))
        major, _ = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(handle)
        offset = handle.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")

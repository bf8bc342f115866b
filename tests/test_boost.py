"""Boosting at scale: teacher cache keys and robustness, views, resume and DDP equivalence, online == cached."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch

from caspl.artifacts import ArtifactStore
from caspl.config import from_dict
from caspl.data.views import ViewSpec, make_view
from caspl.distill.cache import (CacheConfig, LogitsCache, UnlabeledImages, build_logits_cache, cache_key)
from caspl.distill.loss import kd_loss
from caspl.errors import DataError
from caspl.models import ModelSpec
from caspl.train.boost import BoostRunConfig, prepare_boost, run_boost, train_boost, view_of

TEACHER = ModelSpec("caspl-tiny-teacher")
CLASSES = ["red circle", "blue square", "green star"]


def _images(tmp_path, n=12, bad=0):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = tmp_path / "imgs" / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    for i in range(bad):
        path = tmp_path / "imgs" / f"broken{i}.png"
        path.write_bytes(b"\x89PNG not really" + bytes([i]))
        paths.append(str(path))
    return UnlabeledImages.from_paths(paths)


def _cache_cfg(**kw):
    return CacheConfig(**{"views": 2, "batch_size": 4, "shard_size": 4, "crop_scale": (0.5, 1.0), **kw})


def test_cache_key_changes_with_every_input(tmp_path):
    images = _images(tmp_path, 3)
    identity = {"name": "t", "weights_sha256": "abc"}
    base = cache_key(identity, CLASSES, "a photo of a {}.", _cache_cfg(), images.ids)
    assert base == cache_key(dict(identity), list(CLASSES), "a photo of a {}.", _cache_cfg(), list(images.ids))
    variants = [
        cache_key({**identity, "weights_sha256": "abd"}, CLASSES, "a photo of a {}.", _cache_cfg(), images.ids),
        cache_key(identity, CLASSES[:2], "a photo of a {}.", _cache_cfg(), images.ids),
        cache_key(identity, CLASSES, "a sketch of a {}.", _cache_cfg(), images.ids),
        cache_key(identity, CLASSES, "a photo of a {}.", _cache_cfg(views=3), images.ids),
        cache_key(identity, CLASSES, "a photo of a {}.", _cache_cfg(seed=1), images.ids),
        cache_key(identity, CLASSES, "a photo of a {}.", _cache_cfg(crop_scale=(0.3, 1.0)), images.ids),
        cache_key(identity, CLASSES, "a photo of a {}.", _cache_cfg(), images.ids[:2]),
    ]
    assert len({base, *variants}) == len(variants) + 1
    # pool size, batch size and shard size do not change the numbers, so they do not change the key
    assert base == cache_key(identity, CLASSES, "a photo of a {}.", _cache_cfg(actors=2, batch_size=7), images.ids)


def test_views_are_reproducible_from_id_view_and_seed():
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 40, 3), dtype=np.uint8))
    spec = ViewSpec(32, (0.5,) * 3, (0.25,) * 3, crop_scale=(0.3, 1.0))
    a, b = make_view(image, "abc", 1, 0, spec), make_view(image, "abc", 1, 0, spec)
    assert torch.equal(a, b) and a.shape == (3, 32, 32)
    others = [make_view(image, "abc", 2, 0, spec), make_view(image, "abd", 1, 0, spec),
              make_view(image, "abc", 1, 1, spec)]
    assert all(not torch.equal(a, o) for o in others)
    assert {view_of("0000000a", e, 3) for e in range(3)} == {0, 1, 2}


@pytest.mark.slow(seconds=15)
def test_cache_builds_once_skips_corrupt_images_and_reuses(tmp_path, ray_local):
    store = ArtifactStore(tmp_path / "store")
    images = _images(tmp_path, 6, bad=1)
    first = build_logits_cache(TEACHER, CLASSES, "a photo of a {}.", images, _cache_cfg(), store, progress=False)
    assert first.computed == 7 and first.teacher_views == 6 * 2
    assert len(first.skipped) == 1 and "unreadable image" in first.skipped[0]["error"]
    assert "broken0.png" in first.skipped[0]["error"] and "\n" not in first.skipped[0]["error"]  # names the file
    manifest = json.loads((first.folder / "MANIFEST.json").read_text())
    assert manifest["meta"]["skipped"][0]["id"] == first.skipped[0]["id"]
    again = build_logits_cache(TEACHER, CLASSES, "a photo of a {}.", images, _cache_cfg(), store, progress=False)
    assert again.computed == 0 and again.teacher_views == 0 and again.folder == first.folder
    cache = LogitsCache.open(store, first.key)
    assert len(cache.usable_ids) == 6 and cache.lookup(cache.usable_ids[:2], [0, 1]).shape == (2, 3)
    assert all(isinstance(sims, np.memmap) for sims in cache.shards)  # similarities stay on disk, mapped
    expected = {}
    for shard in sorted(first.folder.glob("shard-*.npz")):  # every row read back whole, for comparison
        with np.load(shard) as npz:
            expected.update(zip(npz["id"].tolist(), npz["sims"]))
    ids = cache.usable_ids
    views = [i % 2 for i in range(len(ids))]
    assert torch.equal(cache.lookup(ids, views), torch.stack([torch.from_numpy(expected[i][v]) for i, v in
                                                               zip(ids, views)]))
    for strict in (_cache_cfg(strict=True), _cache_cfg(strict=True, seed=5)):  # the cache above, a new one
        with pytest.raises(DataError, match="cache.strict is on") as caught:
            build_logits_cache(TEACHER, CLASSES, "a photo of a {}.", images, strict, store, progress=False)
        assert "broken0.png" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.slow(seconds=10)
def test_interrupted_build_keeps_finished_shards_and_recomputes_a_corrupt_one(tmp_path, ray_local):
    store = ArtifactStore(tmp_path / "store")
    images = _images(tmp_path, 12)
    full = build_logits_cache(TEACHER, CLASSES, "a photo of a {}.", images, _cache_cfg(), store, progress=False)
    reference = LogitsCache(full.folder)
    partial = full.folder.with_name(f".{full.key}.partial")
    os.rename(full.folder, partial)  # as if killed before the final rename
    (partial / "MANIFEST.json").unlink()
    shards = sorted(partial.glob("shard-*.npz"))
    assert len(shards) == 3
    shards[1].write_bytes(shards[1].read_bytes()[:-20])  # truncated shard
    resumed = build_logits_cache(TEACHER, CLASSES, "a photo of a {}.", images, _cache_cfg(), store, progress=False)
    assert resumed.computed == 4 and resumed.reused == 8
    rebuilt = LogitsCache(resumed.folder)
    ids = reference.usable_ids
    assert torch.allclose(rebuilt.lookup(ids, [1] * len(ids)), reference.lookup(ids, [1] * len(ids)), atol=1e-6)
    # an altered shard in a finished cache is detected on read
    shard = sorted(resumed.folder.glob("shard-*.npz"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="missing or damaged"):
        LogitsCache.open(store, resumed.key)


def _boost_cfg(**kw):
    return from_dict(BoostRunConfig, {
        "student": {"name": "caspl-tiny"}, "teacher": {"name": "caspl-tiny-teacher"},
        "data": {"dataset": "toy_shapes", "options": {"n_train": 2, "n_val": 1, "n_test": 1}},
        "method": {"text_length": 2, "vision_length": 2, "text_depth": 2, "vision_depth": 2},
        "optim": {"epochs": 3, "batch_size": 8, "lr": 0.05, "warmup_epochs": 1},
        "cache": {"views": 2, "batch_size": 40, "shard_size": 40, "crop_scale": [0.5, 1.0]},
        **kw})


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, ray_local):
    store = ArtifactStore(tmp_path / "store")
    cfg = _boost_cfg()
    inputs, _ = prepare_boost(cfg, store, progress=False)
    straight = train_boost(cfg, inputs, tmp_path / "straight")["prompts"]

    class Stop(Exception):
        pass

    def stop_after_first(metrics, last):
        if metrics["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        train_boost(cfg, inputs, tmp_path / "resumed", report=stop_after_first)
    resumed = train_boost(cfg, inputs, tmp_path / "resumed")["prompts"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_online_and_cached_teacher_give_the_same_loss_on_identical_views(tmp_path, ray_local):
    store = ArtifactStore(tmp_path / "store")
    cfg = _boost_cfg()
    inputs, _ = prepare_boost(cfg, store, progress=False)
    from caspl.data.base import load_image
    from caspl.data.views import stack_views
    from caspl.train.boost import teacher_source

    cached = teacher_source(cfg, inputs)
    online = teacher_source(dataclasses.replace(cfg, teacher_mode="online"), inputs)
    ids = cached.usable_ids[:6]
    views = [view_of(i, 2, cfg.cache.views) for i in ids]
    paths = dict(zip(inputs.images.ids, inputs.images.paths))
    sims_online = online(stack_views([load_image(paths[i]) for i in ids], ids, views, cfg.cache.seed, online.view_spec))
    sims_cached = cached.lookup(ids, views)
    student = torch.randn(6, len(inputs.classnames))
    assert torch.allclose(sims_online, sims_cached, atol=1e-5)
    online_loss, cached_loss = kd_loss(student, 50 * sims_online, 2.0), kd_loss(student, 50 * sims_cached, 2.0)
    assert float(online_loss) == pytest.approx(float(cached_loss), rel=1e-5)


@pytest.mark.slow(seconds=30)
def test_ddp_on_ray_train_matches_a_single_process(tmp_path, ray_local):
    from caspl.methods.state import read_prompt_state

    store = ArtifactStore(tmp_path / "store")
    single = run_boost(_boost_cfg(workers=0), store, progress=False, log=lambda s: None)
    single_prompts, _ = read_prompt_state(single.prompts)
    shutil.rmtree(single.folder)  # same key: make the DDP run train instead of reusing the result
    ddp = run_boost(_boost_cfg(workers=2, cpus_per_worker=0.5), store, progress=False, log=lambda s: None)
    assert ddp.key == single.key and not ddp.reused
    ddp_prompts, _ = read_prompt_state(ddp.prompts)
    assert set(ddp_prompts) == {"boost.text.tokens", "boost.vision.tokens"}
    for key in single_prompts:  # equal up to float rounding: measured 8.6e-6 on values up to 18.4 (README, DDP)
        torch.testing.assert_close(ddp_prompts[key], single_prompts[key], rtol=1e-5, atol=1e-5, msg=key)
    deeper = single_prompts["boost.text.tokens"][1]
    assert not torch.equal(deeper, torch.zeros_like(ddp_prompts["boost.text.tokens"][1]))
    assert single.history[-1]["boost/kd_loss"] == pytest.approx(ddp.history[-1]["boost/kd_loss"], rel=1e-4)
    reused = run_boost(_boost_cfg(workers=0), store, progress=False, log=lambda s: None)
    assert reused.reused and reused.folder == ddp.folder

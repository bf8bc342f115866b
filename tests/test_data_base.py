"""Dataset API: base/novel subsets, few-shot sampling and its content-addressed cache."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest
from PIL import Image

import caspl.data.base as base
from caspl.artifacts import ArtifactStore
from caspl.data import Dataset, Item, few_shot, few_shot_split, load_image, subsample_classes
from caspl.errors import DataError


def make_dataset(num_classes: int = 5, per_class: int = 10, root: str = "/data/toy") -> Dataset:
    def split(name: str, n: int) -> list[Item]:
        return [Item(f"{root}/{name}/c{c}/{i}.png", c, f"class {c}") for c in range(num_classes) for i in range(n)]

    return Dataset(
        name="toy",
        classnames=[f"class {c}" for c in range(num_classes)],
        template="a photo of a {}.",
        train=split("train", per_class),
        val=split("val", 6),
        test=split("test", 3),
        root=root,
    )


def test_dataset_defaults_template_bank_and_prompts():
    ds = make_dataset(3)
    assert ds.templates == ["a photo of a {}."]
    assert ds.num_classes == 3
    assert ds.prompts() == ["a photo of a class 0.", "a photo of a class 1.", "a photo of a class 2."]


def test_subsample_odd_class_count_relabels_from_zero():
    ds = make_dataset(5)
    b, n = subsample_classes(ds, "base"), subsample_classes(ds, "novel")
    assert b.classnames == ["class 0", "class 1", "class 2"]  # ceil(5 / 2) = 3 base classes
    assert n.classnames == ["class 3", "class 4"]
    for split in ("train", "val", "test"):
        assert sorted({it.label for it in getattr(b, split)}) == [0, 1, 2]
        assert sorted({it.label for it in getattr(n, split)}) == [0, 1]
        for it in getattr(n, split):
            assert it.classname == n.classnames[it.label]  # classnames follow the new labels
            assert f"/c{it.label + 3}/" in it.path  # the old class 3 is the new class 0
    assert len(b.train) + len(n.train) == len(ds.train)
    assert subsample_classes(ds, "all") is ds
    assert ds.classnames == [f"class {c}" for c in range(5)]  # input untouched
    with pytest.raises(ValueError):
        subsample_classes(ds, "half")


def test_few_shot_is_deterministic_k_per_class_and_order_stable():
    items = make_dataset(4, per_class=20).train
    a, b = few_shot(items, 5, seed=1), few_shot(items, 5, seed=1)
    assert a == b
    assert few_shot(items, 5, seed=2) != a
    counts = base.class_counts(a)
    assert counts == {0: 5, 1: 5, 2: 5, 3: 5}
    positions = [items.index(it) for it in a]
    assert positions == sorted(positions)


def test_few_shot_per_class_selection_ignores_other_classes():
    items = make_dataset(4, per_class=20).train
    only_class_2 = [it for it in items if it.label == 2]
    assert [it for it in few_shot(items, 3, seed=7) if it.label == 2] == few_shot(only_class_2, 3, seed=7)


def test_few_shot_short_class_keeps_all_with_warning():
    items = make_dataset(2, per_class=10).train[:13]  # class 1 has 3 items
    with pytest.warns(UserWarning, match="fewer images"):
        picked = few_shot(items, 4, seed=0)
    assert base.class_counts(picked) == {0: 4, 1: 3}
    with pytest.raises(ValueError):
        few_shot(items, 0, seed=0)


def test_few_shot_split_shapes_and_order_insensitivity(tmp_path):
    ds = make_dataset(3, per_class=12)
    out = few_shot_split(ds, 8, seed=1, store=None)
    assert base.class_counts(out.train) == {0: 8, 1: 8, 2: 8}
    assert base.class_counts(out.val) == {0: 4, 1: 4, 2: 4}  # min(k, 4)
    assert out.test == ds.test
    shuffled = Dataset(**{**ds.__dict__, "train": ds.train[::-1], "val": ds.val[::-1]})
    assert few_shot_split(shuffled, 8, seed=1, store=None).train == out.train


def test_few_shot_cache_round_trip(tmp_path, monkeypatch):
    ds = make_dataset(3, per_class=12)
    first = few_shot_split(ds, 4, seed=3, store=ArtifactStore(tmp_path))
    folders = list((tmp_path / "fewshot").iterdir())
    assert len([f for f in folders if not f.name.startswith(".")]) == 1
    assert not str(folders[0]).startswith(ds.root)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached selection should have been read, not rebuilt")

    monkeypatch.setattr(base, "few_shot", no_rebuild)
    again = few_shot_split(ds, 4, seed=3, store=ArtifactStore(tmp_path))
    assert again.train == first.train and again.val == first.val
    with pytest.raises(AssertionError):  # another seed is another key
        few_shot_split(ds, 4, seed=4, store=ArtifactStore(tmp_path))


def _build_in_child(store_root: str, marker: str, barrier, queue) -> None:
    original = base.few_shot

    def slow_few_shot(items, k, seed):
        if k == 8:  # the train selection: once per build
            with open(marker, "a") as handle:
                handle.write("build\n")
            time.sleep(0.3)
        return original(items, k, seed)

    base.few_shot = slow_few_shot
    barrier.wait()
    out = base.few_shot_split(make_dataset(3, per_class=12), 8, seed=5, store=ArtifactStore(store_root))
    queue.put([(it.path, it.label) for it in out.train + out.val])


def test_few_shot_cache_concurrent_builders_build_once(tmp_path):
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    marker = tmp_path / "builds.txt"
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path / "store"), str(marker), barrier, queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert marker.read_text().count("build") == 1
    assert results[0] == results[1] and len(results[0]) == 3 * 8 + 3 * 4
    assert not list((tmp_path / "store" / "fewshot").glob(".*.build.*"))  # no temp folder left behind


def test_load_image_rgb_and_error(tmp_path):
    Image.new("L", (5, 4), 128).save(tmp_path / "gray.png")
    img = load_image(tmp_path / "gray.png")
    assert img.mode == "RGB" and img.size == (5, 4)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.jpg"):
        load_image(tmp_path / "broken.jpg")
    with pytest.raises(DataError, match="missing.png"):
        load_image(Path(tmp_path / "missing.png"))

"""ToyWorld: deterministic rendering, captions, the pretraining stream and the CoOp-format datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from caspl.artifacts import ArtifactStore
from caspl.data import build_dataset, few_shot_split, load_image, subsample_classes
from caspl.data.coop import load_coop_dataset
from caspl.data.toyworld import (
    COLOR_NAMES, DOMAINS, SHAPES, TEXTURES, TOY_DATASETS, captions, pretraining_stream, render, sample_attributes,
    toyworld_folder,
)
from caspl.data.toyworld.render import take_attributes
from caspl.errors import ConfigError

SMALL = {"n_train": 3, "n_val": 1, "n_test": 2}


def draw(seed: int, n: int = 64, **kwargs) -> np.ndarray:
    return render(sample_attributes(np.random.default_rng(seed), n, **kwargs))


def test_render_is_deterministic_per_seed():
    a, b, c = draw(3), draw(3), draw(4)
    assert a.shape == (64, 32, 32, 3) and a.dtype == np.uint8
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
    assert draw(3, image_size=48).shape == (64, 48, 48, 3)


def test_render_of_an_image_does_not_depend_on_its_batch():
    attrs = sample_attributes(np.random.default_rng(0), 40)
    rows = np.array([3, 17, 31])
    assert np.array_equal(render(take_attributes(attrs, rows)), render(attrs)[rows])


def test_every_shape_draws_differently():
    n = len(SHAPES)
    attrs = sample_attributes(np.random.default_rng(0), n, domains=["clean"], sizes=["large"], textures=["solid"],
                              colors=["red"], fixed={"shape": np.arange(n)})
    for key in ("cx", "cy", "radius", "rotation", "rgb", "background"):
        attrs[key][:] = attrs[key][0]  # same place, size and colours: only the shape differs
    images = render(attrs)
    object_pixels = (images != images[:, :1, :1]).any(-1).sum(axis=(1, 2))
    assert (object_pixels > 20).all()  # a visible object on the plain background
    assert len({image.tobytes() for image in images}) == n


def test_domains_look_different():
    means = {d: draw(1, 200, domains=[d]).mean() for d in DOMAINS}
    assert means["dark"] < 60 < means["clean"] < means["sketch"] and means["clean"] + 60 < means["faded"]
    faded = draw(6, 50, domains=["faded"]).astype(int)
    assert (faded.max(-1) - faded.min(-1)).mean() < 40  # washed out: little colour left
    noisy, clean = draw(2, 100, domains=["noisy"]), draw(2, 100, domains=["clean"])

    def roughness(images):
        return np.abs(np.diff(images.astype(int), axis=2)).mean()

    assert roughness(noisy) > 2 * roughness(clean)
    sketch = draw(5, 50, domains=["sketch"])
    assert (sketch.std(-1) < 12).mean() > 0.9  # grey pencil on paper: almost no colour


def test_sample_attributes_rejects_unknown_values():
    with pytest.raises(ConfigError, match="domain.*watercolour"):
        sample_attributes(np.random.default_rng(0), 4, domains=["watercolour"])
    with pytest.raises(ConfigError, match="shape"):
        sample_attributes(np.random.default_rng(0), 4, shapes=["blob"])
    with pytest.raises(ConfigError, match="fixed color"):
        sample_attributes(np.random.default_rng(0), 4, fixed={"color": np.array([0, 1, 2, 99])})


def test_captions_describe_the_image():
    rng = np.random.default_rng(0)
    attrs = sample_attributes(rng, 600)
    texts = captions(attrs, rng)
    assert len(texts) == 600 and len(set(texts)) > 300
    named = {d: [] for d in DOMAINS}
    for i, text in enumerate(texts):
        domain, shape = DOMAINS[attrs["domain"][i]], SHAPES[attrs["shape"][i]]
        colour, texture = COLOR_NAMES[attrs["color"][i]], TEXTURES[attrs["texture"][i]]
        assert shape in text or "shape" in text or "object" in text or text.endswith("texture."), text
        for word in (*COLOR_NAMES, *TEXTURES):  # attribute words are true of the image
            assert f" {word} " not in f" {text[:-1]} ".replace(",", " ") or word in (colour, texture), text
        if domain == "sketch":  # a pencil outline shows neither colour nor texture
            assert not any(f" {w} " in f" {text[:-1]} ".replace(",", " ") for w in (*COLOR_NAMES, *TEXTURES)), text
        named[domain].append(any(w in text for w in DOMAIN_WORDS[domain]))
        assert " a orange" not in text and " a ink" not in text
    assert all(0.4 < np.mean(hits) < 0.9 for hits in named.values())  # often, not always, naming the domain
    openers = {" ".join(t.split()[:3]) for t in texts}
    assert len(openers) > 60  # varied words before the noun: what lets context tokens steer the features
    colour_first = {text.index(c) < text.index(x) for text, c, x in
                    ((t, COLOR_NAMES[attrs["color"][i]], TEXTURES[attrs["texture"][i]]) for i, t in enumerate(texts))
                    if f"{c} " in text and f"{x} " in text}
    assert colour_first == {True, False}  # attributes come in varying order
    assert captions(attrs, np.random.default_rng(9)) == captions(attrs, np.random.default_rng(9))


DOMAIN_WORDS = {"clean": ("clean", "sharp", "bright", "clear", "plain", "grey"),
                "noisy": ("noisy", "grainy", "grain", "noise", "low quality"),
                "sketch": ("sketch", "drawing", "outline", "pencil", "paper"),
                "dark": ("dark", "dim", "low light"),
                "textured": ("pattern", "textured", "busy", "cluttered"),
                "faded": ("faded", "washed out", "overexposed", "pale", "harsh light"),
                "underwater": ("underwater", "under water", "diving", "murky", "water")}


def test_pretraining_stream_is_seeded_and_finite_when_asked():
    first = list(pretraining_stream(seed=7, batch_size=16, num_batches=2, domains=("clean", "sketch")))
    again = list(pretraining_stream(seed=7, batch_size=16, num_batches=2, domains=("clean", "sketch")))
    assert len(first) == 2 and first[0][0].shape == (16, 32, 32, 3) and len(first[0][1]) == 16
    assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, again))
    assert not np.array_equal(first[0][0], first[1][0])
    other = next(pretraining_stream(seed=8, batch_size=16))
    assert not np.array_equal(other[0], first[0][0])


def test_domain_weights_set_how_often_each_domain_is_drawn():
    rng = np.random.default_rng(0)
    attrs = sample_attributes(rng, 3000, domains=["clean", "noisy", "sketch"], domain_weights=[4, 4, 1])
    counts = np.bincount(attrs["domain"], minlength=len(DOMAINS))
    share = counts[DOMAINS.index("sketch")] / 3000
    assert 0.08 < share < 0.14 and counts[DOMAINS.index("dark")] == 0  # 1/9 = 0.11
    only_clean = next(pretraining_stream(seed=1, batch_size=32, domains=("clean", "sketch"), domain_weights=(1, 0)))
    assert not any(w in text for text in only_clean[1] for w in ("sketch", "drawing", "outline"))
    with pytest.raises(ConfigError, match="domain_weights"):
        sample_attributes(rng, 4, domains=["clean", "noisy"], domain_weights=[1])


# ------------------------------------------------------------------------------------------------------ datasets
@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_toy_dataset_is_coop_format_and_loads(tmp_path, name):
    ds = build_dataset(name, tmp_path, seed=0, **SMALL)
    spec = TOY_DATASETS[name]
    assert ds.num_classes >= 20 and len(set(ds.classnames)) == ds.num_classes
    assert (len(ds.train), len(ds.val), len(ds.test)) == (3 * ds.num_classes, ds.num_classes, 2 * ds.num_classes)
    assert ds.template == spec.template and ds.templates[0] == spec.template
    split_file = Path(ds.root) / f"split_zhou_{spec.display}.json"
    entries = json.loads(split_file.read_text())
    assert set(entries) == {"train", "val", "test"}
    rel, label, cname = entries["train"][0]
    assert Path(ds.root, "images", rel) == Path(ds.train[0].path) and ds.classnames[label] == cname
    assert str(tmp_path / "toyworld_data") in ds.root
    assert load_image(ds.test[0].path).size == (32, 32)
    assert load_coop_dataset(Path(ds.root).parent, spec.coop()).test == ds.test  # the plain CoOp loader


def test_toy_datasets_are_distinct_tasks(tmp_path):
    loaded = {name: build_dataset(name, tmp_path, **SMALL) for name in TOY_DATASETS}
    assert len({tuple(ds.classnames) for ds in loaded.values()}) == len(loaded)
    assert len({ds.template for ds in loaded.values()}) == len(loaded)
    sketch = np.stack([np.asarray(load_image(it.path)) for it in loaded["toy_sketch"].train])
    shapes = np.stack([np.asarray(load_image(it.path)) for it in loaded["toy_shapes"].train])
    assert sketch.mean() > shapes.mean() + 40  # paper-white sketches vs grey photos


def test_toy_dataset_bytes_depend_only_on_seed(tmp_path):
    spec = TOY_DATASETS["toy_sketch"]

    def files(root: Path, seed: int) -> dict:
        folder = toyworld_folder(spec, ArtifactStore(root), seed, image_size=32, **SMALL)
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        return {k: v["sha256"] for k, v in manifest["files"].items() if k.endswith(".png")}

    a, b, c = files(tmp_path / "a", 1), files(tmp_path / "b", 1), files(tmp_path / "c", 2)
    assert a == b and len(a) == 20 * 6
    assert a.keys() == c.keys() and a != c


def test_toy_dataset_is_cached_and_reused(tmp_path, monkeypatch):
    ds = build_dataset("toy_textures", tmp_path, **SMALL)
    import caspl.data.toyworld.datasets as toy

    monkeypatch.setattr(toy, "render", lambda attrs: pytest.fail("should have been read from the store"))
    assert build_dataset("toy_textures", tmp_path, **SMALL).train == ds.train
    with pytest.raises(pytest.fail.Exception):
        build_dataset("toy_textures", tmp_path, seed=1, **SMALL)


@pytest.mark.parametrize("name", ["toy_faded", "toy_underwater", "toy_night"])
def test_novel_classes_of_the_table_datasets_name_new_colours(tmp_path, name):
    ds = build_dataset(name, tmp_path, **SMALL)
    base, novel = subsample_classes(ds, "base"), subsample_classes(ds, "novel")
    colours = [{c for c in COLOR_NAMES if any(c in n.split() for n in part.classnames)} for part in (base, novel)]
    assert base.num_classes == novel.num_classes and not colours[0] & colours[1]
    assert len(colours[0]) == len(colours[1]) == len(dict(TOY_DATASETS[name].factors)["color"]) // 2
    other = {w for n in base.classnames for w in n.split() if w not in COLOR_NAMES and w != TOY_DATASETS[name].noun}
    assert len(other) > 1  # within its colours, base still has every size or texture


def test_toy_dataset_base_novel_and_few_shot(tmp_path):
    ds = build_dataset("toy_shapes", tmp_path, n_train=6, n_val=4, n_test=1)
    base, novel = subsample_classes(ds, "base"), subsample_classes(ds, "novel")
    assert base.num_classes == novel.num_classes == 20
    base_colours = {c.split()[0] for c in base.classnames}
    assert len(base_colours) >= 3  # the fixed class shuffle spreads colours over base and novel
    shots = few_shot_split(base, 4, seed=1, store=ArtifactStore(tmp_path))
    assert len(shots.train) == 80 and len(shots.val) == 80
    fewer_val = few_shot_split(base, 4, seed=1, store=ArtifactStore(tmp_path), val_k=2)
    assert fewer_val.train == shots.train and len(fewer_val.val) == 40 and set(fewer_val.val) <= set(base.val)
    assert few_shot_split(base, 4, seed=1, store=ArtifactStore(tmp_path), val_k=4).val == shots.val  # the default
    assert few_shot_split(base, 4, seed=1, val_k=0).val == []  # no validation images, as asked
    with pytest.raises(ConfigError):
        build_dataset("toy_shapes", tmp_path, n_train=0)

"""CoOp-format, ImageNet, FGVCAircraft and ImageFolder loaders on generated fixtures, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from caspl.data import build_dataset, list_datasets, load_image
from caspl.errors import ConfigError, DataError

PETS = ["abyssinian", "american bulldog", "beagle"]


def write_image(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), (value, 255 - value, 7)).save(path)


def make_pets(root: Path, per_split: dict[str, int] | None = None) -> Path:
    folder = root / "oxford_pets"
    split: dict[str, list] = {}
    for name, n in (per_split or {"train": 4, "val": 2, "test": 3}).items():
        split[name] = []
        for label, cname in enumerate(PETS):
            for i in range(n):
                rel = f"{cname.replace(' ', '_')}_{name}_{i}.jpg"
                write_image(folder / "images" / rel, 10 * label + i)
                split[name].append([rel, label, cname])
    (folder / "annotations").mkdir()
    (folder / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return folder


def make_imagenet(root: Path, counts: dict[str, int]) -> Path:
    folder = root / "imagenet"
    names = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}
    (folder / "images" / "train").mkdir(parents=True)
    for wnid, n in counts.items():
        (folder / "images" / "train" / wnid).mkdir()
        for i in range(n):
            write_image(folder / "images" / "train" / wnid / f"{wnid}_{i}.JPEG", i)
        for i in range(2):
            write_image(folder / "images" / "val" / wnid / f"ILSVRC2012_val_{wnid}_{i}.JPEG", i)
    (folder / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in names.items()))
    return folder


# ------------------------------------------------------------------------------------------------ CoOp split file
def test_oxford_pets_layout_loads(tmp_path):
    folder = make_pets(tmp_path)
    ds = build_dataset("oxford_pets", tmp_path)
    assert ds.name == "oxford_pets" and ds.root == str(folder)
    assert ds.classnames == PETS
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 6, 9)
    assert ds.template == "a photo of a {}, a type of pet."
    assert ds.templates[0] == ds.template and len(ds.templates) >= 8
    first = ds.train[0]
    assert Path(first.path).is_absolute() and Path(first.path).parent == folder / "images"
    assert (first.label, first.classname) == (0, "abyssinian")
    assert load_image(ds.test[-1].path).size == (6, 6)
    assert build_dataset("OxfordPets", folder).train == ds.train  # an alias, and the dataset folder as root


def test_every_coop_dataset_is_registered():
    names = set(list_datasets())
    coop = {"imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
            "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"}
    assert coop | {"imagefolder", "toy_shapes", "toy_sketch", "toy_textures"} <= names


def test_missing_root_and_split_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"oxford_pets: dataset folder not found.*DATASETS.md"):
        build_dataset("oxford_pets", tmp_path)
    folder = make_pets(tmp_path)
    (folder / "split_zhou_OxfordPets.json").unlink()
    with pytest.raises(DataError, match=r"split_zhou_OxfordPets.json: split file not found"):
        build_dataset("oxford_pets", tmp_path)
    (tmp_path / "dtd").mkdir()
    with pytest.raises(DataError, match=r"split_zhou_DescribableTextures.json"):
        build_dataset("dtd", tmp_path)


def test_split_file_problems_are_one_line_errors(tmp_path):
    folder = make_pets(tmp_path)
    split_path = folder / "split_zhou_OxfordPets.json"
    split = json.loads(split_path.read_text())
    split_path.write_text(json.dumps({**split, "train": [e for e in split["train"] if e[1] != 1]}))
    with pytest.raises(DataError, match=r"class 1 'american bulldog' has no training images") as err:
        build_dataset("oxford_pets", tmp_path)
    assert "\n" not in str(err.value) and str(split_path) in str(err.value)
    split_path.write_text(json.dumps({"train": []}))
    with pytest.raises(DataError, match="not a CoOp split file"):
        build_dataset("oxford_pets", tmp_path)
    split_path.write_text(json.dumps(split))
    (folder / "images" / split["test"][0][0]).unlink()
    with pytest.raises(DataError, match=r"is missing.*do not match the split file"):
        build_dataset("oxford_pets", tmp_path)


def test_fgvc_aircraft_variant_lists(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Boeing 717"]
    folder.mkdir()
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        lines = []
        for label, variant in enumerate(variants):
            for i in range(n):
                image_id = f"{label}{i}{split}"
                write_image(folder / "images" / f"{image_id}.jpg")
                lines.append(f"{image_id} {variant}")
        (folder / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    ds = build_dataset("fgvc_aircraft", tmp_path)
    assert ds.classnames == variants and len(ds.train) == 6
    assert ds.train[-1].classname == "Boeing 717" and ds.train[-1].label == 2
    assert ds.template == "a photo of a {}, a type of aircraft."
    (folder / "images_variant_val.txt").write_text("0 Concorde\n")
    with pytest.raises(DataError, match=r"images_variant_val.txt:1: variant 'Concorde'"):
        build_dataset("fgvc_aircraft", tmp_path)


# ------------------------------------------------------------------------------------------------------ ImageNet
def test_imagenet_layout_loads_with_val_carved_from_train(tmp_path):
    make_imagenet(tmp_path, {"n01484850": 10, "n01440764": 5, "n01443537": 6})
    ds = build_dataset("imagenet", tmp_path)
    assert ds.classnames == ["tench", "goldfish", "great white shark"]  # sorted wnids, names with spaces
    assert len(ds.test) == 6 and all("/images/val/" in it.path for it in ds.test)
    assert len(ds.train) + len(ds.val) == 21
    assert {it.label for it in ds.val} == {0, 1, 2}
    assert not {it.path for it in ds.train} & {it.path for it in ds.val}
    assert all("/images/train/" in it.path for it in ds.val)
    shark = [it for it in ds.train if it.label == 2]
    assert shark[0].classname == "great white shark" and "n01484850" in shark[0].path
    assert build_dataset("imagenet", tmp_path).val == ds.val  # deterministic carve-out


def test_imagenet_errors(tmp_path):
    folder = make_imagenet(tmp_path, {"n01440764": 3, "n01443537": 0})
    with pytest.raises(DataError, match=r"n01443537: class folder has no images"):
        build_dataset("imagenet", tmp_path)
    (folder / "classnames.txt").unlink()
    with pytest.raises(DataError, match=r"classnames.txt: file not found"):
        build_dataset("imagenet", tmp_path)
    with pytest.raises(DataError, match=r"imagenet: dataset folder not found"):
        build_dataset("imagenet", tmp_path / "elsewhere")


# --------------------------------------------------------------------------------------------------- ImageFolder
def make_folder(root: Path, classes: dict[str, int]) -> Path:
    for cname, n in classes.items():
        (root / cname).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_image(root / cname / f"{i}.png", i)
    return root


def test_imagefolder_flat_split_by_seed(tmp_path):
    root = make_folder(tmp_path / "mine", {"red_apple": 10, "pear": 5, "kiwi": 3})
    (root / "notes.txt").write_text("ignored")
    ds = build_dataset("imagefolder", root, template="a photo of a {}, a fruit.")
    assert ds.classnames == ["kiwi", "pear", "red apple"] and ds.name == "mine"
    counts = {split: [sum(it.label == c for it in getattr(ds, split)) for c in range(3)]
              for split in ("train", "val", "test")}
    assert counts == {"train": [1, 3, 6], "val": [1, 1, 2], "test": [1, 1, 2]}
    every = [it.path for s in (ds.train, ds.val, ds.test) for it in s]
    assert len(every) == len(set(every)) == 18
    assert build_dataset("imagefolder", root, template="a photo of a {}, a fruit.").train == ds.train
    assert build_dataset("imagefolder", root, seed=1).train != ds.train
    assert ds.templates[0] == "a photo of a {}, a fruit."


def test_imagefolder_split_folders(tmp_path):
    make_folder(tmp_path / "train", {"cat": 5, "dog": 5})
    make_folder(tmp_path / "test", {"cat": 2, "dog": 2})
    ds = build_dataset("imagefolder", tmp_path)
    assert ds.classnames == ["cat", "dog"]
    assert len(ds.test) == 4 and all("/test/" in it.path for it in ds.test)
    assert (len(ds.train), len(ds.val)) == (8, 2)  # val carved from train: 1 of 5 per class
    make_folder(tmp_path / "val", {"cat": 1, "dog": 1})
    ds = build_dataset("imagefolder", tmp_path)
    assert (len(ds.train), len(ds.val)) == (10, 2) and all("/val/" in it.path for it in ds.val)
    make_folder(tmp_path / "val", {"bird": 1})
    with pytest.raises(DataError, match=r"val/bird: class folder absent"):
        build_dataset("imagefolder", tmp_path)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: dataset folder not found"):
        build_dataset("imagefolder", tmp_path / "nowhere")
    root = make_folder(tmp_path / "data", {"a": 4, "b": 0})
    with pytest.raises(DataError, match=r"data/b: class has no images"):
        build_dataset("imagefolder", root)
    make_folder(root, {"b": 2})
    with pytest.raises(DataError, match=r"data/b: 2 image\(s\)"):
        build_dataset("imagefolder", root)
    make_folder(root, {"b": 3})
    with pytest.raises(DataError, match="has no '{}'"):
        build_dataset("imagefolder", root, template="a photo")


def test_registry_errors(tmp_path):
    with pytest.raises(DataError, match=r"unknown dataset 'pets2'; available: .*oxford_pets"):
        build_dataset("pets2", tmp_path)
    with pytest.raises(ConfigError, match=r"imagefolder.*accepted options"):
        build_dataset("imagefolder", tmp_path, colour="red")

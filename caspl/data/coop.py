"""The 11 CoOp benchmark datasets, read from their usual on-disk layout (CoOp's DATASETS.md).

`root` is the folder that holds the dataset folders (`$DATA`: `<root>/oxford_pets/`, `<root>/imagenet/`, ...);
passing a dataset's own folder works too. Nine datasets ship a `split_zhou_<Name>.json` whose "train", "val" and
"test" entries are `[image path relative to the images folder, label, classname]`; FGVCAircraft uses its own
`images_variant_*.txt` lists and ImageNet its `images/{train,val}/<wnid>/` folders plus `classnames.txt`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from caspl.data.base import Dataset, Item, list_images
from caspl.data.registry import register_dataset
from caspl.errors import DataError

SPLITS = ("train", "val", "test")

# Generic CLIP templates; each dataset's bank is its own template followed by these (PromptSRC averages a bank).
GENERIC_TEMPLATES = (
    "a photo of a {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def template_bank(template: str, extra: tuple[str, ...] = GENERIC_TEMPLATES) -> list[str]:
    return [template] + [t for t in extra if t != template]


@dataclass(frozen=True)
class CoopSpec:
    name: str  # registered name
    display: str  # CoOp's class name, as in split_zhou_<display>.json
    folder: str  # folder under root
    images: str  # image folder inside it that split paths are relative to ("" = the folder itself)
    template: str
    split_file: str = ""  # default split_zhou_<display>.json
    templates: tuple[str, ...] = ()  # default template_bank(template)

    @property
    def split_name(self) -> str:
        return self.split_file or f"split_zhou_{self.display}.json"

    @property
    def bank(self) -> list[str]:
        return list(self.templates) if self.templates else template_bank(self.template)


def dataset_dir(root: str | Path | None, spec: CoopSpec, marker: str) -> Path:
    """`<root>/<folder>`, or `root` itself when it already is the dataset folder (holds `marker`)."""
    if root is None:
        raise DataError(
            f"{spec.display}: no data root given; set the dataset root to the folder holding '{spec.folder}/'"
        )
    base = Path(root).expanduser().resolve()
    if not (base / spec.folder).is_dir() and (base / marker).exists():
        return base
    folder = base / spec.folder
    if not folder.is_dir():
        raise DataError(
            f"{folder}: dataset folder not found; install {spec.display} there as in CoOp's DATASETS.md "
            f"or point the root at the folder that contains '{spec.folder}/'"
        )
    return folder


# ------------------------------------------------------------------------------------------ split_zhou json files
def read_split_file(split_path: Path, image_dir: Path) -> dict[str, list[Item]]:
    """The three splits of a CoOp split file, with absolute image paths."""
    if not split_path.is_file():
        raise DataError(
            f"{split_path}: split file not found; download {split_path.name} (links in CoOp's DATASETS.md) into "
            f"{split_path.parent}"
        )
    try:
        raw = json.loads(split_path.read_text())
        return {s: [_item(image_dir, entry) for entry in raw[s]] for s in SPLITS}
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{split_path}: not a CoOp split file ({type(exc).__name__}: {exc}); expected keys "
            f"'train', 'val', 'test' holding [path, label, classname] lists; re-download it"
        ) from None


def _item(image_dir: Path, entry: list) -> Item:
    rel, label, classname = entry
    return Item(os.path.normpath(os.path.join(image_dir, rel)), int(label), str(classname))


def classnames_from(splits: dict[str, list[Item]], source: Path) -> list[str]:
    """Class names indexed by label; every label 0..C-1 must name one class and have training images."""
    names: dict[int, str] = {}
    for items in splits.values():
        for it in items:
            if names.setdefault(it.label, it.classname) != it.classname:
                raise DataError(
                    f"{source}: label {it.label} is both {names[it.label]!r} and {it.classname!r}; fix the split file"
                )
    if not names:
        raise DataError(f"{source}: no images listed; re-download or regenerate it")
    if min(names) < 0:
        raise DataError(f"{source}: negative label {min(names)}; labels must be 0..C-1")
    trained = {it.label for it in splits["train"]}
    for label in range(max(names) + 1):
        if label not in trained:
            what = repr(names[label]) if label in names else "(no name)"
            raise DataError(f"{source}: class {label} {what} has no training images; fix or re-download the split")
    return [names[label] for label in range(max(names) + 1)]


def check_images_exist(splits: dict[str, list[Item]], image_dir: Path, source: Path) -> None:
    """A cheap spot check (first image of each split) that the images folder matches the split file."""
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder not found; extract the images there (CoOp's DATASETS.md)")
    for split, items in splits.items():
        if items and not os.path.isfile(items[0].path):
            raise DataError(
                f"{items[0].path}: image listed in {source.name} ({split}) is missing; "
                f"the images under {image_dir} do not match the split file"
            )


def load_coop_dataset(root: str | Path | None, spec: CoopSpec) -> Dataset:
    """Any dataset in the CoOp split-file layout: `<root>/<folder>/<images>/...` + `<root>/<folder>/<split file>`."""
    folder = dataset_dir(root, spec, spec.split_name)
    image_dir = folder / spec.images if spec.images else folder
    split_path = folder / spec.split_name
    splits = read_split_file(split_path, image_dir)
    classnames = classnames_from(splits, split_path)
    check_images_exist(splits, image_dir, split_path)
    return Dataset(
        name=spec.name,
        classnames=classnames,
        template=spec.template,
        templates=spec.bank,
        root=str(folder),
        **splits,
    )


SPLIT_FILE_DATASETS = (
    CoopSpec("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories", "a photo of a {}."),
    CoopSpec("oxford_pets", "OxfordPets", "oxford_pets", "images", "a photo of a {}, a type of pet."),
    CoopSpec("stanford_cars", "StanfordCars", "stanford_cars", "", "a photo of a {}."),
    CoopSpec("oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg", "a photo of a {}, a type of flower."),
    CoopSpec("food101", "Food101", "food-101", "images", "a photo of {}, a type of food."),
    CoopSpec("sun397", "SUN397", "sun397", "SUN397", "a photo of a {}."),
    CoopSpec("dtd", "DescribableTextures", "dtd", "images", "{} texture."),
    CoopSpec("eurosat", "EuroSAT", "eurosat", "2750", "a centered satellite photo of {}."),
    CoopSpec("ucf101", "UCF101", "ucf101", "UCF-101-midframes", "a photo of a person doing {}."),
)
_ALIASES = {
    "caltech101": ("caltech_101",),
    "oxford_pets": ("oxfordpets", "pets"),
    "stanford_cars": ("stanfordcars", "cars"),
    "oxford_flowers": ("oxfordflowers", "flowers102", "flowers"),
    "food101": ("food_101",),
    "dtd": ("describabletextures",),
    "fgvc_aircraft": ("fgvcaircraft", "aircraft"),
}


def _split_file_builder(spec: CoopSpec) -> Callable[[str | Path | None], Dataset]:
    def build(root: str | Path | None) -> Dataset:
        return load_coop_dataset(root, spec)

    build.__name__ = f"build_{spec.name}"
    return build


for _spec in SPLIT_FILE_DATASETS:
    register_dataset(_spec.name, *_ALIASES.get(_spec.name, ()))(_split_file_builder(_spec))


# ------------------------------------------------------------------------------------------------- FGVCAircraft
FGVC = CoopSpec("fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", "images", "a photo of a {}, a type of aircraft.")


@register_dataset("fgvc_aircraft", *_ALIASES["fgvc_aircraft"])
def build_fgvc_aircraft(root: str | Path | None) -> Dataset:
    """`variants.txt` (one class per line) and `images_variant_{train,val,test}.txt` ("<image id> <variant>")."""
    folder = dataset_dir(root, FGVC, "variants.txt")
    classnames = [line.strip() for line in _read_lines(folder / "variants.txt") if line.strip()]
    label_of = {name: i for i, name in enumerate(classnames)}
    image_dir = folder / FGVC.images
    splits = {s: _read_variant_list(folder / f"images_variant_{s}.txt", image_dir, label_of) for s in SPLITS}
    classnames_from(splits, folder / "images_variant_train.txt")
    check_images_exist(splits, image_dir, folder / "images_variant_train.txt")
    return Dataset(name=FGVC.name, classnames=classnames, template=FGVC.template, templates=FGVC.bank,
                   root=str(folder), **splits)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: file not found; install FGVCAircraft's data/ folder there (CoOp's DATASETS.md)")
    return path.read_text().splitlines()


def _read_variant_list(path: Path, image_dir: Path, label_of: dict[str, int]) -> list[Item]:
    items = []
    for number, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        image_id, _, variant = line.strip().partition(" ")
        if variant not in label_of:
            raise DataError(f"{path}:{number}: variant {variant!r} is not in variants.txt; re-extract the dataset")
        items.append(Item(str(image_dir / f"{image_id}.jpg"), label_of[variant], variant))
    return items


# ----------------------------------------------------------------------------------------------------- ImageNet
IMAGENET = CoopSpec("imagenet", "ImageNet", "imagenet", "images", "a photo of a {}.")
IMAGENET_VAL_SEED = 0  # fixed: the train/val carve-out must not change with the experiment seed
CLASSNAMES_FILE = "classnames.txt"


@register_dataset("imagenet")
def build_imagenet(root: str | Path | None, val_per_class: int = 10) -> Dataset:
    """`images/train/<wnid>/` (train, minus a fixed per-class val carve-out) and `images/val/<wnid>/` (test).

    Labels follow the sorted wnid folders of images/train; names come from `classnames.txt` ("wnid name").
    """
    folder = dataset_dir(root, IMAGENET, CLASSNAMES_FILE)
    names = read_imagenet_classnames(folder / CLASSNAMES_FILE)
    train_dir, test_dir = folder / "images" / "train", folder / "images" / "val"
    wnids = imagenet_class_folders(train_dir)
    missing = [w for w in wnids if not names.get(w)]
    if missing:
        raise DataError(f"{folder / CLASSNAMES_FILE}: no name for {missing[0]} (+{len(missing) - 1} more); "
                        "use the classnames.txt linked in CoOp's DATASETS.md")
    extra = sorted(set(imagenet_class_folders(test_dir)) - set(wnids))
    if extra:
        raise DataError(f"{test_dir / extra[0]}: class folder absent from {train_dir}; both must hold the same wnids")
    train, val, test = [], [], []
    for label, wnid in enumerate(wnids):
        paths = nonempty_images(train_dir / wnid)
        n_val = min(val_per_class, max(1, len(paths) // 5)) if len(paths) > 1 else 0
        order = np.random.default_rng([IMAGENET_VAL_SEED, label]).permutation(len(paths))
        held = set(order[:n_val].tolist())
        for i, path in enumerate(paths):
            (val if i in held else train).append(Item(path, label, names[wnid]))
        test_folder = test_dir / wnid
        if test_folder.is_dir():
            test += [Item(path, label, names[wnid]) for path in list_images(test_folder)]
    return Dataset(name=IMAGENET.name, classnames=[names[w] for w in wnids], template=IMAGENET.template,
                   templates=IMAGENET.bank, root=str(folder), train=train, val=val, test=test)


def read_imagenet_classnames(
    path: Path, fix: str = "download classnames.txt (link in CoOp's DATASETS.md) there"
) -> dict[str, str]:
    """`classnames.txt` ("<wnid> <class name>" per line) as {wnid: name}, in file order; `fix` ends the error."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; {fix}")
    names = {}
    for line in path.read_text().splitlines():
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            names[wnid] = name.strip()
    return names


def imagenet_class_folders(split_dir: Path, what: str = "the ImageNet images") -> list[str]:
    """Sorted names of the (non-hidden) class folders in `split_dir`; DataError when there are none."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: folder not found; extract {what} there (CoOp's DATASETS.md)")
    folders = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise DataError(f"{split_dir}: no class folders; extract {what} there (CoOp's DATASETS.md)")
    return folders


def nonempty_images(folder: Path) -> list[str]:
    """The images of one class folder; DataError when it has none."""
    paths = list_images(folder)
    if not paths:
        raise DataError(f"{folder}: class folder has no images; add its images or remove the folder")
    return paths

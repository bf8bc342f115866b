"""A custom dataset from class folders: `root/<class>/<images>` or `root/{train,val,test}/<class>/<images>`.

Without split folders each class is split by seed (default 60/20/20). With them, `train/` and `test/` are
required and a missing `val/` is carved out of train (20% per class). Class ids follow the sorted folder names;
a class name is its folder name with underscores read as spaces.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from caspl.data.base import Dataset, Item, list_images
from caspl.data.coop import template_bank
from caspl.data.registry import register_dataset
from caspl.errors import DataError

Fractions = tuple[float, float, float]


@register_dataset("imagefolder", "image_folder")
def build_imagefolder(
    root: str | Path | None,
    template: str = "a photo of a {}.",
    templates: list[str] | None = None,
    name: str | None = None,
    seed: int = 0,
    split: Fractions = (0.6, 0.2, 0.2),
) -> Dataset:
    folder = _existing_root(root)
    if "{}" not in template:
        raise DataError(f"{folder}: template {template!r} has no '{{}}' for the class name")
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        train_dir = folder / "train"
        classes = _class_folders(train_dir)
        train, val, test = _read_split_folders(folder, classes, seed)
    else:
        classes = _class_folders(folder)
        train, val, test = _split_by_seed(folder, classes, seed, split)
    return Dataset(
        name=name or folder.name,
        classnames=[c.replace("_", " ") for c in classes],
        template=template,
        templates=list(templates) if templates else template_bank(template),
        train=train,
        val=val,
        test=test,
        root=str(folder),
    )


def _existing_root(root: str | Path | None) -> Path:
    if root is None:
        raise DataError("imagefolder: no root given; set the dataset root to a folder of class folders")
    folder = Path(root).expanduser().resolve()
    if not folder.is_dir():
        raise DataError(f"{folder}: dataset folder not found; create it with one sub-folder of images per class")
    return folder


def _class_folders(folder: Path) -> list[str]:
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{folder}: no class folders; put each class's images in {folder}/<class name>/")
    return classes


def _images(folder: Path) -> list[str]:
    paths = list_images(folder) if folder.is_dir() else []
    if not paths:
        raise DataError(f"{folder}: class has no images; add images or remove the class folder")
    return paths


def _split_by_seed(folder: Path, classes: list[str], seed: int, fractions: Fractions) -> tuple[list, list, list]:
    train, val, test = [], [], []
    for label, cls in enumerate(classes):
        paths = _images(folder / cls)
        if len(paths) < 3:
            raise DataError(f"{folder / cls}: {len(paths)} image(s); a class needs at least 3 to split train/val/test")
        n_train, n_val = _counts(len(paths), fractions)
        order = np.random.default_rng([int(seed) & 0xFFFFFFFF, label]).permutation(len(paths))
        picked = [Item(paths[i], label, cls.replace("_", " ")) for i in order]
        train += picked[:n_train]
        val += picked[n_train : n_train + n_val]
        test += picked[n_train + n_val :]
    return train, val, test


def _counts(n: int, fractions: Fractions) -> tuple[int, int]:
    """Train and val counts for n images; every split keeps at least one."""
    total = sum(fractions)
    n_val = min(max(1, round(n * fractions[1] / total)), n - 2)
    n_test = min(max(1, round(n * fractions[2] / total)), n - 1 - n_val)
    return n - n_val - n_test, n_val


def _read_split_folders(folder: Path, classes: list[str], seed: int) -> tuple[list, list, list]:
    label_of = {cls: i for i, cls in enumerate(classes)}
    splits: dict[str, list[Item]] = {}
    for split in ("train", "val", "test"):
        split_dir = folder / split
        if not split_dir.is_dir():
            continue
        unknown = [c for c in _class_folders(split_dir) if c not in label_of]
        if unknown:
            raise DataError(f"{split_dir / unknown[0]}: class folder absent from {folder / 'train'}; rename/remove it")
        splits[split] = []
        for cls in classes:
            if split == "train" or (split_dir / cls).is_dir():
                paths = _images(split_dir / cls)
                splits[split] += [Item(p, label_of[cls], cls.replace("_", " ")) for p in paths]
    if "val" not in splits:
        splits["train"], splits["val"] = _carve_val(splits["train"], seed)
    return splits["train"], splits["val"], splits["test"]


def _carve_val(train: list[Item], seed: int, fraction: float = 0.2) -> tuple[list[Item], list[Item]]:
    by_label: dict[int, list[int]] = {}
    for i, item in enumerate(train):
        by_label.setdefault(item.label, []).append(i)
    held: set[int] = set()
    for label, indices in by_label.items():
        n_val = min(max(1, round(len(indices) * fraction)), len(indices) - 1)
        order = np.random.default_rng([int(seed) & 0xFFFFFFFF, label]).permutation(len(indices))
        held.update(indices[j] for j in order[:n_val])
    return [it for i, it in enumerate(train) if i not in held], [it for i, it in enumerate(train) if i in held]

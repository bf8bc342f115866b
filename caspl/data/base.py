"""The dataset API: items, datasets, base/novel subsets (DESIGN §2.4) and cached few-shot splits."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
from PIL import Image

from caspl.artifacts import ArtifactStore, atomic_write_text, content_key
from caspl.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
FEWSHOT_KIND = "fewshot"
FEWSHOT_VERSION = 1  # bump when the selection rule changes, so old cached selections are not reused
SELECTION_FILE = "selection.json"

Subset = Literal["all", "base", "novel"]


@dataclass(frozen=True)
class Item:
    path: str  # absolute image path
    label: int
    classname: str


@dataclass(kw_only=True)
class Dataset:
    name: str
    classnames: list[str]
    template: str  # e.g. "a photo of a {}, a type of pet."
    templates: list[str] = field(default_factory=list)  # template bank (PromptSRC); defaults to [template]
    train: list[Item]
    val: list[Item]
    test: list[Item]
    root: str  # the dataset's own folder
    test_only: bool = False  # an evaluation-only set (e.g. ImageNet-A): empty train/val, training on it is an error

    def __post_init__(self) -> None:
        if not self.templates:
            self.templates = [self.template]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, template: str | None = None) -> list[str]:
        """The class prompts of `template` (default: the dataset's own), one per class."""
        return [(template or self.template).format(name) for name in self.classnames]


def check_trainable(dataset: Dataset) -> None:
    """DataError when `dataset` is test-only (it has no train/val split to train or boost on)."""
    if dataset.test_only:
        raise DataError(
            f"{dataset.name} ({dataset.root}) is a test-only dataset with no train/val split; train on its source "
            f"dataset (e.g. imagenet) and list {dataset.name} under targets: (caspl eval --protocol dg)"
        )


def is_image_file(path: str | Path) -> bool:
    name = os.path.basename(str(path))
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: str | Path) -> list[str]:
    """Sorted absolute paths of the image files directly inside `folder` (hidden files skipped)."""
    with os.scandir(folder) as entries:
        return sorted(os.path.abspath(e.path) for e in entries if e.is_file() and is_image_file(e.name))


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, fully decoded; DataError when it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: image not found; check the dataset root and its split file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: unreadable image ({exc}); re-download it or remove it from the split") from None


# --------------------------------------------------------------------------------------------------- base / novel
def subsample_classes(dataset: Dataset, which: Subset | str) -> Dataset:
    """DESIGN §2.4: sorted class ids, base = first ceil(C/2), novel = the rest, each relabelled from 0."""
    if which == "all":
        return dataset
    if which not in ("base", "novel", "new"):
        raise ValueError(f"subsample must be 'all', 'base' or 'novel', got {which!r}")
    labels = list(range(dataset.num_classes))  # labels are 0..C-1 by construction, already sorted
    cut = math.ceil(len(labels) / 2)
    selected = labels[:cut] if which == "base" else labels[cut:]
    relabel = {old: new for new, old in enumerate(selected)}

    def keep(items: list[Item]) -> list[Item]:
        return [replace(it, label=relabel[it.label]) for it in items if it.label in relabel]

    return replace(
        dataset,
        classnames=[dataset.classnames[i] for i in selected],
        templates=list(dataset.templates),
        train=keep(dataset.train),
        val=keep(dataset.val),
        test=keep(dataset.test),
    )


def pseudo_novel_split(dataset: Dataset, seed: int) -> Dataset:
    """The base classes alone, in a seeded order, as a base-to-novel task of their own (for a study's objective).

    Its base half ("pseudo-base") is what adapting trains on during a search and its novel half ("pseudo-novel") plays
    the unseen classes, so scoring HM on its validation images uses no image or label of a real novel class. Its test
    split is empty: a search never reads test images. The name records the rule, so cached few-shot selections and
    adapting runs of the pseudo task never collide with the real task's.
    """
    base = subsample_classes(dataset, "base")
    order = np.random.default_rng([int(seed) & 0xFFFFFFFF, base.num_classes]).permutation(base.num_classes).tolist()
    relabel = {old: new for new, old in enumerate(order)}

    def keep(items: list[Item]) -> list[Item]:
        return [replace(it, label=relabel[it.label]) for it in items]

    return replace(base, name=f"{dataset.name}~pseudo{seed}", classnames=[base.classnames[i] for i in order],
                   templates=list(base.templates), train=keep(base.train), val=keep(base.val), test=[])


# ------------------------------------------------------------------------------------------------------ few-shot
def few_shot(items: Sequence[Item], k: int, seed: int) -> list[Item]:
    """k items per class (all of a class with fewer, with a warning), in the input order.

    Each class draws from its own generator seeded by (seed, label), so one class's selection does not
    depend on which other classes are present.
    """
    if k < 1:
        raise ValueError(f"few-shot k must be >= 1, got {k}")
    by_label: dict[int, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_label[item.label].append(index)
    chosen: list[int] = []
    short = []
    for label in sorted(by_label):
        indices = by_label[label]
        if len(indices) <= k:
            short += [label] if len(indices) < k else []
            chosen += indices
            continue
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, label])
        chosen += [indices[i] for i in rng.choice(len(indices), size=k, replace=False)]
    if short:
        warnings.warn(
            f"few-shot k={k}: {len(short)} class(es) have fewer images and keep all of them "
            f"(labels {short[:10]}{' ...' if len(short) > 10 else ''})",
            stacklevel=2,
        )
    return [items[i] for i in sorted(chosen)]


def _canonical(items: Iterable[Item]) -> list[Item]:
    return sorted(items, key=lambda it: (it.path, it.label))


def few_shot_split(dataset: Dataset, k: int, seed: int, store: ArtifactStore | None = None, *,
                   val_k: int | None = None) -> Dataset:
    """`dataset` with a k-shot train and a `val_k`-shot val (default: the paper's min(k, 4)); test untouched.

    The selection is a function of the (sorted) item lists, k, val_k and seed only; with a store it is cached under
    kind "fewshot", outside the dataset folder, built once even by concurrent processes. `val_k=0` keeps no
    validation images. A test-only dataset is a DataError: a few-shot split is what training reads.
    """
    check_trainable(dataset)
    train, val = _canonical(dataset.train), _canonical(dataset.val)
    val_k = min(k, 4) if val_k is None else val_k
    if store is None:
        picked = {"train": few_shot(train, k, seed), "val": few_shot(val, val_k, seed) if val_k else []}
        return replace(dataset, train=picked["train"], val=picked["val"], templates=list(dataset.templates))

    pairs = {s: [[it.path, it.label] for it in items] for s, items in (("train", train), ("val", val))}
    key = content_key("fewshot", FEWSHOT_VERSION, dataset.name, pairs, int(k), int(seed),
                      *([] if val_k == min(k, 4) else [int(val_k)]))  # the paper's default keeps its old key

    def build(folder: Path) -> dict:
        selection = {
            "train": [[it.path, it.label] for it in few_shot(train, k, seed)],
            "val": [[it.path, it.label] for it in few_shot(val, val_k, seed)] if val_k else [],
        }
        atomic_write_text(folder / SELECTION_FILE, json.dumps(selection))
        return {"dataset": dataset.name, "k": int(k), "val_k": val_k, "seed": int(seed)}

    folder = store.get_or_build(FEWSHOT_KIND, key, build, log=None)
    selection = json.loads((folder / SELECTION_FILE).read_text())
    lookup = {(it.path, it.label): it for it in (*train, *val)}
    try:
        picked = {s: [lookup[(p, int(y))] for p, y in selection[s]] for s in ("train", "val")}
    except KeyError as exc:  # only a hand-edited cache can get here: the key hashes the item lists
        raise DataError(f"{folder}: cached few-shot selection names {exc}, not in {dataset.name}; delete it") from None
    return replace(dataset, train=picked["train"], val=picked["val"], templates=list(dataset.templates))


def class_counts(items: Iterable[Item]) -> dict[int, int]:
    counts: dict[int, int] = defaultdict(int)
    for item in items:
        counts[item.label] += 1
    return dict(counts)

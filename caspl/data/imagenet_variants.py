"""ImageNet's domain-shifted test sets in CoOp's layouts (DATASETS.md): ImageNet-V2, -Sketch, -A and -R.

`root` is the folder that holds the dataset folders (`$DATA`), or the dataset's own folder. Each dataset folder holds
a copy of ImageNet's `classnames.txt` ("<wnid> <class name>" per line, CoOp's file) and one folder of images per class:

    imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/   folder k = line k of classnames.txt
    imagenet-sketch/images/<wnid>/                                  1,000 classes
    imagenet-adversarial/imagenet-a/<wnid>/                         200 classes (README.txt beside them is ignored)
    imagenet-rendition/imagenet-r/<wnid>/                           200 classes

All four are test-only: their images are the `test` split, `train` and `val` are empty, and training or boosting on
them is a DataError. Labels are 0..C-1 over the dataset's own classes (sorted wnid folders; V2: folder index order),
and every class keeps the ImageNet class it stands for (`ImageNetVariant.imagenet_classes`: wnid and ImageNet label =
its line in classnames.txt, which for CoOp's sorted 1,000-line file is ImageNet's class index and the label that
`imagenet` gives it when all 1,000 train folders are present).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from caspl.data.base import Dataset, Item
from caspl.data.coop import (
    CLASSNAMES_FILE,
    IMAGENET,
    CoopSpec,
    dataset_dir,
    imagenet_class_folders,
    nonempty_images,
    read_imagenet_classnames,
)
from caspl.data.registry import register_dataset
from caspl.errors import DataError

COPY_CLASSNAMES = "copy $DATA/imagenet/classnames.txt (CoOp's DATASETS.md) there"


@dataclass(frozen=True)
class ImageNetClass:
    """The ImageNet class a variant's class stands for."""

    wnid: str  # e.g. "n01440764"
    label: int  # its line (0-based) in classnames.txt: ImageNet's class index for CoOp's file
    name: str  # its class name in classnames.txt


@dataclass(kw_only=True)
class ImageNetVariant(Dataset):
    """A test-only ImageNet variant; `imagenet_classes[name]` maps each class name to its ImageNet class.

    Keyed by class name (names are unique), so the mapping stays right for any subset of `classnames`.
    """

    imagenet_classes: dict[str, ImageNetClass] = field(default_factory=dict)
    test_only: bool = True

    @property
    def wnids(self) -> list[str]:
        """The wnid of each class, indexed by this dataset's label."""
        return [self.imagenet_classes[name].wnid for name in self.classnames]

    @property
    def imagenet_labels(self) -> list[int]:
        """The ImageNet label of each class, indexed by this dataset's label."""
        return [self.imagenet_classes[name].label for name in self.classnames]


@dataclass(frozen=True)
class VariantSpec:
    spec: CoopSpec  # name, display name, dataset folder, image folder, template
    aliases: tuple[str, ...]
    indexed_folders: bool = False  # ImageNet-V2: class folders are named by ImageNet class index, not by wnid
    source: str = ""  # what to download, for error messages


def _spec(name: str, display: str, folder: str, images: str) -> CoopSpec:
    return CoopSpec(name, display, folder, images, IMAGENET.template, templates=tuple(IMAGENET.bank))


VARIANTS = (
    VariantSpec(_spec("imagenet_v2", "ImageNet-V2", "imagenetv2", "imagenetv2-matched-frequency-format-val"),
                ("imagenetv2",), indexed_folders=True, source="imagenetv2-matched-frequency.tar.gz"),
    VariantSpec(_spec("imagenet_sketch", "ImageNet-Sketch", "imagenet-sketch", "images"), ("imagenetsketch",),
                source="ImageNet-Sketch (its class folders go in images/)"),
    VariantSpec(_spec("imagenet_a", "ImageNet-A", "imagenet-adversarial", "imagenet-a"),
                ("imageneta", "imagenet_adversarial"), source="imagenet-a.tar"),
    VariantSpec(_spec("imagenet_r", "ImageNet-R", "imagenet-rendition", "imagenet-r"),
                ("imagenetr", "imagenet_rendition"), source="imagenet-r.tar"),
)


def load_imagenet_variant(root: str | Path | None, variant: VariantSpec) -> ImageNetVariant:
    """One variant from `<root>/<folder>/` (or `root` itself when it holds the image folder)."""
    spec = variant.spec
    folder = dataset_dir(root, spec, spec.images)
    image_dir = folder / spec.images
    names = read_imagenet_classnames(folder / CLASSNAMES_FILE, COPY_CLASSNAMES)
    what = f"{variant.source} ({spec.display})"
    folders = imagenet_class_folders(image_dir, what)
    pairs = _v2_classes(image_dir, folders, names) if variant.indexed_folders else [(f, f) for f in folders]
    imagenet_label = {wnid: i for i, wnid in enumerate(names)}
    classes: dict[str, ImageNetClass] = {}
    test = []
    for label, (class_folder, wnid) in enumerate(pairs):
        name = names.get(wnid)
        if not name:
            raise DataError(f"{image_dir / class_folder}: class {wnid} has no name in {folder / CLASSNAMES_FILE}; "
                            f"{COPY_CLASSNAMES}")
        if name in classes:
            raise DataError(f"{folder / CLASSNAMES_FILE}: {classes[name].wnid} and {wnid} are both named {name!r}; "
                            "class names must be unique, use CoOp's classnames.txt")
        classes[name] = ImageNetClass(wnid, imagenet_label[wnid], name)
        test += [Item(path, label, name) for path in nonempty_images(image_dir / class_folder)]
    return ImageNetVariant(name=spec.name, classnames=list(classes), template=spec.template, templates=spec.bank,
                           train=[], val=[], test=test, root=str(folder), imagenet_classes=classes)


def _v2_classes(image_dir: Path, folders: list[str], names: dict[str, str]) -> list[tuple[str, str]]:
    """(folder, wnid) of ImageNet-V2's folders `0..N-1` in index order; folder k is line k of classnames.txt."""
    folder_at: dict[int, str] = {}
    for folder in folders:
        if not folder.isdigit() or str(int(folder)) != folder:
            raise DataError(f"{image_dir / folder}: not a class index; ImageNet-V2's class folders are named 0..999 "
                            f"(extract imagenetv2-matched-frequency.tar.gz there)")
        folder_at[int(folder)] = folder
    indices = sorted(folder_at)
    wnid_at = list(names)
    beyond = [i for i in indices if i >= len(wnid_at)]
    if beyond:
        raise DataError(f"{image_dir / str(beyond[0])}: class index {beyond[0]} has no line in classnames.txt "
                        f"({len(wnid_at)} lines); {COPY_CLASSNAMES}")
    missing = sorted(set(range(len(wnid_at))) - set(indices))
    if missing:
        raise DataError(f"{image_dir / str(missing[0])}: class folder missing ({wnid_at[missing[0]]} "
                        f"{names[wnid_at[missing[0]]]!r}, +{len(missing) - 1} more); re-extract "
                        "imagenetv2-matched-frequency.tar.gz there")
    return [(folder_at[i], wnid_at[i]) for i in indices]


def _builder(variant: VariantSpec) -> Callable[[str | Path | None], Dataset]:
    def build(root: str | Path | None) -> Dataset:
        return load_imagenet_variant(root, variant)

    build.__name__ = f"build_{variant.spec.name}"
    build.__doc__ = f"{variant.spec.display}, test-only, from `<root>/{variant.spec.folder}/{variant.spec.images}/`."
    return build


for _variant in VARIANTS:
    register_dataset(_variant.spec.name, *_variant.aliases)(_builder(_variant))

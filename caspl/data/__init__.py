"""Datasets: the CoOp benchmarks, ImageNet's test-only variants (V2, Sketch, A, R), ImageFolder, ToyWorld;
base/novel subsets and few-shot splits.

Importing this package registers every dataset with `build_dataset`.
"""

from caspl.data import coop, imagefolder, imagenet_variants  # noqa: F401  (registration)
from caspl.data.base import (Dataset, Item, check_trainable, few_shot, few_shot_split, load_image, pseudo_novel_split,
                              subsample_classes)
from caspl.data.coop import GENERIC_TEMPLATES, template_bank
from caspl.data.imagenet_variants import ImageNetClass, ImageNetVariant
from caspl.data.registry import build_dataset, list_datasets, register_dataset
from caspl.data.toyworld import datasets as _toyworld_datasets  # noqa: F401  (registration)

__all__ = [
    "Dataset", "GENERIC_TEMPLATES", "ImageNetClass", "ImageNetVariant", "Item", "build_dataset", "check_trainable",
    "few_shot", "few_shot_split", "list_datasets", "load_image", "pseudo_novel_split", "register_dataset",
    "subsample_classes", "template_bank",
]

"""Datasets: the CoOp benchmarks, ImageFolder, ToyWorld; base/novel subsets and few-shot splits.

Importing this package registers every dataset with `build_dataset`.
"""

from caspl.data import coop, imagefolder  # noqa: F401  (registration)
from caspl.data.base import Dataset, Item, few_shot, few_shot_split, load_image, subsample_classes
from caspl.data.coop import GENERIC_TEMPLATES, template_bank
from caspl.data.registry import build_dataset, list_datasets, register_dataset
from caspl.data.toyworld import datasets as _toyworld_datasets  # noqa: F401  (registration)

__all__ = [
    "Dataset", "GENERIC_TEMPLATES", "Item", "build_dataset", "few_shot", "few_shot_split", "list_datasets",
    "load_image", "register_dataset", "subsample_classes", "template_bank",
]

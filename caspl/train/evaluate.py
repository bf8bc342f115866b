"""Evaluation: top-1 accuracy of a PromptedCLIP on items, base/novel/HM, with text features computed once.

Decoded evaluation tensors of small splits are kept in memory (per process) so per-epoch validation does not
decode the same images again; large splits are streamed.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator, Sequence

import torch

from caspl.data.base import Dataset, Item, load_image, subsample_classes
from caspl.data.views import ViewSpec, eval_tensor
from caspl.models.cascade import PromptedCLIP
from caspl.train.metrics import harmonic_mean

_CACHE: "OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()
_CACHE_BYTES = 512 * 2**20
_CACHE_ENTRIES = 16


def eval_batches(items: Sequence[Item], spec: ViewSpec, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of `items` preprocessed for evaluation."""
    key = (tuple((i.path, i.label) for i in items), spec)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        images, labels = _CACHE[key]
        for start in range(0, len(items), batch_size):
            yield images[start:start + batch_size], labels[start:start + batch_size]
        return
    fits = len(items) * 3 * spec.image_size**2 * 4 <= _CACHE_BYTES
    kept_images, kept_labels = [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        images = torch.stack([eval_tensor(load_image(i.path), spec) for i in chunk])
        labels = torch.tensor([i.label for i in chunk])
        if fits:
            kept_images.append(images)
            kept_labels.append(labels)
        yield images, labels
    if fits and kept_images:
        _CACHE[key] = (torch.cat(kept_images), torch.cat(kept_labels))
        while len(_CACHE) > _CACHE_ENTRIES:
            _CACHE.popitem(last=False)


@torch.no_grad()
def accuracy(model: PromptedCLIP, items: Sequence[Item], spec: ViewSpec, batch_size: int = 256) -> float:
    """Top-1 accuracy (%) of `model` on `items` against the model's current classes."""
    if not items:
        return 0.0
    was_training = model.training
    model.eval()
    text = None if model.adapt is not None and model.adapt.per_image_text else model.encode_text()
    correct = 0
    for images, labels in eval_batches(items, spec, batch_size):
        logits = model(images.to(model.device, dtype=model.clip.logit_scale.dtype), text_features=text).logits
        correct += int((logits.argmax(-1).cpu() == labels).sum())
    model.train(was_training)
    return 100.0 * correct / len(items)


def base_novel_accuracy(model: PromptedCLIP, dataset: Dataset, spec: ViewSpec, split: str = "test",
                        batch_size: int = 256) -> dict[str, float]:
    """Accuracy on the base and the novel classes (each scored among its own classes), and their HM."""
    result = {}
    for which in ("base", "novel"):
        subset = subsample_classes(dataset, which)
        model.set_classes(subset.classnames, subset.templates)
        result[which] = accuracy(model, getattr(subset, split), spec, batch_size)
    result["hm"] = harmonic_mean(result["base"], result["novel"])
    return result

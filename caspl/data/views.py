"""Deterministic augmented views: the crop and flip of view v of image i derive from (image id, v, seed).

The teacher cache computes logits for views (id, v) once; the student rebuilds the identical view later from the
same three numbers, so cached and online distillation see the same pixels.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image


@dataclass(frozen=True)
class ViewSpec:
    """How views are made: a random-resized crop (scale, ratio ranges) and a horizontal flip, then resize+normalise."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    @classmethod
    def for_model(cls, preprocess_cfg: dict, **overrides) -> "ViewSpec":
        size = preprocess_cfg["size"]
        size = size[0] if isinstance(size, (tuple, list)) else size
        return cls(int(size), tuple(preprocess_cfg["mean"]), tuple(preprocess_cfg["std"]), **overrides)


def model_view_spec(model, crop_scale: Sequence[float] = (0.08, 1.0)) -> ViewSpec:
    """Views at an open_clip model's own input size and normalisation; crops depend only on (id, view, seed)."""
    return ViewSpec.for_model(model.visual.preprocess_cfg, crop_scale=tuple(crop_scale))


def _uniforms(image_id: str, view: int, seed: int, count: int) -> np.ndarray:
    digest = hashlib.sha512(f"{image_id}|{view}|{seed}".encode()).digest()
    return np.frombuffer(digest[: 4 * count], dtype=np.uint32).astype(np.float64) / 2**32


def view_params(image_id: str, view: int, seed: int, width: int, height: int, spec: ViewSpec):
    """(top, left, h, w, flip) of a random-resized crop, torchvision's rule with hash-derived uniforms."""
    u = _uniforms(image_id, view, seed, 9)
    area = width * height
    log_ratio = (math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1]))
    for attempt in range(3):  # torchvision tries 10 times; three hash-derived tries, then the centre crop
        target = area * (spec.crop_scale[0] + u[2 * attempt] * (spec.crop_scale[1] - spec.crop_scale[0]))
        ratio = math.exp(log_ratio[0] + u[2 * attempt + 1] * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u[6] * (height - h + 1))
            left = int(u[7] * (width - w + 1))
            return top, left, h, w, bool(spec.flip and u[8] < 0.5)
    side = min(width, height)
    return (height - side) // 2, (width - side) // 2, side, side, False


def make_view(image: Image.Image, image_id: str, view: int, seed: int, spec: ViewSpec) -> torch.Tensor:
    """View `view` of `image` as a normalised float tensor [3, S, S]."""
    top, left, h, w, flip = view_params(image_id, view, seed, image.width, image.height, spec)
    out = TF.resized_crop(image, top, left, h, w, [spec.image_size, spec.image_size],
                          interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    if flip:
        out = TF.hflip(out)
    return TF.normalize(TF.to_tensor(out), spec.mean, spec.std)


def eval_tensor(image: Image.Image, spec: ViewSpec) -> torch.Tensor:
    """Resize the short side, centre-crop, normalise (CLIP's evaluation preprocessing)."""
    out = TF.center_crop(TF.resize(image, spec.image_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True),
                         [spec.image_size, spec.image_size])
    return TF.normalize(TF.to_tensor(out), spec.mean, spec.std)


def stack_views(images: Sequence[Image.Image], ids: Sequence[str], views: Sequence[int], seed: int,
                spec: ViewSpec) -> torch.Tensor:
    return torch.stack([make_view(img, i, v, seed, spec) for img, i, v in zip(images, ids, views)])

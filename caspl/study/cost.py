"""What a study costs before it runs: teacher passes, cache size on disk, FLOPs per trial, device-hours.

The count follows what the code does (see `caspl.train.boost`, `caspl.train.adapt`, `caspl.study.trial`):

- teacher cache, once per dataset: every (train image, view) through the teacher's image tower, every class name
  through its text tower; stored as float32 cosine similarities, images × views × classes × 4 bytes;
- boosting, once per distinct boosting config: per epoch every unlabeled image through the student's image tower
  with the boosting tokens, forward and backward, and per step every class through the text tower, forward and
  backward (the prompts change every step);
- adapting, per trial and seed (and once per method and seed for the method-alone baseline): per epoch the K-shot
  base images forward and backward, per step the base classes' text (per image for a method with image-dependent
  text, e.g. CoCoOp), per epoch the validation images and every class's text forward; at the end the test images.

The CLIP weights are frozen, so a backward pass computes activation gradients only: forward + backward is counted as
2 × forward (a trainable backbone would be 3 ×). Search ranges are priced at both ends: a trial costs between the
`low` and the `high` figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from caspl.models import architecture_config
from caspl.models.flops import image_flops, text_flops
from caspl.study.config import StudyConfig
from caspl.study.space import SearchSpace, range_ends, trial_configs

TRAIN_FACTOR = 2.0  # forward + backward through frozen weights, relative to a forward pass


@dataclass(frozen=True)
class DatasetSize:
    name: str
    classes: int
    train: int
    val: int
    test: int


@dataclass
class PhaseCost:
    flops: float = 0.0
    passes: int = 0  # images (or image views) through a tower

    def add(self, flops: float, passes: int = 0) -> None:
        self.flops += flops
        self.passes += passes


@dataclass
class StudyCost:
    dataset: str
    teacher: PhaseCost = field(default_factory=PhaseCost)
    cache_bytes: int = 0
    boost: dict[str, PhaseCost] = field(default_factory=dict)  # "low" / "high" end of the searched ranges
    adapt: dict[str, PhaseCost] = field(default_factory=dict)
    trials: int = 0

    def total(self, end: str) -> float:
        return self.teacher.flops + self.boost[end].flops + self.adapt[end].flops


def price_study(study: StudyConfig, space: SearchSpace, dataset: DatasetSize) -> StudyCost:
    """FLOPs of the whole study on one dataset, at the low and the high end of every searched range."""
    from caspl.config import from_dict
    from caspl.train.adapt import AdaptRunConfig
    from caspl.train.boost import BoostRunConfig

    teacher = architecture_config(study.teacher.name)
    cost = StudyCost(dataset.name, trials=study.search.num_samples * len(study.search.seeds))
    boost_cfg = from_dict(BoostRunConfig, trial_configs(study, {"method": study.methods[0]}, 1)[1], "boost")
    views = boost_cfg.cache.views
    images = _boost_images(boost_cfg.images, dataset)
    cost.teacher.add(images * views * image_flops(teacher).total + dataset.classes * text_flops(teacher).total,
                     images * views)
    cost.cache_bytes = images * views * dataset.classes * 4
    for end in ("low", "high"):
        cost.boost[end], cost.adapt[end] = PhaseCost(), PhaseCost()
        for method in study.methods:
            params = corner_params(space, method, 0 if end == "low" else -1)
            _, boost, adapt = trial_configs(study, params, study.search.seeds[0])
            boost_run, adapt_run = from_dict(BoostRunConfig, boost, "boost"), from_dict(AdaptRunConfig, adapt, "adapt")
            share = 1 / len(study.methods)  # Optuna's trials spread over the methods; priced as an even share
            trials = cost.trials * share
            _boost_cost(cost.boost[end], boost_run, dataset, images, trials)
            _adapt_cost(cost.adapt[end], adapt_run, boost_run, dataset, trials)
            if study.baselines:
                _adapt_cost(cost.adapt[end], adapt_run, None, dataset, len(study.search.seeds))
    return cost


def corner_params(space: SearchSpace, method: str, end: int) -> dict:
    """The sampled parameters of a `method` trial with every searched value at one end of its range."""
    return {"method": method, **{name: range_ends(spec)[end] for name, spec in space.params.items()
                                 if space.applies(name, method)}}


def _boost_images(which: str, dataset: DatasetSize) -> int:
    return {"train": dataset.train, "train+val": dataset.train + dataset.val, "test": dataset.test}[which]


@lru_cache(maxsize=None)
def _meta_student(name: str):
    from caspl.models.loading import meta_clip

    return meta_clip(name)


def _prompt_tokens(student: str, adapt=None, boost=None) -> tuple[int, bool]:
    """(vision prompt tokens, text depends on the image) of a cascade, read off its modules built on the meta device."""
    import torch

    from caspl.methods import build_prompted_clip

    clip, tokenizer = _meta_student(student)
    with torch.device("meta"):
        model = build_prompted_clip(clip, tokenizer, adapt, boost)
    tokens = sum(s.vision_length for s in (model.adapt, model.boost) if s is not None)
    return tokens, bool(model.adapt is not None and model.adapt.per_image_text)


def _boost_cost(phase: PhaseCost, cfg, dataset: DatasetSize, images: int, trials: float) -> None:
    student = architecture_config(cfg.student.name)
    extra, _ = _prompt_tokens(cfg.student.name, boost=cfg.method)
    epochs, steps = cfg.optim.epochs, images // cfg.optim.batch_size
    flops = TRAIN_FACTOR * (epochs * images * image_flops(student, extra).total
                            + epochs * steps * dataset.classes * text_flops(student).total)
    phase.add(trials * flops, int(trials * epochs * images))


def _adapt_cost(phase: PhaseCost, cfg, boost, dataset: DatasetSize, runs: float) -> None:
    student = architecture_config(cfg.student.name)
    extra, per_image_text = _prompt_tokens(cfg.student.name, adapt=cfg.method, boost=boost.method if boost else None)
    base = math.ceil(dataset.classes / 2) if cfg.subsample == "base" else dataset.classes
    shots = min(cfg.shots, dataset.train // max(dataset.classes, 1)) * base
    epochs, steps = cfg.optim.epochs, max(1, shots // cfg.optim.batch_size)
    text_per_step = base * (cfg.optim.batch_size if per_image_text else 1)
    image, text = image_flops(student, extra).total, text_flops(student).total
    train = TRAIN_FACTOR * epochs * (shots * image + steps * text_per_step * text)
    val_text = dataset.classes * (dataset.val if per_image_text else 1)
    validate = epochs * (dataset.val * image + val_text * text)
    test = dataset.test * image + dataset.classes * (dataset.test if per_image_text else 1) * text
    phase.add(runs * (train + validate + test), int(runs * epochs * shots))

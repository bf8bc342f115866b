"""ToyWorld downstream datasets, materialised on disk in the CoOp format and read by the CoOp loader.

Each dataset is a classification task over attribute combinations in some visual domains. It is written once
per (generator version, name, sizes, seed, image size) into the ArtifactStore (kind "toyworld_data") as

    <store>/toyworld_data/<key>/<name>/images/<class_folder>/<split>_<index>.png
    <store>/toyworld_data/<key>/<name>/split_zhou_<Display>.json

and then loaded exactly like a real CoOp dataset, with `<store>/toyworld_data/<key>` playing `$DATA`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from caspl.artifacts import ArtifactStore, atomic_write_text, content_key
from caspl.data.base import Dataset
from caspl.data.coop import CoopSpec, load_coop_dataset
from caspl.data.registry import register_dataset
from caspl.data.toyworld.render import COLOR_NAMES, GENERATOR_VERSION, VOCAB, render, sample_attributes
from caspl.errors import ConfigError

TOYWORLD_KIND = "toyworld_data"
_CAPTION_ORDER = ("size", "color", "texture", "shape")  # class names read like captions: "small red striped star"


@dataclass(frozen=True)
class ToySpec:
    name: str
    display: str  # the split file is split_zhou_<display>.json
    factors: tuple[tuple[str, tuple[str, ...]], ...]  # class-defining attributes and their values
    domains: tuple[str, ...]
    template: str
    templates: tuple[str, ...]
    nuisance: tuple[tuple[str, tuple[str, ...]], ...] = ()  # restricts the other attributes' random values
    novel_by: str | None = None  # a factor whose values novel classes never share with base classes
    noun: str = ""  # appended to attribute-only class names ("small red" -> "small red shape"): a noun phrase

    def classes(self) -> list[dict[str, str]]:
        """Every combination of the factor values, in a fixed shuffled order.

        With `novel_by` (e.g. "color"), half of that factor's values (a fixed random half) make the first half of
        the list, so the base classes (the first ceil(C/2), DESIGN §2.4) and the novel classes name different
        colours: novel classes are new concepts, as in the paper's base-to-novel split. Without it, base and novel
        both mix every value.
        """
        names = [f for f, _ in self.factors]
        combos = [dict(zip(names, values)) for values in itertools.product(*(v for _, v in self.factors))]
        rng = np.random.default_rng(zlib.crc32(self.name.encode()))
        order = rng.permutation(len(combos))
        if self.novel_by is not None:
            values = dict(self.factors)[self.novel_by]
            if len(values) % 2:
                raise ConfigError(f"{self.name}: novel_by {self.novel_by!r} needs an even number of values")
            base_values = {values[i] for i in rng.permutation(len(values))[: len(values) // 2]}
            order = sorted(order, key=lambda i: combos[i][self.novel_by] not in base_values)  # stable: keeps shuffle
        return [combos[i] for i in order]

    def coop(self) -> CoopSpec:
        return CoopSpec(self.name, self.display, self.name, "images", self.template, templates=self.templates)


def classname(combo: dict[str, str], noun: str = "") -> str:
    return " ".join([combo[a] for a in _CAPTION_ORDER if a in combo] + ([noun] if noun else []))


TOY_DATASETS: dict[str, ToySpec] = {
    spec.name: spec
    for spec in (
        ToySpec(
            "toy_shapes", "ToyShapes",
            factors=(("color", ("red", "green", "blue", "yellow", "purple")),
                     ("shape", ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon"))),
            domains=("clean", "noisy"),
            nuisance=(("texture", ("solid", "striped")),),
            template="a photo of a {}.",
            templates=("a photo of a {}.", "a picture of a {}.", "a {}.", "a noisy photo of a {}.",
                       "an image of a {}."),
        ),
        ToySpec(
            "toy_sketch", "ToySketch",
            factors=(("size", ("small", "large")),
                     ("shape", ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon",
                                "pentagon", "crescent"))),
            domains=("sketch",),
            template="a sketch of a {}.",
            templates=("a sketch of a {}.", "a drawing of a {}.", "an outline of a {}.", "a pencil sketch of a {}."),
        ),
        ToySpec(
            "toy_textures", "ToyTextures",
            factors=(("color", ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")),
                     ("texture", ("solid", "striped", "dotted", "checkered"))),
            domains=("textured", "dark"),
            nuisance=(("size", ("large",)),),
            template="{} texture.",
            templates=("{} texture.", "a photo of a {} shape.", "a {} shape on a textured background.",
                       "a {} shape on a dark background."),
        ),
        ToySpec(
            "toy_faded", "ToyFaded",
            factors=(("color", COLOR_NAMES), ("size", ("small", "large"))),
            domains=("faded",),
            novel_by="color",
            noun="shape",
            template="a faded photo of a {}.",
            templates=("a faded photo of a {}.", "a washed out photo of a {}.", "a pale {}.", "a {} in harsh light."),
        ),
        ToySpec(
            "toy_underwater", "ToyUnderwater",
            factors=(("color", COLOR_NAMES), ("texture", ("solid", "striped", "dotted", "checkered"))),
            domains=("underwater",),
            nuisance=(("size", ("large",)),),
            novel_by="color",
            noun="shape",
            template="an underwater photo of a {}.",
            templates=("an underwater photo of a {}.", "a {} under water.", "a photo of a {} in deep water.",
                       "a {} seen through water."),
        ),
        ToySpec(
            "toy_night", "ToyNight",
            factors=(("color", COLOR_NAMES), ("texture", ("solid", "checkered"))),
            domains=("dark",),
            nuisance=(("size", ("large",)),),
            novel_by="color",
            noun="shape",
            template="a dark photo of a {}.",
            templates=("a dark photo of a {}.", "a {} in the dark.", "a {} in low light.", "a dim picture of a {}."),
        ),
    )
}


def toyworld_folder(
    spec: ToySpec, store: ArtifactStore, seed: int, n_train: int, n_val: int, n_test: int, image_size: int
) -> Path:
    """The store folder that plays `$DATA` for `spec` (built once, atomically, on first use)."""
    sizes = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    key = content_key(TOYWORLD_KIND, GENERATOR_VERSION, dataclasses.asdict(spec), sizes, int(seed), int(image_size))
    return store.get_or_build(TOYWORLD_KIND, key, lambda tmp: _write(tmp, spec, sizes, seed, image_size), log=None)


def _write(tmp: Path, spec: ToySpec, sizes: dict[str, int], seed: int, image_size: int) -> dict:
    folder = tmp / spec.name
    classes = spec.classes()
    split: dict[str, list[list]] = {}
    for index, (name, per_class) in enumerate(sizes.items()):
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(spec.name.encode()), index])
        images = render(_class_attributes(rng, spec, classes, per_class, image_size))
        split[name] = []
        for i, image in enumerate(images):
            label = i // per_class
            cname = classname(classes[label], spec.noun)
            rel = f"{cname.replace(' ', '_')}/{name}_{i % per_class:04d}.png"
            (folder / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / "images" / rel, format="PNG")
            split[name].append([rel, label, cname])
    atomic_write_text(folder / spec.coop().split_name, json.dumps(split, indent=0))
    return {"dataset": spec.name, "generator_version": GENERATOR_VERSION, "seed": int(seed), **sizes}


def _class_attributes(
    rng: np.random.Generator, spec: ToySpec, classes: list[dict[str, str]], per_class: int, image_size: int
) -> dict[str, np.ndarray]:
    """per_class images of every class, class after class."""
    fixed = {
        factor: np.repeat([VOCAB[factor].index(c[factor]) for c in classes], per_class) for factor, _ in spec.factors
    }
    choices = {f"{attr}s": values for attr, values in spec.nuisance}  # "texture" -> the `textures=` argument
    n = per_class * len(classes)
    return sample_attributes(rng, n, domains=spec.domains, image_size=image_size, fixed=fixed, **choices)


def load_toyworld(
    name: str,
    root: str | Path | ArtifactStore | None = None,
    seed: int = 0,
    n_train: int = 32,
    n_val: int = 8,
    n_test: int = 30,
    image_size: int = 32,
) -> Dataset:
    """A ToyWorld dataset; `root` is the ArtifactStore (or its root folder; None = the default cache)."""
    spec = TOY_DATASETS[name]
    if min(n_train, n_test) < 1 or n_val < 0 or image_size < 8:
        raise ConfigError(
            f"{name}: need n_train >= 1, n_test >= 1, n_val >= 0, image_size >= 8; got "
            f"{n_train}, {n_test}, {n_val}, {image_size}"
        )
    store = root if isinstance(root, ArtifactStore) else ArtifactStore(root)
    data_root = toyworld_folder(spec, store, seed, n_train, n_val, n_test, image_size)
    return load_coop_dataset(data_root, spec.coop())


def _builder(name: str) -> Callable[..., Dataset]:
    build = functools.partial(load_toyworld, name)  # keeps load_toyworld's options visible to the registry
    build.__name__ = f"build_{name}"
    return build


for _name in TOY_DATASETS:
    register_dataset(_name)(_builder(_name))

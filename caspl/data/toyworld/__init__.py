"""ToyWorld: the offline procedural image-caption world (DESIGN §5)."""

from caspl.data.toyworld.datasets import TOY_DATASETS, ToySpec, load_toyworld, toyworld_folder
from caspl.data.toyworld.render import (
    COLOR_NAMES,
    DOMAINS,
    GENERATOR_VERSION,
    SHAPES,
    SIZES,
    TEXTURES,
    captions,
    render,
    sample_attributes,
)
from caspl.data.toyworld.stream import pretraining_stream

__all__ = [
    "COLOR_NAMES", "DOMAINS", "GENERATOR_VERSION", "SHAPES", "SIZES", "TEXTURES", "TOY_DATASETS", "ToySpec",
    "captions", "load_toyworld", "pretraining_stream", "render", "sample_attributes", "toyworld_folder",
]

"""open_clip loading, prompt-aware forward passes, prompt groups and the cascade."""

from caspl.models.cascade import ADAPT, BOOST, Outputs, PromptedCLIP
from caspl.models.encoders import Insert, encode_image, encode_text
from caspl.models.loading import (
    LoadedCLIP,
    ModelSpec,
    architecture_config,
    check_weight_source,
    check_weights,
    list_architectures,
    list_weight_sources,
    load_clip,
    model_identity,
    register_weight_source,
    meta_clip,
    resolve_checkpoint,
)
from caspl.models.prompts import PromptGroup

__all__ = [
    "ADAPT", "BOOST", "Insert", "LoadedCLIP", "ModelSpec", "Outputs", "PromptGroup", "PromptedCLIP",
    "architecture_config", "check_weight_source", "check_weights", "encode_image", "encode_text", "list_architectures",
    "list_weight_sources", "load_clip", "meta_clip", "model_identity", "register_weight_source", "resolve_checkpoint",
]

"""IVLP: independent deep prompts in both towers (vision after the patches, text right after SOS)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from caspl.methods.base import MethodConfig, PromptMethod, init_from_words, register_method
from caspl.models.prompts import PromptGroup


@dataclass
class IVLPConfig(MethodConfig):
    name = "ivlp"
    depth_fields = {"text_depth": "text", "vision_depth": "vision"}
    length_fields = ("text_length", "vision_length")
    text_length: int = 4
    vision_length: int = 4
    text_depth: int = 9
    vision_depth: int = 9
    ctx_init: str | None = "a photo of a"  # input text tokens start from these words when they have enough tokens


@register_method(IVLPConfig)
class IVLP(PromptMethod):
    def __init__(self, config: IVLPConfig, clip: nn.Module, tokenizer):
        super().__init__(config, clip, tokenizer)
        dims = self.dims
        init, self.leftover_words = init_from_words(clip, tokenizer, config.ctx_init, config.text_length)
        self.text = PromptGroup(config.text_length, config.text_depth, dims.text_width, input_init=init)
        self.vision = PromptGroup(config.vision_length, config.vision_depth, dims.vision_width)
        self.text_length, self.vision_length = config.text_length, config.vision_length

    def text_layers(self, image_features=None):
        return self.text.per_layer()

    def vision_layers(self):
        return self.vision.per_layer()

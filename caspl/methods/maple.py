"""MaPLe: deep text prompts; each layer's vision prompts are a linear projection of that layer's text prompts."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from caspl.methods.base import MethodConfig, PromptMethod, init_from_words, register_method
from caspl.models.prompts import PromptGroup


@dataclass
class MaPLeConfig(MethodConfig):
    name = "maple"
    depth_fields = {"depth": "both"}
    length_fields = ("length",)
    length: int = 2
    depth: int = 9
    ctx_init: str | None = "a photo of a"


@register_method(MaPLeConfig)
class MaPLe(PromptMethod):
    def __init__(self, config: MaPLeConfig, clip: nn.Module, tokenizer):
        super().__init__(config, clip, tokenizer)
        dims = self.dims
        init, self.leftover_words = init_from_words(clip, tokenizer, config.ctx_init, config.length)
        self.text = PromptGroup(config.length, config.depth, dims.text_width, input_init=init)
        self.projections = nn.ModuleList(nn.Linear(dims.text_width, dims.vision_width) for _ in range(config.depth))
        self.text_length = self.vision_length = config.length

    def text_layers(self, image_features=None):
        return self.text.per_layer()

    def vision_layers(self):
        return [project(tokens) for project, tokens in zip(self.projections, self.text.per_layer())]

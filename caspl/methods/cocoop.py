"""CoCoOp: CoOp context plus a meta-net that adds an image-conditioned bias π(x) to every context token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from caspl.methods.base import MethodConfig, PromptMethod, init_from_words, register_method
from caspl.models.prompts import PromptGroup


@dataclass
class CoCoOpConfig(MethodConfig):
    name = "cocoop"
    length_fields = ("n_ctx",)
    n_ctx: int = 8
    ctx_init: str | None = None
    meta_hidden_ratio: int = 16  # hidden width = embed_dim // ratio


@register_method(CoCoOpConfig)
class CoCoOp(PromptMethod):
    per_image_text = True

    def __init__(self, config: CoCoOpConfig, clip: nn.Module, tokenizer):
        super().__init__(config, clip, tokenizer)
        init, self.leftover_words = init_from_words(clip, tokenizer, config.ctx_init, config.n_ctx)
        self.text = PromptGroup(config.n_ctx, 1, self.dims.text_width, input_init=init)
        hidden = self.dims.embed_dim // config.meta_hidden_ratio
        self.meta_net = nn.Sequential(
            nn.Linear(self.dims.embed_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, self.dims.text_width))
        self.text_length = config.n_ctx

    def text_layers(self, image_features: torch.Tensor | None = None):
        if image_features is None:
            raise ValueError("CoCoOp's text prompts depend on the image: pass image features")
        bias = self.meta_net(image_features.to(self.meta_net[0].weight.dtype))  # [B, D]
        return [self.text.tokens[0].unsqueeze(0) + bias.unsqueeze(1)]  # [B, n_ctx, D]

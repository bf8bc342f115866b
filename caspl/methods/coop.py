"""CoOp: M learnable text context vectors at the input (unified or class-specific), CE loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from caspl.errors import ConfigError
from caspl.methods.base import MethodConfig, PromptMethod, init_from_words, register_method
from caspl.models.cascade import ADAPT
from caspl.models.layout import NAME, Segment, Slot, Words
from caspl.models.prompts import PromptGroup

POSITIONS = ("end", "middle", "front")


@dataclass
class CoOpConfig(MethodConfig):
    name = "coop"
    length_fields = ("n_ctx",)
    n_ctx: int = 16
    ctx_init: str | None = None  # e.g. "a photo of a" (used when it has at least n_ctx words)
    class_specific: bool = False
    class_token_position: str = "end"
    num_classes: int | None = None  # required when class_specific

    def __post_init__(self):
        super().__post_init__()
        if self.class_token_position not in POSITIONS:
            raise ConfigError(f"coop.class_token_position {self.class_token_position!r} is not one of {POSITIONS}")
        if self.class_specific and not self.num_classes:
            raise ConfigError("coop.class_specific needs num_classes (the number of training classes)")


@register_method(CoOpConfig)
class CoOp(PromptMethod):
    def __init__(self, config: CoOpConfig, clip: nn.Module, tokenizer):
        super().__init__(config, clip, tokenizer)
        init, self.leftover_words = init_from_words(clip, tokenizer, config.ctx_init, config.n_ctx)
        if config.class_specific:
            ctx = torch.empty(config.num_classes, config.n_ctx, self.dims.text_width).normal_(0, 0.02)
            if init is not None:
                ctx[:] = init
            self.ctx = nn.Parameter(ctx)
        else:
            self.text = PromptGroup(config.n_ctx, 1, self.dims.text_width, input_init=init)
        self.text_length = config.n_ctx

    def text_segments(self, boost: Slot | None, templates: Sequence[str]) -> list[Segment]:
        position = self.config.class_token_position
        if position == "end":
            return super().text_segments(boost, templates)
        words = [Words(self.leftover_words)] if self.leftover_words else []
        tail = ([boost] if boost else []) + [Words(".")]
        if position == "front":
            return [NAME, Slot(ADAPT, self.text_length), *words, *tail]
        half = self.text_length // 2
        return [Slot(ADAPT, half), NAME, Slot(ADAPT, self.text_length - half), *words, *tail]

    def on_classes(self, model) -> None:
        if self.config.class_specific and len(model.classnames) != self.config.num_classes:
            raise ConfigError(
                f"class-specific CoOp was built for {self.config.num_classes} classes, not {len(model.classnames)}; "
                "it cannot score unseen classes (use unified context for base-to-novel)")

    def text_layers(self, image_features=None):
        return [self.ctx] if self.config.class_specific else self.text.per_layer()

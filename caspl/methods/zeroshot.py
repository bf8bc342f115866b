"""Zero-shot CLIP: the dataset's hand-written template, no learnable prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from caspl.methods.base import ZEROSHOT, MethodConfig, PromptMethod, register_method
from caspl.models.layout import Segment, Slot, template_segments


@dataclass
class ZeroShotConfig(MethodConfig):
    name = "zeroshot"
    kind = ZEROSHOT
    template: str | None = None  # None: the dataset's own template


@register_method(ZeroShotConfig)
class ZeroShot(PromptMethod):
    def text_segments(self, boost: Slot | None, templates: Sequence[str]) -> list[Segment]:
        segments = template_segments(self.config.template or templates[0])
        return ([boost] if boost else []) + segments

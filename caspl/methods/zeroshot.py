"""Zero-shot CLIP: the dataset's hand-written template, no learnable prompts. Over boosting prompts it is the boosted
student, `[SOS, boost, class, ".", EOS]`: the boosting tokens replace the template words, as when they were trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from caspl.methods.base import ZEROSHOT, MethodConfig, PromptMethod, fixed_text_segments, register_method
from caspl.models.layout import Segment, Slot


@dataclass
class ZeroShotConfig(MethodConfig):
    name = "zeroshot"
    revision = 2  # 2: over boosting prompts, the boosted student's text
    kind = ZEROSHOT
    template: str | None = None  # None: the dataset's own template


@register_method(ZeroShotConfig)
class ZeroShot(PromptMethod):
    def text_segments(self, boost: Slot | None, templates: Sequence[str]) -> list[Segment]:
        return fixed_text_segments(boost, self.config.template or templates[0])

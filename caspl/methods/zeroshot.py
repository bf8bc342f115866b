"""Zero-shot CLIP: the dataset's hand-written template, no learnable prompts. Over boosting prompts it is the boosted
student, `[SOS, boost, class, ".", EOS]`: the boosting tokens replace the template words, as when they were trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from caspl.methods.base import ZEROSHOT, MethodConfig, PromptMethod, register_method
from caspl.models.cascade import default_text_segments
from caspl.models.layout import Segment, Slot, template_segments


@dataclass
class ZeroShotConfig(MethodConfig):
    name = "zeroshot"
    revision = 2  # 2: over boosting prompts, the boosted student's text
    kind = ZEROSHOT
    template: str | None = None  # None: the dataset's own template


@register_method(ZeroShotConfig)
class ZeroShot(PromptMethod):
    def text_segments(self, boost: Slot | None, templates: Sequence[str]) -> list[Segment]:
        if boost is not None:
            return default_text_segments(0, boost)
        return template_segments(self.config.template or templates[0])

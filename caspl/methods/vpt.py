"""VPT-deep (Jia et al., ECCV 2022) as a vision-only base method: learnable vision tokens at each of the first
`depth` layers, the text side the hand-written template (no text prompts), cross-entropy loss.

In the cascade the tokens sit after the patches and the boosting tokens (`[CLS, patches…, boost, vpt]`); they get
no positional embedding, so their place in the sequence does not matter to attention. With "+CasPL" the text is the
boosted student's, `[SOS, boost, class…, ".", EOS]`: the boosting tokens were trained in place of the template words
(`[SOS, boost, template words…, class…]` scores near plain zero-shot; docs/reference_differences.md). Class text
features are image-independent and computed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from caspl.methods.base import MethodConfig, PromptMethod, fixed_text_segments, register_method
from caspl.models.layout import Segment, Slot
from caspl.models.prompts import PromptGroup


@dataclass
class VPTConfig(MethodConfig):
    name = "vpt"
    revision = 2  # 2: +CasPL text is the boosted student's
    depth_fields = {"depth": "vision"}
    length_fields = ("length",)
    length: int = 8
    depth: int = 12
    template: str | None = None  # the text prompt; None: the dataset's own template


@register_method(VPTConfig)
class VPT(PromptMethod):
    def __init__(self, config: VPTConfig, clip: nn.Module, tokenizer):
        super().__init__(config, clip, tokenizer)
        self.vision = PromptGroup(config.length, config.depth, self.dims.vision_width)
        self.vision_length = config.length

    def text_segments(self, boost: Slot | None, templates: Sequence[str]) -> list[Segment]:
        return fixed_text_segments(boost, self.config.template or templates[0])

    def vision_layers(self):
        return self.vision.per_layer()

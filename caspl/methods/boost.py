"""Boosting prompts (CasPL phase 1): IVLP-style deep prompts in both towers, trained by distillation.

Paper defaults: 8 vision + 8 text tokens at depth 12, random init N(0, 0.02) (the "a photo of a" init only when the
text prompt has at most 4 tokens). In phase 2 the same module sits frozen in the cascade's `boost` slots.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from caspl.distill.loss import kd_loss
from caspl.errors import FieldError
from caspl.methods.base import BOOST, register_method
from caspl.methods.ivlp import IVLP, IVLPConfig


@dataclass
class BoostConfig(IVLPConfig):
    name = "boost"
    kind = BOOST
    text_length: int = 8
    vision_length: int = 8
    text_depth: int = 12
    vision_depth: int = 12
    ctx_init: str | None = "a photo of a"
    temperature: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.temperature <= 0:
            raise FieldError("temperature", f"must be > 0, got {self.temperature}", self.name)


@register_method(BoostConfig)
class Boost(IVLP):
    def __init__(self, config: BoostConfig, clip: nn.Module, tokenizer):
        super().__init__(config, clip, tokenizer)
        self.leftover_words = ""  # boosting tokens never keep init words: adapting tokens sit between SOS and them

    def loss(self, out, batch, model):
        """τ²·KL(softmax(t/τ) ‖ softmax(s/τ)) against `batch["teacher_logits"]` [B, C] (no labels)."""
        loss = kd_loss(out.logits, batch["teacher_logits"], self.config.temperature)
        return loss, {"kd": float(loss.detach())}

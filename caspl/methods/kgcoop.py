"""KgCoOp (Yao et al., CVPR 2023): CoOp's context plus a pull toward the hand-crafted zero-shot text features.

L = CE + λ · (1/C) Σ_c ‖w_c − w_c^clip‖²

where w_c are the learned class text features and w_c^clip the frozen CLIP's features of the dataset's hand-written
template, both L2-normalised ([C, E]). For unit vectors ‖w − w^clip‖² = 2 − 2·cos(w, w^clip), so the reference
code's `1 − mean cos` is half this term. Paper setting: 4 context tokens initialised from "a photo of a" (the
reference takes the token count from the init phrase), λ = 8.0. Under +CasPL the default `anchor: boosted` takes
w^clip from the boosted student (CLIP with the frozen boosting prompts); `anchor: clip` is the paper's plain CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from caspl.methods.base import check_anchor, register_method
from caspl.methods.coop import CoOp, CoOpConfig


@dataclass
class KgCoOpConfig(CoOpConfig):
    name = "kgcoop"
    revision = 2  # 2: the anchor option
    n_ctx: int = 4
    ctx_init: str | None = "a photo of a"
    kg_weight: float = 8.0  # λ
    template: str | None = None  # the hand-crafted prompt of w^clip; None: the dataset's own template
    anchor: str = "boosted"  # "boosted" | "clip" (the paper's): the frozen model of w^clip

    def __post_init__(self):
        super().__post_init__()
        check_anchor(self.anchor, self.name)


@register_method(KgCoOpConfig)
class KgCoOp(CoOp):
    def __init__(self, config: KgCoOpConfig, clip: nn.Module, tokenizer):
        super().__init__(config, clip, tokenizer)
        self.register_buffer("zs_text_features", torch.empty(0), persistent=False)

    def on_classes(self, model) -> None:
        super().on_classes(model)
        template = self.config.template or model.templates[0]
        self.zs_text_features = model.zeroshot_text_features([template], self.config.anchor == "boosted")

    def loss(self, out, batch, model):
        ce = F.cross_entropy(out.logits, batch["labels"])
        distance = (out.text_features - self.zs_text_features).pow(2).sum(-1).mean()  # mean over classes
        kg = self.config.kg_weight * distance
        return ce + kg, {"ce": float(ce.detach()), "kg": float(kg.detach())}

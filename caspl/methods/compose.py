"""CasPL as a composition: any adapting method over frozen boosting prompts, on one frozen CLIP."""

from __future__ import annotations

from torch import nn

from caspl.methods.base import MethodConfig, build_method
from caspl.models.cascade import PromptedCLIP


def build_prompted_clip(
    clip: nn.Module,
    tokenizer,
    adapt: MethodConfig | dict | None = None,
    boost: MethodConfig | dict | None = None,
    *,
    freeze_boost: bool | None = None,
) -> PromptedCLIP:
    """A PromptedCLIP with an adapting method and/or boosting prompts.

    Phase 1 (boosting): `boost` only, trainable. Phase 2 (adapting, "+CasPL"): `adapt` and `boost`, where the boost
    group is frozen (load its values with `caspl.methods.state.load_prompt_state`). `freeze_boost` defaults to
    "frozen when an adapting method is present".
    """
    adapt_module = build_method(adapt, clip, tokenizer) if adapt is not None else None
    boost_module = build_method(boost, clip, tokenizer) if boost is not None else None
    if boost_module is not None and (freeze_boost if freeze_boost is not None else adapt_module is not None):
        boost_module.requires_grad_(False)
    return PromptedCLIP(clip, tokenizer, adapt=adapt_module, boost=boost_module)

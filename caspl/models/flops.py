"""Forward FLOPs of open_clip CLIP towers from their configs, prompt tokens included (to price studies).

FLOPs = 2 × multiply-accumulates. A transformer block on n tokens of width d with MLP ratio r costs

    linear layers   2·n·(4·d² + 2·r·d²)     q, k, v and output projections; the two MLP layers
    attention       2·2·n²·d                scores and the weighted sum of values

plus, once per image, the patch embedding (2·patches·3·p²·d) and, once per sequence, the output projection
(2·d·E). Layer norms, softmax, GELU and additions are left out (well under 1 % for CLIP sizes). The text tower runs
on the full context (open_clip masks, it does not shorten), so text prompts add no FLOPs; vision prompts add tokens.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TowerFlops:
    """Forward FLOPs of one image or one text sequence, by kind."""

    linear: float  # every matmul with a weight matrix (and the patch embedding)
    attention: float  # the two token-by-token products per block

    @property
    def total(self) -> float:
        return self.linear + self.attention


def block_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> TowerFlops:
    linear = 2 * tokens * (4 * width**2 + 2 * mlp_ratio * width**2)
    return TowerFlops(linear, 4 * tokens**2 * width)


def image_flops(model_cfg: dict, extra_tokens: int = 0) -> TowerFlops:
    """One image through the vision tower of an open_clip model config, with `extra_tokens` prompt tokens."""
    vision = model_cfg["vision_cfg"]
    size, patch, width = _side(vision["image_size"]), _side(vision["patch_size"]), int(vision["width"])
    patches = (size // patch) ** 2
    block = block_flops(1 + patches + extra_tokens, width, float(vision.get("mlp_ratio", 4.0)))
    layers = int(vision["layers"])
    embed = 2 * patches * 3 * patch**2 * width + 2 * width * int(model_cfg["embed_dim"])
    return TowerFlops(layers * block.linear + embed, layers * block.attention)


def text_flops(model_cfg: dict) -> TowerFlops:
    """One sequence through the text tower (the whole context length, as open_clip runs it)."""
    text = model_cfg["text_cfg"]
    width, tokens = int(text["width"]), int(text.get("context_length", 77))
    block = block_flops(tokens, width, float(text.get("mlp_ratio", 4.0)))
    layers = int(text["layers"])
    return TowerFlops(layers * block.linear + 2 * width * int(model_cfg["embed_dim"]), layers * block.attention)


def _side(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)

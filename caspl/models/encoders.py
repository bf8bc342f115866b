"""Prompt-aware forward passes over an unmodified open_clip `CLIP`.

We own the loop over the residual blocks; that loop is where prompt tokens go in. An `Insert` names token
positions and, per layer, the values written there just before that layer's block (layer 0 = the input):

- text: positions index the token sequence. Layer-0 values replace token embeddings *before* the positional
  embedding is added (so input prompts get positions, as in CoOp); deeper values replace hidden states.
- vision: positions are offsets after `[CLS, patches]`. Layer-0 values are appended after the positional embedding
  and before `ln_pre` (no positional embedding); deeper values replace those hidden states.

With no inserts both functions reproduce `CLIP.encode_text` / `CLIP.encode_image` bit-exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from open_clip.transformer import text_global_pool


@dataclass
class Insert:
    """Values for a fixed set of token positions at some layers of one tower.

    positions: long [n] (shared by all sequences) or [N, n] (per sequence).
    layers: layers[i] is None (leave the slots alone before block i) or a tensor [n, D] or [N, n, D].
    """

    positions: torch.Tensor
    layers: Sequence[torch.Tensor | None]

    def at(self, layer: int) -> torch.Tensor | None:
        return self.layers[layer] if layer < len(self.layers) else None


def replace_tokens(x: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Out-of-place `x[:, positions] = values` with broadcasting over the batch; differentiable in both."""
    n_seq, _, width = x.shape
    positions = positions.to(x.device)
    if positions.dim() == 1:
        positions = positions.expand(n_seq, -1)
    if values.dim() == 2:
        values = values.expand(n_seq, -1, -1)
    index = positions.unsqueeze(-1).expand(-1, -1, width)
    return x.scatter(1, index, values.to(x.dtype))


def _apply(x: torch.Tensor, inserts: Sequence[Insert], layer: int, offset: int = 0) -> torch.Tensor:
    for insert in inserts:
        values = insert.at(layer)
        if values is not None:
            x = replace_tokens(x, insert.positions + offset, values)
    return x


def encode_text(model, token_ids: torch.Tensor, inserts: Sequence[Insert] = (), normalize: bool = False):
    """`CLIP.encode_text` with prompt inserts; token_ids [N, L] -> features [N, E]."""
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(token_ids).to(cast_dtype)
    x = _apply(x, inserts, 0)
    x = x + model.positional_embedding.to(cast_dtype)
    x = _run_blocks(model.transformer, x, inserts, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = text_global_pool(x, token_ids, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        projection = model.text_projection
        x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


def encode_image(model, images: torch.Tensor, inserts: Sequence[Insert] = (), normalize: bool = False):
    """`CLIP.encode_image` (a standard open_clip ViT) with prompt inserts; images [B, 3, H, W] -> [B, E]."""
    visual = model.visual
    _check_supported_vision(visual, bool(inserts))
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    n_base = x.shape[1]
    n_prompts = sum(int(i.positions.shape[-1]) for i in inserts)
    if n_prompts:
        x = torch.cat([x, x.new_zeros(x.shape[0], n_prompts, x.shape[2])], dim=1)
        x = _apply(x, inserts, 0, offset=n_base)
    x = visual.ln_pre(x)
    x = _run_blocks(visual.transformer, x, inserts, offset=n_base)
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


def _run_blocks(transformer, x, inserts: Sequence[Insert], attn_mask=None, offset: int = 0):
    if not transformer.batch_first:
        raise NotImplementedError("caspl needs an open_clip transformer with batch_first=True (open_clip >= 2.26)")
    for layer, block in enumerate(transformer.resblocks):
        if layer > 0:
            x = _apply(x, inserts, layer, offset)
        x = block(x, attn_mask=attn_mask)
    return x


def _check_supported_vision(visual, prompted: bool) -> None:
    if not hasattr(visual, "conv1") or getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError(f"prompted vision forward supports plain open_clip ViTs, not {type(visual).__name__}")
    if prompted and getattr(visual, "pool_type", "tok") != "tok":
        raise NotImplementedError("vision prompts need class-token pooling; average pooling would average prompts too")
    if prompted and visual.training and getattr(visual.patch_dropout, "prob", 0.0) > 0:
        raise NotImplementedError("vision prompts need patch_dropout = 0")

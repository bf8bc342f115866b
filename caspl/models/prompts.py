"""Prompt groups: the one building block of every method and of the boosting phase.

A group holds per-layer tokens for one tower, `tokens[i]` (shape [length, width]) going in before block i
(i = 0: the input). `depth` = how many layers, counting the input, get fresh tokens. A frozen group keeps its
values (no gradient); a cascade stacks groups in fixed slot order per tower (see `caspl.models.cascade`).
"""

from __future__ import annotations

import torch
from torch import nn

from caspl.errors import ConfigError


class PromptGroup(nn.Module):
    def __init__(
        self,
        length: int,
        depth: int,
        width: int,
        *,
        frozen: bool = False,
        std: float = 0.02,
        input_init: torch.Tensor | None = None,
    ):
        super().__init__()
        if length < 1 or depth < 1:
            raise ConfigError(f"a prompt group needs length >= 1 and depth >= 1 (got length={length}, depth={depth})")
        tokens = torch.empty(depth, length, width).normal_(0.0, std)
        if input_init is not None:  # e.g. the embedding of "a photo of a" for the input layer
            tokens[0] = input_init.detach().to(tokens.dtype)
        self.tokens = nn.Parameter(tokens, requires_grad=not frozen)
        self.length, self.depth, self.width = length, depth, width

    @property
    def frozen(self) -> bool:
        return not self.tokens.requires_grad

    def freeze(self) -> "PromptGroup":
        self.tokens.requires_grad_(False)
        return self

    def per_layer(self) -> list[torch.Tensor]:
        return list(self.tokens.unbind(0))

    def extra_repr(self) -> str:
        return f"length={self.length}, depth={self.depth}, width={self.width}, frozen={self.frozen}"


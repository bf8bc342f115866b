"""Text token layouts: where each prompt group's slots sit around the class name.

A layout is a list of segments, e.g. the cascade's default `[Slot("adapt", 4), Slot("boost", 8), NAME, Words(".")]`
gives `[SOS, adapt×4, boost×8, class tokens…, ".", EOS, pad…]`. Slots are filled with a placeholder token whose
embedding is replaced by prompt values; EOT pooling uses these token ids, so the EOS position accounts for the
slots. A zero-shot template "a photo of a {}." is the layout `[Words("a photo of a"), NAME, Words(".")]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from caspl.errors import ConfigError

PLACEHOLDER = "X"


@dataclass(frozen=True)
class Slot:
    name: str
    length: int


@dataclass(frozen=True)
class Words:
    text: str


@dataclass(frozen=True)
class ClassName:
    pass


NAME = ClassName()
Segment = Union[Slot, Words, ClassName]


@dataclass
class TextLayout:
    token_ids: torch.Tensor  # long [C, context_length]
    positions: dict[str, torch.Tensor]  # slot name -> long [C, n]

    def shared_positions(self, name: str) -> torch.Tensor:
        """Positions as [n] when every class has the slot at the same place (the usual case), else [C, n]."""
        pos = self.positions[name]
        return pos[0] if bool((pos == pos[:1]).all()) else pos


def template_segments(template: str) -> list[Segment]:
    """'a photo of a {}, a type of pet.' -> [Words('a photo of a'), NAME, Words(', a type of pet.')]."""
    if template.count("{}") != 1:
        raise ConfigError(f"template {template!r} must contain exactly one '{{}}' for the class name")
    before, after = template.split("{}")
    return [s for s in (Words(before.strip()), NAME, Words(after.strip())) if not (isinstance(s, Words) and not s.text)]


def build_text_layout(tokenizer, classnames: Sequence[str], segments: Sequence[Segment],
                      context_length: int) -> TextLayout:
    placeholder = tokenizer.encode(PLACEHOLDER)
    rows, positions = [], {s.name: [] for s in segments if isinstance(s, Slot)}
    for classname in classnames:
        ids = [tokenizer.sot_token_id]
        for name in positions:
            positions[name].append([])
        for segment in segments:
            if isinstance(segment, Slot):  # a slot name may appear twice (CoOp's middle class position)
                positions[segment.name][-1] += range(len(ids), len(ids) + segment.length)
                ids += placeholder * segment.length
            elif isinstance(segment, Words):
                ids += tokenizer.encode(segment.text)
            else:
                ids += tokenizer.encode(classname.replace("_", " "))
        ids.append(tokenizer.eot_token_id)
        if len(ids) > context_length:
            raise ConfigError(
                f"class {classname!r} needs {len(ids)} text tokens with this prompt layout, more than the model's "
                f"context length {context_length}; shorten the prompts or the class name")
        rows.append(ids + [0] * (context_length - len(ids)))
    return TextLayout(
        token_ids=torch.tensor(rows, dtype=torch.long),
        positions={k: torch.tensor(v, dtype=torch.long) for k, v in positions.items()},
    )

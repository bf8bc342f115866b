"""The cascade: a frozen CLIP with prompt groups stacked in fixed slot order in both towers.

    vision: [CLS, patches…, boost(n_b), adapt(n_a)]
    text:   [SOS, adapt(n_a), boost(n_b), class tokens…, ".", EOS, pad…]   (the adapting method may move words/name)

`adapt` is any prompt method (CoOp, CoCoOp, IVLP, MaPLe, PromptSRC, zero-shot) and `boost` the boosting prompts,
frozen in phase 2 and the only prompts in phase 1. Every method is built from the same `Insert`s, so
"method + CasPL" is this composition, not a per-method copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from torch import nn

from caspl.models.encoders import Insert, encode_image, encode_text
from caspl.models.layout import NAME, Segment, Slot, TextLayout, Words, build_text_layout

ADAPT, BOOST = "adapt", "boost"


class PromptSource(Protocol):
    """What the cascade needs from a prompt method (see `caspl.methods.base.PromptMethod`)."""

    text_length: int
    vision_length: int
    per_image_text: bool

    def text_segments(self, boost: Slot | None, templates: Sequence[str]) -> list[Segment]: ...
    def text_layers(self, image_features: torch.Tensor | None = None) -> Sequence[torch.Tensor | None]: ...
    def vision_layers(self) -> Sequence[torch.Tensor | None]: ...
    def on_classes(self, model: "PromptedCLIP") -> None: ...


@dataclass
class Outputs:
    logits: torch.Tensor  # [B, C]
    image_features: torch.Tensor  # [B, E], L2-normalised
    text_features: torch.Tensor  # [C, E] or, for per-image prompts, [B, C, E]; L2-normalised
    extras: dict = field(default_factory=dict)


def default_text_segments(adapt_length: int, boost: Slot | None) -> list[Segment]:
    slots = [Slot(ADAPT, adapt_length)] if adapt_length else []
    return slots + ([boost] if boost else []) + [NAME, Words(".")]


class PromptedCLIP(nn.Module):
    """A frozen open_clip CLIP plus an adapting method and optional boosting prompts."""

    def __init__(self, clip: nn.Module, tokenizer, adapt: nn.Module | None = None, boost: nn.Module | None = None):
        super().__init__()
        self.clip = clip.requires_grad_(False)
        self.tokenizer = tokenizer
        self.adapt = adapt
        self.boost = boost
        self.classnames: list[str] = []
        self.templates: list[str] = []
        self.layout: TextLayout | None = None

    # --- classes --------------------------------------------------------------------------------------------
    def set_classes(self, classnames: Sequence[str],
                    templates: Sequence[str] = ("a photo of a {}.",)) -> "PromptedCLIP":
        self.classnames, self.templates = list(classnames), list(templates)
        boost_slot = Slot(BOOST, self.boost.text_length) if self.boost is not None else None
        if self.adapt is not None:
            segments = self.adapt.text_segments(boost_slot, self.templates)
        else:
            segments = default_text_segments(0, boost_slot)
        self.layout = build_text_layout(self.tokenizer, self.classnames, segments, self.context_length)
        for source in (self.adapt, self.boost):
            if source is not None:
                source.on_classes(self)
        return self

    @property
    def context_length(self) -> int:
        return int(self.clip.positional_embedding.shape[0])

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    # --- towers ---------------------------------------------------------------------------------------------
    def vision_inserts(self, boost_only: bool = False) -> list[Insert]:
        inserts, offset = [], 0
        for source in (self.boost,) if boost_only else (self.boost, self.adapt):  # vision order: boost, then adapt
            if source is not None and source.vision_length:
                positions = torch.arange(offset, offset + source.vision_length, device=self.device)
                inserts.append(Insert(positions, source.vision_layers()))
                offset += source.vision_length
        return inserts

    def text_inserts(self, image_features: torch.Tensor | None = None) -> list[Insert]:
        inserts = []
        for name, source in ((ADAPT, self.adapt), (BOOST, self.boost)):
            if source is not None and source.text_length:
                layers = source.text_layers(image_features) if name == ADAPT else source.text_layers()
                inserts.append(Insert(self.layout.shared_positions(name).to(self.device), layers))
        return inserts

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return encode_image(self.clip, images, self.vision_inserts(), normalize=True)

    def encode_text(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Class text features [C, E]; with per-image prompts, [B, C, E] for the given image features."""
        if self.layout is None:
            raise RuntimeError("call set_classes() before encoding text")
        token_ids = self.layout.token_ids.to(self.device)
        if not self._per_image_text:
            return encode_text(self.clip, token_ids, self.text_inserts(), normalize=True)
        batch, n_cls = image_features.shape[0], token_ids.shape[0]
        inserts = [_repeat_for_images(i, batch, n_cls) for i in self.text_inserts(image_features)]
        features = encode_text(self.clip, token_ids.repeat(batch, 1), inserts, normalize=True)
        return features.view(batch, n_cls, -1)

    @property
    def _per_image_text(self) -> bool:
        return self.adapt is not None and self.adapt.per_image_text

    def forward(self, images: torch.Tensor, text_features: torch.Tensor | None = None) -> Outputs:
        """Logits for `images` against the current classes; pass precomputed `text_features` at evaluation."""
        image_features = self.encode_image(images)
        if text_features is None:
            text_features = self.encode_text(image_features if self._per_image_text else None)
        if text_features.dim() == 3:
            logits = torch.einsum("be,bce->bc", image_features, text_features)
        else:
            logits = image_features @ text_features.t()
        return Outputs(self.logit_scale() * logits, image_features, text_features)

    # --- the frozen model below the adapting method ------------------------------------------------------
    # boosted=False: the zero-shot CLIP, no prompts at all (what PromptSRC and KgCoOp anchor to in their papers).
    # boosted=True: CasPL's boosted student, CLIP with the frozen boosting prompts in the layout boosting trained
    # them in, `[SOS, boost, class, ".", EOS]` (the boosting tokens stand in for the template words; measured in
    # docs/reference_differences.md); without boosting prompts this is the plain zero-shot CLIP again.
    @torch.no_grad()
    def zeroshot_image_features(self, images: torch.Tensor, boosted: bool = False) -> torch.Tensor:
        return encode_image(self.clip, images, self.vision_inserts(boost_only=True) if boosted else (), normalize=True)

    @torch.no_grad()
    def zeroshot_text_features(self, templates: Sequence[str] | None = None, boosted: bool = False) -> torch.Tensor:
        """Zero-shot class features [C, E]: the mean of the templates' raw features, L2-normalised; the boosted
        student's own features (no templates) with `boosted` and boosting prompts."""
        if boosted and self.boost is not None and self.boost.text_length:
            return self._boosted_student_text_features()
        templates = list(templates or self.templates)
        token_ids = [self.tokenizer([t.replace("{}", c.replace("_", " ")) for c in self.classnames]) for t in templates]
        features = torch.stack([encode_text(self.clip, ids.to(self.device)) for ids in token_ids])
        return torch.nn.functional.normalize(features.mean(0), dim=-1)

    def _boosted_student_text_features(self) -> torch.Tensor:
        segments = default_text_segments(0, Slot(BOOST, self.boost.text_length))
        layout = build_text_layout(self.tokenizer, self.classnames, segments, self.context_length)
        # `[SOS, boost…]` puts the slot at 1..n for every class; built directly, without layout.shared_positions'
        # data-dependent check, so that it also runs on the meta device (the study's pre-Ray checks)
        positions = torch.arange(1, 1 + self.boost.text_length, device=self.device)
        insert = Insert(positions, self.boost.text_layers())
        return encode_text(self.clip, layout.token_ids.to(self.device), [insert], normalize=True)

    # --- prompt-only state ----------------------------------------------------------------------------------
    def prompt_parameters(self, trainable_only: bool = True) -> list[nn.Parameter]:
        params = [p for name, p in self.named_parameters() if not name.startswith("clip.")]
        return [p for p in params if p.requires_grad] if trainable_only else params

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the CLIP weights, under the fixed prefixes `adapt.` and `boost.`."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("clip.")}


def _repeat_for_images(insert: Insert, batch: int, n_cls: int) -> Insert:
    """Expand an insert over B×C sequences (image-major): per-image values [B, n, D] become [B*C, n, D]."""
    positions = insert.positions
    if positions.dim() == 2:
        positions = positions.repeat(batch, 1)
    layers = [v.repeat_interleave(n_cls, dim=0) if v is not None and v.dim() == 3 else v for v in insert.layers]
    return Insert(positions, layers)

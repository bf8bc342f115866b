"""Prompt methods: a config dataclass plus a module, registered by name (peft style).

A method module fills the `adapt` slots of the cascade (or, for `boost`, the boost slots). It builds its
parameters from the CLIP's dimensions, tells the cascade its text layout, returns per-layer values for each tower,
and defines its loss. Only prompt parameters (and a method's small extra modules) are trainable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from caspl.errors import ConfigError
from caspl.models.cascade import Outputs, PromptedCLIP, default_text_segments
from caspl.models.layout import Segment, Slot, Words

_REGISTRY: dict[str, tuple[type["MethodConfig"], type["PromptMethod"]]] = {}


@dataclass
class MethodConfig:
    """Base of every method config; `name` is the registry key."""

    name: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **dataclasses.asdict(self)}


def register_method(config_cls: type[MethodConfig]):
    def wrap(module_cls: type["PromptMethod"]):
        _REGISTRY[config_cls.name] = (config_cls, module_cls)
        module_cls.config_cls = config_cls
        return module_cls

    return wrap


def list_methods() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def method_config(name: str, **values: Any) -> MethodConfig:
    """A validated config for method `name`; an unknown key is an error, not a silent no-op."""
    _import_all()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(_REGISTRY)}")
    config_cls = _REGISTRY[name][0]
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} for method {name!r}; known keys: {sorted(known)}")
    return config_cls(**values)


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    data = dict(data)
    if "method" not in data:
        raise ConfigError(f"method config {data} has no 'method' key")
    return method_config(data.pop("method"), **data)


def build_method(config: MethodConfig | dict, clip: nn.Module, tokenizer) -> "PromptMethod":
    if isinstance(config, dict):
        config = config_from_dict(config)
    _import_all()
    return _REGISTRY[config.name][1](config, clip, tokenizer)


def _import_all() -> None:
    from caspl.methods import boost, cocoop, coop, ivlp, maple, promptsrc, zeroshot  # noqa: F401  (registration)


@dataclass(frozen=True)
class ClipDims:
    text_width: int
    vision_width: int
    text_layers: int
    vision_layers: int
    embed_dim: int

    @classmethod
    def of(cls, clip: nn.Module) -> "ClipDims":
        return cls(
            text_width=clip.token_embedding.embedding_dim,
            vision_width=clip.visual.conv1.out_channels,
            text_layers=len(clip.transformer.resblocks),
            vision_layers=len(clip.visual.transformer.resblocks),
            embed_dim=clip.text_projection.shape[1],
        )


class PromptMethod(nn.Module):
    """Base module: no prompts, CE loss. Subclasses set lengths and override the layer functions."""

    config_cls: ClassVar[type[MethodConfig]]
    per_image_text: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, clip: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.dims = ClipDims.of(clip)
        self.text_length = 0
        self.vision_length = 0
        self.leftover_words = ""

    @property
    def name(self) -> str:
        return self.config.name

    def text_segments(self, boost: Slot | None, templates: Sequence[str]) -> list[Segment]:
        segments = default_text_segments(self.text_length, boost)
        if self.leftover_words:  # init words that did not become prompt tokens stay as fixed words (MaPLe's "of a")
            segments.insert(1, Words(self.leftover_words))
        return segments

    def text_layers(self, image_features: torch.Tensor | None = None) -> Sequence[torch.Tensor | None]:
        return []

    def vision_layers(self) -> Sequence[torch.Tensor | None]:
        return []

    def on_classes(self, model: PromptedCLIP) -> None:
        """Called after the class list changes (e.g. to cache zero-shot features)."""

    def loss(self, out: Outputs, batch: dict, model: PromptedCLIP) -> tuple[torch.Tensor, dict[str, float]]:
        loss = F.cross_entropy(out.logits, batch["labels"])
        return loss, {"ce": float(loss.detach())}


def init_from_words(clip: nn.Module, tokenizer, words: str | None, length: int) -> tuple[torch.Tensor | None, str]:
    """Embeddings of the first `length` tokens of `words`, and the words left over.

    Used only when `words` has at least `length` tokens ("a photo of a" initialises up to 4 tokens); otherwise
    the tokens start random and nothing is left over.
    """
    if not words:
        return None, ""
    ids = tokenizer.encode(words)
    if length > len(ids):
        return None, ""
    with torch.no_grad():
        embedding = clip.token_embedding(torch.tensor(ids[:length], device=clip.token_embedding.weight.device))
    leftover = words.split()[length:] if len(words.split()) == len(ids) else []
    if len(words.split()) != len(ids) and length < len(ids):
        raise ConfigError(f"init phrase {words!r} splits into sub-word tokens; use {length} whole words")
    return embedding.float(), " ".join(leftover)

"""The method contract: a config dataclass plus a module, registered by name where they are defined (peft style).

A method is one module under `caspl/methods/` (every module there is imported by the package, which registers it):

    @dataclass
    class MyConfig(MethodConfig):
        name = "mine"                               # registry key, the `method:` value in YAML
        kind = BASE                                 # BASE (adapting), BOOST (phase 1) or ZEROSHOT
        depth_fields = {"depth": "vision"}          # depth fields and the tower(s) they count layers of
        length_fields = ("length",)                 # prompt lengths (each >= 1)
        length: int = 8
        depth: int = 12

    @register_method(MyConfig)
    class Mine(PromptMethod):
        ...                                         # override the extension points documented on PromptMethod

The method fills the `adapt` slots of the cascade (the boosting prompts fill the `boost` slots), so "+CasPL" needs
nothing from it: `build_prompted_clip(clip, tokenizer, adapt=MyConfig(), boost=BoostConfig())`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from caspl.config import build_dataclass, to_dict
from caspl.errors import ConfigError, FieldError
from caspl.models.cascade import Outputs, PromptedCLIP, default_text_segments
from caspl.models.layout import Segment, Slot, Words, template_segments

BASE, BOOST, ZEROSHOT = "base", "boost", "zeroshot"
KINDS = (BASE, BOOST, ZEROSHOT)
TOWERS = ("text", "vision", "both")

ANCHORS = ("clip", "boosted")


def check_anchor(anchor: str, method: str) -> None:
    """The frozen model a regularised method pulls toward: plain zero-shot CLIP or CLIP with the boosting prompts."""
    if anchor not in ANCHORS:
        raise FieldError("anchor", f"must be one of {list(ANCHORS)}, got {anchor!r}", method)


def fixed_text_segments(boost: Slot | None, template: str) -> list[Segment]:
    """The text of a method without text tokens (zero-shot, VPT): the template alone; over boosting prompts, the
    boosted student's `[boost, class, "."]`, the layout boosting trained its tokens in, in place of the template."""
    return default_text_segments(0, boost) if boost is not None else template_segments(template)


_REGISTRY: dict[str, type["PromptMethod"]] = {}


@dataclass
class MethodConfig:
    """Base of every method config. Class attributes (not fields) describe the method to generic code:

    name           the registry key (`method: <name>` in YAML)
    kind           BASE (a base method, searchable in studies, in the toy table), BOOST or ZEROSHOT
    depth_fields   {field: "text" | "vision" | "both"}: fields that count prompted layers of that tower (1..layers)
    length_fields  fields that count prompt tokens (>= 1)
    revision       part of every adapting run's key: bump it when the method computes something else for the
                   same config (a token layout, a loss), so that stored runs of the old code are not reused
    """

    name: ClassVar[str] = ""
    revision: ClassVar[int] = 1
    kind: ClassVar[str] = BASE
    depth_fields: ClassVar[dict[str, str]] = {}
    length_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for field_name in (*self.length_fields, *self.depth_fields):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FieldError(field_name, f"must be an integer >= 1, got {value!r}", self.name)

    def to_config(self) -> dict[str, Any]:
        """The YAML form: `{"method": name, **fields}`; `MethodConfig.from_config` reads it back."""
        return {"method": self.name, **{f.name: to_dict(getattr(self, f.name)) for f in fields(self)}}

    @classmethod
    def from_config(cls, data: dict[str, Any], where: str = "method") -> "MethodConfig":
        """Parse a method section: on the base class by its `method:` key, on a method's class directly."""
        data = dict(data)
        name = data.pop("method", None if cls is MethodConfig else cls.name)
        if cls is MethodConfig:
            if name is None:
                raise ConfigError(f"config section {where} has no 'method' key; choose one of {list_methods()}")
            return build_dataclass(method_class(name).config_cls, data, where)
        if name != cls.name:
            raise ConfigError(f"config section {where} is for method {cls.name!r}, not {name!r}")
        return build_dataclass(cls, data, where)

    def check_depths(self, text_layers: int, vision_layers: int) -> None:
        """ConfigError unless every depth field lies in 1..(the layers of its tower)."""
        for field_name, tower in self.depth_fields.items():
            layers = {"text": text_layers, "vision": vision_layers, "both": min(text_layers, vision_layers)}[tower]
            value = getattr(self, field_name)
            if not 1 <= value <= layers:
                raise ConfigError(f"{self.name}.{field_name} {value} is outside 1..{layers} (the model's {tower} "
                                  f"tower{'s have' if tower == 'both' else ' has'} {layers} layers)")


    def fit_depths(self, text_layers: int, vision_layers: int) -> "MethodConfig":
        """A copy whose depth fields are capped at the model's layers (e.g. paper settings on a smaller model)."""
        layers = {"text": text_layers, "vision": vision_layers, "both": min(text_layers, vision_layers)}
        return replace(self, **{f: min(getattr(self, f), layers[t]) for f, t in self.depth_fields.items()})


def register_method(config_cls: type[MethodConfig]):
    """Class decorator: register a PromptMethod subclass under `config_cls.name`."""
    if not config_cls.name or config_cls.kind not in KINDS:
        raise ValueError(f"{config_cls.__name__} needs a `name` and a `kind` in {KINDS}")
    for tower in config_cls.depth_fields.values():
        if tower not in TOWERS:
            raise ValueError(f"{config_cls.__name__}.depth_fields: tower {tower!r} is not one of {TOWERS}")

    def wrap(module_cls: type["PromptMethod"]) -> type["PromptMethod"]:
        if config_cls.name in _REGISTRY and _REGISTRY[config_cls.name] is not module_cls:
            raise ValueError(f"method {config_cls.name!r} is already registered")
        _REGISTRY[config_cls.name] = module_cls
        module_cls.config_cls = config_cls
        return module_cls

    return wrap


def list_methods(kind: str | None = None) -> list[str]:
    """Registered method names, sorted; `kind=BASE` lists the base methods (what studies and tables iterate)."""
    return sorted(name for name, module in _REGISTRY.items() if kind is None or module.config_cls.kind == kind)


def method_class(name: str) -> type["PromptMethod"]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; choose one of {list_methods()}")
    return _REGISTRY[name]


def method_config(name: str, **values: Any) -> MethodConfig:
    """A validated config for method `name`; an unknown key is an error, not a silent no-op."""
    return build_dataclass(method_class(name).config_cls, values, name)


def config_from_dict(data: dict[str, Any] | MethodConfig) -> MethodConfig:
    """A method config from its YAML form `{"method": name, ...}` (a config passes through)."""
    return data if isinstance(data, MethodConfig) else MethodConfig.from_config(data)


def build_method(config: MethodConfig | dict, clip: nn.Module, tokenizer) -> "PromptMethod":
    config = config_from_dict(config)
    return method_class(config.name)(config, clip, tokenizer)


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
    """A prompt method around a frozen CLIP. The base class has no prompts and the cross-entropy loss.

    Shapes: B images, C classes, E embedding dim, Dt / Dv text / vision width, n the method's token count in a tower.
    A subclass sets `text_length` / `vision_length` (its slots per tower; 0 = none) in `__init__` and overrides:

    Forward extension points (called by `caspl.models.PromptedCLIP` on every forward pass)
      text_segments(boost, templates)  the text layout: `[Slot("adapt", n), boost, NAME, Words(".")]` by default
      text_layers(image_features)      values for the "adapt" text slots, one entry per layer from the input:
                                       None (leave the slots), [n, Dt] or, with per-image prompts, [B, n, Dt]
      vision_layers()                  values for the method's vision slots per layer: None or [n, Dv]
      loss(out, batch, model)          (scalar loss, {name: float}) from `Outputs` and the batch
                                       {"images": [B, 3, H, W], "labels": [B]}
    Class hook
      on_classes(model)                after `model.set_classes(...)` (e.g. cache zero-shot text features [C, E])
    Training hooks (called by the adapting loop, `caspl.train.adapt`, in this order)
      on_train_begin(num_epochs)       before the first epoch and before a resume loads state
      on_epoch_end(epoch)              after each epoch's optimiser steps, before validation; `epoch` is 1-based
      training_state() -> dict|None    extra state saved in every training checkpoint (tensors, numbers, lists)
      load_training_state(state)       restores it on resume, so a resumed run ends bit-exactly
      final_prompts() -> dict|None     a state dict to end with instead of the validation-selected epoch
    Only prompt parameters (and a method's small extra modules) are trainable; the CLIP stays frozen.
    """

    config_cls: ClassVar[type[MethodConfig]]
    per_image_text: ClassVar[bool] = False  # text_layers depends on the image (CoCoOp): text runs per image

    def __init__(self, config: MethodConfig, clip: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.dims = ClipDims.of(clip)
        config.check_depths(self.dims.text_layers, self.dims.vision_layers)
        self.text_length = 0
        self.vision_length = 0
        self.leftover_words = ""

    @property
    def name(self) -> str:
        return self.config.name

    # --- forward extension points -------------------------------------------------------------------------------
    def text_segments(self, boost: Slot | None, templates: Sequence[str]) -> list[Segment]:
        """The text layout around the class name; `boost` is the boosting slot (None without CasPL)."""
        segments = default_text_segments(self.text_length, boost)
        if self.leftover_words:  # init words that did not become prompt tokens stay as fixed words (MaPLe's "of a")
            segments.insert(1, Words(self.leftover_words))
        return segments

    def text_layers(self, image_features: torch.Tensor | None = None) -> Sequence[torch.Tensor | None]:
        """Per-layer values [n, Dt] (or [B, n, Dt] given image features [B, E]) for the "adapt" text slots."""
        return []

    def vision_layers(self) -> Sequence[torch.Tensor | None]:
        """Per-layer values [n, Dv] for this method's vision slots (appended after the patches and boost tokens)."""
        return []

    def loss(self, out: Outputs, batch: dict, model: PromptedCLIP) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy on `out.logits` [B, C]; a method with another loss overrides this."""
        loss = F.cross_entropy(out.logits, batch["labels"])
        return loss, {"ce": float(loss.detach())}

    # --- class and training hooks ---------------------------------------------------------------------------------
    def on_classes(self, model: PromptedCLIP) -> None:
        """Called after the class list changes (e.g. to cache zero-shot features)."""

    def on_train_begin(self, num_epochs: int) -> None:
        """Called once before training (also before a resume restores `training_state`)."""

    def on_epoch_end(self, epoch: int) -> None:
        """Called after the optimiser steps of 1-based `epoch`."""

    def training_state(self) -> dict | None:
        """Method state beyond the parameters that a resumed run needs (None: nothing)."""
        return None

    def load_training_state(self, state: dict | None) -> None:
        """Restore what `training_state` returned."""

    def final_prompts(self) -> dict[str, torch.Tensor] | None:
        """A state dict (keys of `self.state_dict()`) to end training with, overriding selection; None: select."""
        return None


def init_from_words(clip: nn.Module, tokenizer, words: str | None, length: int) -> tuple[torch.Tensor | None, str]:
    """Embeddings [length, Dt] of the first `length` tokens of `words`, and the words left over.

    Used only when `words` has at least `length` tokens ("a photo of a" initialises up to 4 tokens); otherwise
    the tokens start random and nothing is left over.
    """
    if not words:
        return None, ""
    ids = tokenizer.encode(words)
    if length > len(ids):
        return None, ""
    whole_words = len(words.split()) == len(ids)
    if not whole_words and length < len(ids):  # the left-over words could not be placed as whole words
        raise ConfigError(f"init phrase {words!r} splits into sub-word tokens; use {length} whole words")
    with torch.no_grad():
        embedding = clip.token_embedding(torch.tensor(ids[:length], device=clip.token_embedding.weight.device))
    return embedding.float(), " ".join(words.split()[length:]) if whole_words else ""

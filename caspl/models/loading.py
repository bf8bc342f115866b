"""Loading student and teacher CLIPs from open_clip architectures and weight sources.

An architecture is an open_clip model name (`ViT-B-16`) or one of our JSON configs in `model_configs/`
(`caspl-toy-student`, ...; see `list_architectures()`). Weights come separately (timm style), from `pretrained`:

    None            random initialisation (architecture only, no network)
    "<tag>"         an open_clip pretrained tag such as "openai"; the local cache is tried first, and without network
                    the load fails at once with a line saying to pass a local file instead
    "/path/file"    a local checkpoint: a plain state dict (.pt/.pth/.bin), safetensors, or an OpenAI TorchScript
                    archive (the only case loaded with weights_only=False)
    "toyworld"      the project's ToyWorld-pretrained weights for `caspl-toy-*` architectures, built on first use

Override order for QuickGELU: `ModelSpec.quick_gelu` when set, else the tag's own setting, else True for OpenAI
TorchScript archives and `*-quickgelu` names, else False. Loading is strict: every key must match.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from caspl.errors import CheckpointError, ConfigError

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)

# Weight sources resolved by name to a local file; values are "module:function" so models/ imports nothing above it
# at import time. The function takes the ModelSpec and returns a checkpoint path.
WEIGHT_SOURCES: dict[str, str] = {"toyworld": "caspl.train.toyworld_pretrain:resolve_weights"}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPENAI_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

log = logging.getLogger(__name__)


class _QuietRandomInit(logging.Filter):
    """open_clip warns on the root logger whenever it builds without weights; here that is chosen, not an accident."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


logging.getLogger().addFilter(_QuietRandomInit())


@contextmanager
def _quiet_root_logger():
    """open_clip narrates every build at INFO on the root logger, which Ray workers print; hush it meanwhile."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


@dataclass(frozen=True)
class ModelSpec:
    """Which CLIP to load: architecture name plus weight source (see module docstring)."""

    name: str
    pretrained: str | None = None
    quick_gelu: bool | None = None
    precision: str = "fp32"
    device: str = "cpu"


@dataclass
class LoadedCLIP:
    """A frozen-ready open_clip CLIP with its tokenizer and eval preprocessing."""

    model: open_clip.CLIP
    tokenizer: Any
    preprocess: Callable
    spec: ModelSpec
    checkpoint: str | None = None
    info: dict = field(default_factory=dict)


def list_architectures(caspl_only: bool = False) -> list[str]:
    ours = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    return ours if caspl_only else ours + [m for m in open_clip.list_models() if m not in ours]


def architecture_config(name: str) -> dict:
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"unknown CLIP architecture {name!r}; choose one of caspl.models.list_architectures()")
    return cfg


def load_clip(spec: ModelSpec) -> LoadedCLIP:
    """Build `spec.name`, load its weights strictly, and return it with tokenizer and preprocessing."""
    if spec.precision not in PRECISIONS:
        raise ConfigError(f"precision {spec.precision!r} is not one of {sorted(PRECISIONS)}")
    architecture_config(spec.name)
    checkpoint, tag_cfg = _resolve_weights(spec)
    state_dict, is_openai_jit = (None, False) if checkpoint is None else read_state_dict(checkpoint)
    quick_gelu = _choose_quick_gelu(spec, tag_cfg, is_openai_jit)
    if checkpoint is not None and spec.quick_gelu is None and not tag_cfg and not is_openai_jit:
        log.info("weights from %s: using quick_gelu=%s; set quick_gelu: true for OpenAI weights", checkpoint, quick_gelu)
    with torch.random.fork_rng(devices=[]), _quiet_root_logger():
        torch.manual_seed(zlib.crc32(spec.name.encode()))  # random init is the same in every process (teacher actors)
        model = open_clip.create_model(
            spec.name,
            pretrained=None,
            force_quick_gelu=quick_gelu,
            force_preprocess_cfg=_preprocess_overrides(tag_cfg),
        )
    if state_dict is not None:
        _load_strict(model, state_dict, checkpoint)
    model = model.to(device=spec.device, dtype=PRECISIONS[spec.precision]).eval()
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    with _quiet_root_logger():
        tokenizer = open_clip.get_tokenizer(spec.name, context_length=model.context_length)
    return LoadedCLIP(model, tokenizer, preprocess, spec, checkpoint, {"quick_gelu": quick_gelu})


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Read a checkpoint file; returns (state_dict, is_openai_torchscript)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass an existing weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _strip_prefixes(load_file(str(path))), False
    if _is_torchscript(path):
        archive = torch.jit.load(str(path), map_location="cpu")
        state = {k: v.float() if v.is_floating_point() else v for k, v in archive.state_dict().items()}
        for key in OPENAI_JIT_EXTRA_KEYS:
            state.pop(key, None)
        return state, True
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types
        raise CheckpointError(f"cannot read checkpoint {path} as a weights-only state dict: {exc}".splitlines()[0]) from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict of tensors; save model.state_dict()")
    return _strip_prefixes(obj), False


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], checkpoint: str) -> None:
    expected = model.state_dict()
    derived = {name for name, _ in model.named_buffers()} - set(expected)  # e.g. attn_mask, rebuilt by the model
    state = {k: v for k, v in state.items() if k not in derived}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{label} {keys[:3]}{'…' if len(keys) > 3 else ''}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise CheckpointError(
            f"checkpoint {checkpoint} does not fit architecture {type(model).__name__}: {'; '.join(parts)}; "
            "check that `name` matches the weights")
    model.load_state_dict(state, strict=True)


def _resolve_weights(spec: ModelSpec) -> tuple[str | None, dict]:
    source = spec.pretrained
    if source is None:
        return None, {}
    if source in WEIGHT_SOURCES:
        module, func = WEIGHT_SOURCES[source].split(":")
        return str(getattr(importlib.import_module(module), func)(spec)), {}
    tag_cfg = open_clip.get_pretrained_cfg(spec.name, source)
    if tag_cfg:
        return _download_tag(spec, tag_cfg), tag_cfg
    if os.path.sep in source or Path(source).suffix:
        if not Path(source).expanduser().is_file():
            raise CheckpointError(f"checkpoint file {source} does not exist; check the path in `pretrained`")
        return str(Path(source).expanduser().resolve()), {}
    tags = open_clip.list_pretrained_tags_by_model(spec.name)
    raise ConfigError(f"pretrained {source!r} is neither a file nor a tag of {spec.name} (tags: {tags or 'none'})")


def _download_tag(spec: ModelSpec, tag_cfg: dict) -> str:
    from open_clip.pretrained import download_pretrained

    offline_before = os.environ.get("HF_HUB_OFFLINE")
    try:  # the local cache first, without touching the network
        os.environ["HF_HUB_OFFLINE"] = "1"
        import huggingface_hub.constants as hf_constants

        hf_constants.HF_HUB_OFFLINE = True
        return download_pretrained(tag_cfg)
    except Exception:
        pass
    finally:
        _restore_env("HF_HUB_OFFLINE", offline_before)
        import huggingface_hub.constants as hf_constants

        hf_constants.HF_HUB_OFFLINE = offline_before not in (None, "0", "false", "False")
    if not _network_reachable():
        raise CheckpointError(
            f"cannot download pretrained tag {spec.pretrained!r} of {spec.name}: no network; download the weights "
            f"elsewhere and set pretrained: /path/to/{spec.name}.pt")
    try:
        return download_pretrained(tag_cfg)
    except Exception as exc:
        raise CheckpointError(f"download of {spec.name}/{spec.pretrained} failed ({exc}); pass a local file") from exc


def _network_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _choose_quick_gelu(spec: ModelSpec, tag_cfg: dict, is_openai_jit: bool) -> bool:
    if spec.quick_gelu is not None:
        return spec.quick_gelu
    if tag_cfg:
        return bool(tag_cfg.get("quick_gelu", False))
    return is_openai_jit or spec.name.endswith("-quickgelu")


def _preprocess_overrides(tag_cfg: dict) -> dict:
    return {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}

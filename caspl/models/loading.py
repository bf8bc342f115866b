"""Loading student and teacher CLIPs from open_clip architectures and weight sources.

An architecture is an open_clip model name (`ViT-B-16`) or one of our JSON configs in `model_configs/`
(`caspl-toy-student`, ...; see `list_architectures()`). Weights come separately (timm style), from `pretrained`:

    None            random initialisation (architecture only, no network)
    "<tag>"         an open_clip pretrained tag such as "openai"; the local cache is tried first, and without network
                    the load fails at once with a line saying to pass a local file instead
    "/path/file"    a local checkpoint: a plain state dict (.pt/.pth/.bin), safetensors, or an OpenAI TorchScript
                    archive (the only case loaded with weights_only=False)
    "<source>"      a registered weight source (`register_weight_source`), e.g. "toyworld": the project's
                    ToyWorld-pretrained weights for `caspl-toy-*` architectures, built on first use (registered when
                    `caspl.train` is imported, which every caspl entry point does)

Override order for QuickGELU: `ModelSpec.quick_gelu` when set, else the tag's own setting, else True for OpenAI
TorchScript archives and `*-quickgelu` names, else False. Loading is strict: every key must match.
"""

from __future__ import annotations

import logging
import os
import socket
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from caspl.artifacts import sha256_file
from caspl.errors import CheckpointError, ConfigError

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPENAI_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

WeightSource = Callable[["ModelSpec"], "str | Path"]
_WEIGHT_SOURCES: dict[str, WeightSource] = {}

log = logging.getLogger(__name__)


def register_weight_source(name: str, resolve: WeightSource) -> None:
    """Make `pretrained: <name>` resolve through `resolve(spec) -> local checkpoint path` (timm-style sources)."""
    if name in _WEIGHT_SOURCES and _WEIGHT_SOURCES[name] is not resolve:
        raise ValueError(f"weight source {name!r} is already registered")
    _WEIGHT_SOURCES[name] = resolve


def list_weight_sources() -> list[str]:
    return sorted(_WEIGHT_SOURCES)


class _QuietRandomInit(logging.Filter):
    """open_clip warns on the root logger whenever it builds without weights; here that is chosen, not an accident."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextmanager
def quiet_open_clip():
    """open_clip narrates every build at INFO on the root logger, which Ray workers print; hush it meanwhile."""
    root = logging.getLogger()
    level, quiet = root.level, _QuietRandomInit()
    root.setLevel(max(level, logging.WARNING))
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)
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
    identity: dict = field(default_factory=dict)  # `model_identity`: what determines its outputs (cache keys)


def list_architectures(caspl_only: bool = False) -> list[str]:
    ours = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    return ours if caspl_only else ours + [m for m in open_clip.list_models() if m not in ours]


def architecture_config(name: str) -> dict:
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"unknown CLIP architecture {name!r}; choose one of caspl.models.list_architectures()")
    return cfg


def load_clip(spec: ModelSpec, resolved: tuple[str | None, dict] | None = None) -> LoadedCLIP:
    """Build `spec.name`, load its weights strictly, and return it with tokenizer and preprocessing.

    `resolved`: the result of `resolve_checkpoint(spec)` computed elsewhere (e.g. by a driver for its Ray actors,
    so that an actor neither builds nor downloads weights).
    """
    if spec.precision not in PRECISIONS:
        raise ConfigError(f"precision {spec.precision!r} is not one of {sorted(PRECISIONS)}")
    architecture_config(spec.name)
    checkpoint, tag_cfg = resolved if resolved is not None else resolve_checkpoint(spec)
    state_dict, is_openai_jit = (None, False) if checkpoint is None else read_state_dict(checkpoint)
    quick_gelu = _choose_quick_gelu(spec, tag_cfg, is_openai_jit)
    if checkpoint is not None and spec.quick_gelu is None and not tag_cfg and not is_openai_jit:
        log.info("weights from %s: using quick_gelu=%s; set quick_gelu: true for OpenAI weights",
                 checkpoint, quick_gelu)
    with torch.random.fork_rng(devices=[]), quiet_open_clip():
        torch.manual_seed(zlib.crc32(spec.name.encode()))  # random init is the same in every process (teacher actors)
        model = open_clip.create_model(
            spec.name,
            pretrained=None,
            force_quick_gelu=quick_gelu,
            force_preprocess_cfg=_preprocess_overrides(tag_cfg),
        )
    if state_dict is not None:
        _load_strict(model, state_dict, checkpoint, spec.name)
    model = model.to(device=spec.device, dtype=PRECISIONS[spec.precision]).eval()
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    with quiet_open_clip():
        tokenizer = open_clip.get_tokenizer(spec.name, context_length=model.context_length)
    return LoadedCLIP(model, tokenizer, preprocess, spec, checkpoint, {"quick_gelu": quick_gelu},
                      _identity(spec, checkpoint))


def meta_clip(name: str) -> tuple[open_clip.CLIP, Any]:
    """(architecture `name` on the meta device, its tokenizer): shapes without memory or weights, for checks and
    cost estimates (build prompt modules on it inside `with torch.device("meta")`)."""
    architecture_config(name)
    with torch.device("meta"), quiet_open_clip():
        model = open_clip.create_model(name, pretrained=None, device="meta")
        tokenizer = open_clip.get_tokenizer(name, context_length=model.context_length)
    return model, tokenizer


def check_weights(spec: ModelSpec, resolved: tuple[str | None, dict] | None = None) -> None:
    """Fail here, with one CheckpointError line, when `spec`'s weights cannot load into its architecture.

    For a driver before it starts actors that will load the weights: the architecture is built on the meta device
    (no memory, ~0.1 s for ViT-L/14) and plain state dicts are memory-mapped, so only keys and shapes are read.
    """
    checkpoint, _ = resolved if resolved is not None else resolve_checkpoint(spec)
    if checkpoint is None:
        return
    state, _ = read_state_dict(checkpoint, mmap=True)
    _check_fits(meta_clip(spec.name)[0], state, checkpoint, spec.name)


def read_state_dict(path: str | Path, *, mmap: bool = False) -> tuple[dict[str, torch.Tensor], bool]:
    """Read a checkpoint file; returns (state_dict, is_openai_torchscript). A malformed file is a CheckpointError.

    `mmap=True` maps a plain state dict instead of reading it (for checks that look at keys and shapes only).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass an existing weights file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            if mmap:  # keys, shapes and dtypes from the header; nothing is read
                with safe_open(str(path), framework="pt") as handle:
                    return _strip_prefixes({key: _meta_like(handle.get_slice(key)) for key in handle.keys()}), False
            return _strip_prefixes(load_file(str(path))), False
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({_first_line(exc)}); "
                                  "re-download it or save it with safetensors.torch.save_file") from None
    if _is_torchscript(path):
        try:
            archive = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # TorchScript raises RuntimeError and friends for damaged archives
            raise CheckpointError(f"checkpoint {path} looks like a TorchScript archive but cannot be loaded "
                                  f"({_first_line(exc)}); re-download it") from None
        state = {k: v.float() if v.is_floating_point() else v for k, v in archive.state_dict().items()}
        for key in OPENAI_JIT_EXTRA_KEYS:
            state.pop(key, None)
        return state, True
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as exc:  # pickle errors come in many types
        raise CheckpointError(f"cannot read checkpoint {path} as a weights-only state dict ({_first_line(exc)}); "
                              "save it with torch.save(model.state_dict(), path)") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict of tensors; save model.state_dict()")
    return _strip_prefixes(obj), False


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def _meta_like(tensor_slice) -> torch.Tensor:
    """A meta tensor with the shape and dtype a safetensors header gives."""
    return torch.empty(tensor_slice.get_shape(), dtype=SAFETENSORS_DTYPES[tensor_slice.get_dtype()], device="meta")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _is_torchscript(path: Path) -> bool:
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], checkpoint: str, architecture: str) -> None:
    model.load_state_dict(_check_fits(model, state, checkpoint, architecture), strict=True)


def _check_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], checkpoint: str,
                architecture: str) -> dict[str, torch.Tensor]:
    """`state` without derived buffers, or a CheckpointError naming the keys that do not fit `model`."""
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
            f"checkpoint {checkpoint} does not fit architecture {architecture}: {'; '.join(parts)}; "
            "check that `name` matches the weights")
    return state


def check_weight_source(spec: ModelSpec) -> None:
    """The checks of `resolve_checkpoint` that need no building and no download: a registered weight source or a
    tag of the architecture is accepted as named, a file must exist, anything else is a one-line error."""
    source = spec.pretrained
    if source is None or source in _WEIGHT_SOURCES or open_clip.get_pretrained_cfg(spec.name, source):
        return
    _checkpoint_file(spec)


def resolve_checkpoint(spec: ModelSpec) -> tuple[str | None, dict]:
    """(local checkpoint path or None for random init, the open_clip tag's config or {}) for `spec.pretrained`."""
    source = spec.pretrained
    if source is None:
        return None, {}
    if source in _WEIGHT_SOURCES:
        return str(_WEIGHT_SOURCES[source](spec)), {}
    tag_cfg = open_clip.get_pretrained_cfg(spec.name, source)
    if tag_cfg:
        return _download_tag(spec, tag_cfg), tag_cfg
    return _checkpoint_file(spec), {}


def _checkpoint_file(spec: ModelSpec) -> str:
    source = spec.pretrained
    if os.path.sep in source or Path(source).suffix:
        if not Path(source).expanduser().is_file():
            raise CheckpointError(f"checkpoint file {source} does not exist; check the path in `pretrained`")
        return str(Path(source).expanduser().resolve())
    tags = open_clip.list_pretrained_tags_by_model(spec.name)
    shown = ", ".join(tags[:4]) + (f", … ({len(tags)} in all)" if len(tags) > 4 else "") if tags else "none"
    raise ConfigError(f"pretrained {source!r} is neither a file, a tag of {spec.name} (tags: {shown}) nor a "
                      f"registered weight source ({', '.join(list_weight_sources()) or 'none registered'})")


@lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def model_identity(spec: ModelSpec) -> dict:
    """What determines a model's outputs: architecture, weight source and the weights' sha256 (a cache-key part)."""
    return _identity(spec, resolve_checkpoint(spec)[0])


def _identity(spec: ModelSpec, checkpoint: str | None) -> dict:
    digest = None
    if checkpoint is not None:
        stat = Path(checkpoint).stat()
        digest = _file_digest(str(checkpoint), stat.st_size, stat.st_mtime_ns)
    return {"name": spec.name, "pretrained": spec.pretrained, "quick_gelu": spec.quick_gelu,
            "precision": spec.precision, "weights_sha256": digest}


def _download_tag(spec: ModelSpec, tag_cfg: dict) -> str:
    from open_clip.pretrained import download_pretrained

    cached = _cached_tag_file(tag_cfg)
    if cached is not None:
        return cached
    if not _network_reachable():
        raise CheckpointError(
            f"cannot download pretrained tag {spec.pretrained!r} of {spec.name}: no network; download the weights "
            f"elsewhere and set pretrained: /path/to/{spec.name}.pt")
    try:
        return download_pretrained(tag_cfg)
    except Exception as exc:
        raise CheckpointError(f"download of {spec.name}/{spec.pretrained} failed ({_first_line(exc)}); "
                              "pass a local file") from None


def _cached_tag_file(tag_cfg: dict) -> str | None:
    """The tag's weights file if a previous download left it in the local caches (no network, no global state)."""
    if tag_cfg.get("file"):
        return tag_cfg["file"]
    if hub := tag_cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        model_id, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        safe = "open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin" else (
            filename[:-4] + ".safetensors" if filename.endswith((".bin", ".pth")) else None)
        for name in filter(None, (safe, filename)):
            found = try_to_load_from_cache(model_id, name)
            if isinstance(found, str):
                return found
    if url := tag_cfg.get("url"):
        path = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if path.is_file():
            return str(path)
    return None


def _network_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _choose_quick_gelu(spec: ModelSpec, tag_cfg: dict, is_openai_jit: bool) -> bool:
    if spec.quick_gelu is not None:
        return spec.quick_gelu
    if tag_cfg:
        return bool(tag_cfg.get("quick_gelu", False))
    return is_openai_jit or spec.name.endswith("-quickgelu")


def _preprocess_overrides(tag_cfg: dict) -> dict:
    return {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}

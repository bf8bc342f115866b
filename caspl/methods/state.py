"""Prompt-only checkpoints: the prompt tensors of a PromptedCLIP plus a small JSON of the method configs.

A checkpoint is a folder:

    prompts.safetensors   tensors under the fixed prefixes `adapt.` and `boost.` (see docs/prompt_state.md)
    prompts.json          {"format": 1, "adapt": {"method": ...}, "boost": {...}, "clip": {...}, "shapes": {...}}
    MANIFEST.json         sha256 of both files; verified on load

It never contains CLIP weights: kilobytes to a few megabytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file

from caspl.artifacts import CorruptArtifactError, atomic_folder, verify_folder, write_manifest
from caspl.errors import CheckpointError
from caspl.models.cascade import ADAPT, BOOST, PromptedCLIP

FORMAT = 1
TENSORS, CONFIG = "prompts.safetensors", "prompts.json"


def method_configs(model: PromptedCLIP) -> dict:
    return {role: getattr(model, role).config.to_config() if getattr(model, role) is not None else None
            for role in (ADAPT, BOOST)}


def save_prompt_state(model: PromptedCLIP, folder: str | Path, extra: dict | None = None) -> Path:
    """Write the prompt tensors and configs of `model` to `folder` atomically (replacing an older checkpoint)."""
    folder = Path(folder)
    state = {k: v.contiguous() for k, v in model.prompt_state_dict().items()}
    meta = {"format": FORMAT, **method_configs(model), "shapes": {k: list(v.shape) for k, v in state.items()},
            **(extra or {})}
    with atomic_folder(folder, replace=True) as tmp:
        save_file(state, str(tmp / TENSORS))
        (tmp / CONFIG).write_text(json.dumps(meta, indent=1, sort_keys=True))
        write_manifest(tmp, key=folder.name, meta={"kind": "prompts"})
    return folder


def read_prompt_state(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config JSON) of a checkpoint folder, after checking it against its manifest."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise CheckpointError(f"{folder} is not a caspl prompt checkpoint (no {CONFIG}); pass the folder save wrote")
    try:
        verify_folder(folder)
    except CorruptArtifactError as exc:
        raise CheckpointError(f"prompt checkpoint {folder} is corrupt ({exc}); re-run the phase that wrote it") from exc
    meta = json.loads((folder / CONFIG).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder}: prompt format {meta.get('format')} is not {FORMAT}")
    return load_file(str(folder / TENSORS)), meta


def load_prompt_state(model: PromptedCLIP, folder: str | Path, roles: Iterable[str] = (ADAPT, BOOST)) -> dict:
    """Copy the tensors of `roles` from a checkpoint into `model`, strictly: methods and shapes must match.

    Loading a boosting run into an adapting model: `roles=("boost",)`.
    """
    state, meta = read_prompt_state(folder)
    for role in roles:
        module = getattr(model, role)
        saved = meta.get(role)
        if module is None:
            if saved is not None:
                raise CheckpointError(f"{folder} has {role} prompts ({saved['method']}) but the model has none")
            continue
        if saved is None or saved["method"] != module.config.name:
            raise CheckpointError(
                f"{folder} holds {role} method {saved and saved['method']!r}, the model expects {module.config.name!r}")
        _copy_strict(module, {k[len(role) + 1:]: v for k, v in state.items() if k.startswith(role + ".")}, folder, role)
    return meta


def _copy_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], folder: Path, role: str) -> None:
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{role}.{k}: saved {list(state[k].shape)} vs model {list(expected[k].shape)}"
             for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(filter(None, [
            f"missing {[f'{role}.{k}' for k in missing]}" if missing else "",
            f"unexpected {[f'{role}.{k}' for k in unexpected]}" if unexpected else "",
            "; ".join(wrong)]))
        raise CheckpointError(f"prompt checkpoint {folder} does not fit this model: {detail}; "
                              "build the model with the config in its prompts.json")
    with torch.no_grad():
        for key, value in state.items():
            expected[key].copy_(value)

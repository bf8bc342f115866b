"""Training checkpoints: everything needed to resume a run and end where an uninterrupted run ends.

A training state is a dict of tensors, numbers, strings and lists (optimizer state included), written atomically
with `torch.save` and read back with `weights_only=True`. Randomness in our loops derives from (seed, epoch), so the
torch RNG state is stored for completeness, not relied upon.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from caspl.artifacts import atomic_write_bytes
from caspl.errors import CheckpointError

STATE_FILE = "train_state.pt"


def save_training_state(folder: str | Path, state: dict[str, Any]) -> Path:
    buffer = io.BytesIO()
    torch.save({**state, "torch_rng": torch.get_rng_state()}, buffer)
    path = Path(folder) / STATE_FILE
    atomic_write_bytes(path, buffer.getvalue())
    return path


def read_training_state(folder: str | Path) -> dict[str, Any] | None:
    """The saved state in `folder` (its RNG state under "torch_rng", not applied), or None when there is none; a
    damaged file is an error, not a fresh start."""
    path = Path(folder) / STATE_FILE
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"training checkpoint {path} is unreadable ({exc}); delete it to restart the run") \
            from exc


def load_training_state(folder: str | Path) -> dict[str, Any] | None:
    """`read_training_state` for a resume: the process's torch RNG state is set to the saved one."""
    state = read_training_state(folder)
    if state is not None:
        torch.set_rng_state(state.pop("torch_rng"))
    return state

"""Prompt-only checkpoints round-trip bit-exactly and refuse what does not fit."""

import json

import pytest
import torch

from caspl.errors import CheckpointError
from caspl.methods import build_prompted_clip
from caspl.methods.state import load_prompt_state, read_prompt_state, save_prompt_state

BOOST = {"method": "boost", "text_length": 3, "vision_length": 2, "text_depth": 3, "vision_depth": 2}
MAPLE = {"method": "maple", "length": 2, "depth": 2}


def _model(tiny, adapt=MAPLE, boost=BOOST, seed=0):
    torch.manual_seed(seed)
    return build_prompted_clip(tiny.model, tiny.tokenizer, adapt, boost).set_classes(["a", "b"])


def test_round_trip_is_bit_exact(tiny, tmp_path):
    source = _model(tiny, seed=1)
    folder = save_prompt_state(source, tmp_path / "ckpt")
    target = _model(tiny, seed=2)
    assert not torch.equal(target.adapt.text.tokens, source.adapt.text.tokens)
    load_prompt_state(target, folder)
    saved, loaded = source.prompt_state_dict(), target.prompt_state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    meta = json.loads((folder / "prompts.json").read_text())
    assert meta["adapt"]["method"] == "maple" and meta["shapes"]["boost.vision.tokens"] == [2, 2, 48]
    assert sorted(saved) == ["adapt.projections.0.bias", "adapt.projections.0.weight", "adapt.projections.1.bias",
                             "adapt.projections.1.weight", "adapt.text.tokens", "boost.text.tokens",
                             "boost.vision.tokens"]


def test_boost_prompts_load_into_an_adapting_model(tiny, tmp_path):
    phase1 = build_prompted_clip(tiny.model, tiny.tokenizer, None, BOOST).set_classes(["a", "b"])
    folder = save_prompt_state(phase1, tmp_path / "boost")
    phase2 = _model(tiny, seed=5)
    load_prompt_state(phase2, folder, roles=("boost",))
    assert torch.equal(phase2.boost.text.tokens, phase1.boost.text.tokens)
    assert not phase2.boost.text.tokens.requires_grad


def test_wrong_shape_and_wrong_method_fail_clearly(tiny, tmp_path):
    folder = save_prompt_state(_model(tiny), tmp_path / "ckpt")
    longer = _model(tiny, adapt={**MAPLE, "length": 3})
    with pytest.raises(CheckpointError, match=r"adapt.text.tokens: saved \[2, 2, 32\] vs model \[2, 3, 32\]"):
        load_prompt_state(longer, folder)
    other = _model(tiny, adapt={"method": "ivlp", "text_depth": 2, "vision_depth": 2})
    with pytest.raises(CheckpointError, match="holds adapt method 'maple', the model expects 'ivlp'"):
        load_prompt_state(other, folder)


def test_corrupt_checkpoint_is_detected(tiny, tmp_path):
    folder = save_prompt_state(_model(tiny), tmp_path / "ckpt")
    data = bytearray((folder / "prompts.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "prompts.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is corrupt"):
        read_prompt_state(folder)
    with pytest.raises(CheckpointError, match="not a caspl prompt checkpoint"):
        read_prompt_state(tmp_path)

"""Model loading from architectures, local checkpoints of every format, and tags (offline)."""

import pytest
import torch
from open_clip.transformer import QuickGELU

from caspl.errors import CheckpointError, ConfigError
from caspl.models import ModelSpec, list_architectures, load_clip
from caspl.models import loading


def _uses_quick_gelu(model) -> bool:
    return isinstance(model.transformer.resblocks[0].mlp.gelu, QuickGELU)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_architectures_include_ours_and_open_clips():
    names = list_architectures()
    assert "caspl-tiny" in names and "ViT-B-16" in names
    with pytest.raises(ConfigError, match="unknown CLIP architecture 'ViT-Q-99'"):
        load_clip(ModelSpec("ViT-Q-99"))


def test_tokenizer_and_preprocess_come_with_the_model(tiny):
    assert tiny.tokenizer.context_length == 32
    image = tiny.preprocess(__import__("PIL.Image").Image.new("RGB", (50, 40)))
    assert image.shape == (3, 32, 32)


def test_plain_state_dict_and_safetensors_load_strictly(tiny, tmp_path):
    from safetensors.torch import save_file

    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny.model.state_dict().items()}}, tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for name in ("w.pt", "w.safetensors"):
        loaded = load_clip(ModelSpec("caspl-tiny", pretrained=str(tmp_path / name)))
        assert _same_weights(loaded.model, tiny.model)
        assert not _uses_quick_gelu(loaded.model)


def test_openai_torchscript_archive_loads_with_quick_gelu(tiny, tmp_path):
    model = tiny.model
    traced = torch.jit.trace_module(model, {"encode_image": torch.randn(1, 3, 32, 32)}, check_trace=False)
    traced.save(str(tmp_path / "openai.pt"))
    loaded = load_clip(ModelSpec("caspl-tiny", pretrained=str(tmp_path / "openai.pt")))
    assert loaded.info["quick_gelu"] and _uses_quick_gelu(loaded.model)
    assert _same_weights(loaded.model, tiny.model)
    forced = load_clip(ModelSpec("caspl-tiny", pretrained=str(tmp_path / "openai.pt"), quick_gelu=False))
    assert not _uses_quick_gelu(forced.model)


def test_mismatched_checkpoint_fails_with_the_culprit(tiny, tmp_path):
    state = tiny.model.state_dict()
    state.pop("logit_scale")
    state["visual.proj"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"missing \['logit_scale'\]; wrong shape \['visual.proj'\]"):
        load_clip(ModelSpec("caspl-tiny", pretrained=str(tmp_path / "bad.pt")))
    (tmp_path / "pickle.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_clip(ModelSpec("caspl-tiny", pretrained=str(tmp_path / "pickle.pt")))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_clip(ModelSpec("caspl-tiny", pretrained=str(tmp_path / "missing.pt")))


def test_unknown_tag_and_offline_tag_fail_fast(monkeypatch):
    with pytest.raises(ConfigError, match="neither a file nor a tag of ViT-B-32"):
        load_clip(ModelSpec("ViT-B-32", pretrained="nonsense"))
    monkeypatch.setattr(loading, "_network_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(CheckpointError, match="no network; download the weights elsewhere and set pretrained: /path"):
        load_clip(ModelSpec("ViT-B-32", pretrained="openai"))

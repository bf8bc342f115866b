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


@pytest.mark.parametrize("name,content", [("weights.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"),
                                          ("weights.safetensors", b""), ("archive.pt", None)])
def test_malformed_weight_files_fail_with_one_line(tmp_path, name, content):
    import zipfile

    path = tmp_path / name
    if content is None:  # a zip that claims to be TorchScript but is not
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("model/code/__torch__.py", "garbage")
            archive.writestr("model/constants.pkl", b"garbage")
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        load_clip(ModelSpec("caspl-tiny", pretrained=str(path)))
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and ("re-download" in message or "save it" in message)


def test_weight_sources_are_registered_and_loading_changes_no_global_state(tiny, tmp_path):
    import logging

    from safetensors.torch import save_file

    from caspl.models import list_weight_sources, model_identity, register_weight_source

    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    register_weight_source("test-source", lambda spec: tmp_path / "w.safetensors")
    assert "test-source" in list_weight_sources()
    root = logging.getLogger()
    filters, level = list(root.filters), root.level
    loaded = load_clip(ModelSpec("caspl-tiny", pretrained="test-source"))
    assert root.filters == filters and root.level == level  # nothing left on the root logger
    assert all(torch.equal(v, tiny.model.state_dict()[k]) for k, v in loaded.model.state_dict().items())
    assert loaded.identity == model_identity(ModelSpec("caspl-tiny", pretrained="test-source"))
    assert loaded.identity["weights_sha256"] is not None
    with pytest.raises(ValueError, match="already registered"):
        register_weight_source("test-source", lambda spec: None)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_clip(ModelSpec("caspl-tiny", pretrained=str(tmp_path / "missing.pt")))


def test_unknown_tag_and_offline_tag_fail_fast(monkeypatch):
    with pytest.raises(ConfigError, match=r"neither a file, a tag of ViT-B-32 \(tags: openai, .*\) nor a registered"):
        load_clip(ModelSpec("ViT-B-32", pretrained="nonsense"))
    import huggingface_hub.constants

    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    monkeypatch.setattr(loading, "_network_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(CheckpointError, match="no network; download the weights elsewhere and set pretrained: /path"):
        load_clip(ModelSpec("ViT-B-32", pretrained="openai"))
    assert huggingface_hub.constants.HF_HUB_OFFLINE == offline  # the cache look-up flips no global setting

"""Prompt-aware forward passes: exact open_clip equality without prompts, and where prompt tokens go."""

import pytest
import torch

from caspl.models import Insert, encode_image, encode_text


@pytest.mark.parametrize("which", ["tiny", "vit_b16"])
def test_no_prompts_reproduces_open_clip_exactly(which, request):
    loaded = request.getfixturevalue(which)
    model, size = loaded.model, loaded.model.visual.image_size[0]
    tokens = loaded.tokenizer(["a photo of a cat.", "a sketch of a big red bus", "dog"])
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(encode_text(model, tokens), model.encode_text(tokens))
        assert torch.equal(encode_image(model, images), model.encode_image(images))
        assert torch.equal(encode_text(model, tokens, normalize=True), model.encode_text(tokens, normalize=True))


def _block_inputs(blocks):
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, args, kw: seen.append(args[0].detach()), with_kwargs=True)
               for b in blocks]
    return seen, handles


def test_vision_inserts_land_after_patches_at_input_and_deeper_layers(tiny):
    model = tiny.model
    width = model.visual.conv1.out_channels
    n_base = 1 + (32 // 8) ** 2
    values = [torch.randn(3, width) for _ in range(2)]  # depth 2: input + layer 1
    seen, handles = _block_inputs(model.visual.transformer.resblocks)
    with torch.no_grad():
        encode_image(model, torch.randn(2, 3, 32, 32), [Insert(torch.arange(3), values)])
    for h in handles:
        h.remove()
    assert seen[0].shape[1] == n_base + 3
    assert torch.allclose(seen[0][:, n_base:], model.visual.ln_pre(values[0]).expand(2, -1, -1))
    assert torch.equal(seen[1][:, n_base:], values[1].expand(2, -1, -1))
    assert not torch.allclose(seen[2][:, n_base:], values[1].expand(2, -1, -1))  # depth 2: layer 2 keeps its state


def test_text_insert_gets_positional_embedding_at_input_only(tiny):
    model = tiny.model
    tokens = tiny.tokenizer(["x x cat."])
    values = [torch.randn(2, model.token_embedding.embedding_dim) for _ in range(3)]
    seen, handles = _block_inputs(model.transformer.resblocks)
    with torch.no_grad():
        encode_text(model, tokens, [Insert(torch.tensor([1, 2]), values)])
    for h in handles:
        h.remove()
    assert torch.allclose(seen[0][0, 1:3], values[0] + model.positional_embedding[1:3])
    assert torch.equal(seen[1][0, 1:3], values[1])
    assert torch.equal(seen[2][0, 1:3], values[2])

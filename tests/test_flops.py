"""Analytic FLOPs of the towers agree with torch's FLOP counter on real open_clip models, prompt tokens included."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from caspl.models import Insert, architecture_config, encode_image, encode_text
from caspl.models.flops import image_flops, text_flops


def _counted(fn) -> float:
    """Matmul and convolution FLOPs as torch counts them (grad enabled: the fused inference attention kernel that
    the counter does not see stays off). torch does not count the attention products; we compare the rest."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return sum(n for op, n in counter.get_flop_counts()["Global"].items()
               if str(op).split(".")[1] in ("addmm", "mm", "convolution"))


@pytest.mark.parametrize("extra", [0, 8])
def test_image_flops_match_torch_on_vit_b16(vit_b16, extra):
    images = torch.randn(1, 3, 224, 224, requires_grad=True)
    inserts = [Insert(torch.arange(extra), [torch.zeros(extra, 768)])] if extra else []
    counted = _counted(lambda: encode_image(vit_b16.model, images, inserts))
    expected = image_flops(architecture_config("ViT-B-16"), extra)
    assert counted == pytest.approx(expected.linear, rel=1e-3)
    assert expected.attention == pytest.approx(12 * 4 * (197 + extra) ** 2 * 768)


def test_text_flops_match_torch_on_the_tiny_model(tiny):
    tokens = tiny.tokenizer(["a photo of a cat"])
    embedding = tiny.model.token_embedding.weight
    embedding.requires_grad_(True)
    try:
        counted = _counted(lambda: encode_text(tiny.model, tokens))
    finally:
        embedding.requires_grad_(False)
    assert counted == pytest.approx(text_flops(architecture_config("caspl-tiny")).linear, rel=1e-3)

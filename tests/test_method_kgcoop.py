"""KgCoOp: its loss against a hand computation, its prompt-state keys, and its ±CasPL token layout."""

import pytest
import torch
import torch.nn.functional as F

from caspl.methods import build_prompted_clip
from conftest import METHOD_CASES, TINY_BOOST

CLASSES = ["cat", "sea lion", "dog", "big red bus"]
TEMPLATES = ["a sketch of a {}.", "art of the {}."]


def _model(tiny, boost=None, **overrides):
    torch.manual_seed(0)
    adapt = {**METHOD_CASES["kgcoop"], **overrides}
    return build_prompted_clip(tiny.model, tiny.tokenizer, adapt, boost).set_classes(CLASSES, TEMPLATES)


def test_loss_is_ce_plus_lambda_times_mean_squared_distance_to_the_hand_crafted_features(tiny):
    model = _model(tiny, kg_weight=8.0)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 1])
    out = model(images)
    loss, parts = model.adapt.loss(out, {"images": images, "labels": labels}, model)
    with torch.no_grad():  # w_clip from the frozen CLIP and the dataset's first template, without library helpers
        w_clip = F.normalize(tiny.model.encode_text(tiny.tokenizer([TEMPLATES[0].format(c) for c in CLASSES])), dim=-1)
    w = out.text_features.detach()
    distance = sum(float(((w[c] - w_clip[c]) ** 2).sum()) for c in range(len(CLASSES))) / len(CLASSES)
    ce = float(-out.logits.detach().log_softmax(-1)[torch.arange(3), labels].mean())
    assert parts["ce"] == pytest.approx(ce, rel=1e-5)
    assert parts["kg"] == pytest.approx(8.0 * distance, rel=1e-4)
    assert float(loss.detach()) == pytest.approx(ce + 8.0 * distance, rel=1e-4)
    assert distance > 0  # the context is random here, so the features are not the hand-crafted ones
    loss.backward()
    assert model.adapt.text.tokens.grad.abs().sum() > 0


def test_prompt_state_keys_and_init_from_the_phrase(tiny):
    model = _model(tiny, n_ctx=4, ctx_init="a photo of a")
    state = model.prompt_state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == {"adapt.text.tokens": [1, 4, 32]}
    phrase = tiny.model.token_embedding(torch.tensor(tiny.tokenizer.encode("a photo of a")))
    assert torch.equal(model.adapt.text.tokens[0], phrase)


def test_token_layout_alone_and_with_boosting_prompts(tiny):
    alone, cascaded = _model(tiny), _model(tiny, TINY_BOOST)
    n = METHOD_CASES["kgcoop"]["n_ctx"]
    assert alone.layout.shared_positions("adapt").tolist() == list(range(1, 1 + n))
    assert cascaded.layout.shared_positions("adapt").tolist() == list(range(1, 1 + n))
    assert cascaded.layout.shared_positions("boost").tolist() == list(range(1 + n, 1 + n + 3))
    cat = tiny.tokenizer.encode("cat")
    assert cascaded.layout.token_ids[0, 1 + n + 3:1 + n + 3 + len(cat)].tolist() == cat
    out = cascaded(torch.randn(2, 3, 32, 32))
    loss, _ = cascaded.adapt.loss(out, {"labels": torch.tensor([0, 1])}, cascaded)
    loss.backward()
    assert all(p.grad is None for p in cascaded.boost.parameters())  # the boosting prompts stay frozen

"""VPT-deep: its loss against a hand computation, its prompt-state keys, and its ±CasPL token layouts."""

import pytest
import torch

from caspl.methods import build_prompted_clip
from conftest import METHOD_CASES, TINY_BOOST

CLASSES = ["cat", "sea lion", "dog", "big red bus"]
TEMPLATES = ["a sketch of a {}.", "art of the {}."]


def _model(tiny, boost=None):
    torch.manual_seed(0)
    return build_prompted_clip(tiny.model, tiny.tokenizer, METHOD_CASES["vpt"], boost).set_classes(CLASSES, TEMPLATES)


def test_loss_is_cross_entropy_and_only_vision_tokens_learn(tiny):
    model = _model(tiny)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([2, 0, 1])
    out = model(images)
    loss, parts = model.adapt.loss(out, {"images": images, "labels": labels}, model)
    ce = float(-out.logits.detach().log_softmax(-1)[torch.arange(3), labels].mean())
    assert float(loss) == pytest.approx(ce, rel=1e-6) and parts == {"ce": pytest.approx(ce, rel=1e-6)}
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["adapt.vision.tokens"]


def test_prompt_state_keys(tiny):
    case = METHOD_CASES["vpt"]
    state = _model(tiny).prompt_state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == {"adapt.vision.tokens": [case["depth"], case["length"], 48]}


def test_text_is_the_template_alone_the_boosted_students_with_caspl_and_vision_tokens_follow_the_boosting_tokens(tiny):
    alone, cascaded = _model(tiny), _model(tiny, TINY_BOOST)
    template = tiny.tokenizer(["a sketch of a cat."])[0]
    assert torch.equal(alone.layout.token_ids[0], template)  # no text prompt: the zero-shot prompt itself
    assert "adapt" not in alone.layout.positions
    assert cascaded.layout.shared_positions("boost").tolist() == [1, 2, 3]
    words = tiny.tokenizer.encode("cat") + tiny.tokenizer.encode(".")  # the boosting tokens replace the template words
    assert cascaded.layout.token_ids[0, 4:5 + len(words)].tolist() == words + [tiny.tokenizer.eot_token_id]
    inserts = cascaded.vision_inserts()  # vision: [CLS, patches, boost(2), vpt(length)]
    assert [i.positions.tolist() for i in inserts] == [[0, 1], list(range(2, 2 + METHOD_CASES["vpt"]["length"]))]
    with torch.no_grad():
        text = cascaded.encode_text()
    assert text.shape == (4, 32)

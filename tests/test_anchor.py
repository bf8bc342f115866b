"""The frozen model that PromptSRC and KgCoOp regularise toward: plain CLIP ("clip", the papers') or, under +CasPL,
the boosted student ("boosted"), whose text layout is the one boosting trained: `[SOS, boost, class, ".", EOS]`."""

import pytest
import torch
import torch.nn.functional as F

from caspl.errors import ConfigError
from caspl.methods import build_prompted_clip
from conftest import METHOD_CASES, TINY_BOOST

CLASSES = ["cat", "sea lion", "dog", "big red bus"]
TEMPLATES = ["a sketch of a {}.", "art of the {}."]


def _model(tiny, method: str, boost=TINY_BOOST, **overrides):
    torch.manual_seed(0)
    adapt = {**METHOD_CASES[method], **overrides}
    return build_prompted_clip(tiny.model, tiny.tokenizer, adapt, boost).set_classes(CLASSES, TEMPLATES)


def _boosted_student(tiny, boost_state: dict):
    """Zero-shot over the same boosting prompts: the boosted student as `caspl evaluate --method zeroshot` sees it."""
    student = build_prompted_clip(tiny.model, tiny.tokenizer, {"method": "zeroshot"}, TINY_BOOST, freeze_boost=True)
    student.boost.load_state_dict(boost_state)
    return student.set_classes(CLASSES, TEMPLATES)


def test_the_boosted_student_text_is_its_boosting_layout_without_template_words(tiny):
    student = _boosted_student(tiny, _model(tiny, "kgcoop").boost.state_dict())
    n = TINY_BOOST["text_length"]
    assert student.layout.shared_positions("boost").tolist() == list(range(1, 1 + n))
    cat_dot = tiny.tokenizer.encode("cat") + tiny.tokenizer.encode(".")
    eot = [tiny.tokenizer.eot_token_id]
    assert student.layout.token_ids[0, 1 + n:1 + n + len(cat_dot) + 1].tolist() == cat_dot + eot


def test_boosted_zero_shot_features_are_the_boosted_students_and_differ_from_plain_clip(tiny):
    model = _model(tiny, "promptsrc")
    with torch.no_grad():  # give the boosting prompts values that move the features
        for p in model.boost.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.5)
    student = _boosted_student(tiny, model.boost.state_dict())
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model.zeroshot_text_features(TEMPLATES, boosted=True), student.encode_text(), atol=1e-6)
        assert torch.allclose(model.zeroshot_image_features(images, boosted=True), student.encode_image(images),
                              atol=1e-6)
        plain_text = model.zeroshot_text_features(TEMPLATES)
        assert (model.zeroshot_text_features(TEMPLATES, boosted=True) - plain_text).abs().max() > 1e-3
        plain_image = model.zeroshot_image_features(images)
        assert (model.zeroshot_image_features(images, boosted=True) - plain_image).abs().max() > 1e-3


def test_without_boosting_prompts_the_boosted_anchor_is_plain_clip(tiny):
    model = _model(tiny, "promptsrc", boost=None)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(model.zeroshot_text_features(TEMPLATES, boosted=True), model.zeroshot_text_features(TEMPLATES))
    assert torch.equal(model.zeroshot_image_features(images, boosted=True), model.zeroshot_image_features(images))


@pytest.mark.parametrize("anchor", ["clip", "boosted"])
def test_kgcoop_pulls_toward_the_anchor_it_names(tiny, anchor):
    model = _model(tiny, "kgcoop", anchor=anchor)
    with torch.no_grad():
        plain = tiny.model.encode_text(tiny.tokenizer([TEMPLATES[0].format(c) for c in CLASSES]))
        expected = (model.zeroshot_text_features(TEMPLATES[:1], boosted=True) if anchor == "boosted" else
                    F.normalize(plain, dim=-1))
    assert torch.allclose(model.adapt.zs_text_features, expected, atol=1e-6)


def test_promptsrc_with_the_boosted_anchor_regularises_toward_the_boosted_students_image_features(tiny):
    model = _model(tiny, "promptsrc", anchor="boosted", image_loss_weight=10.0)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 1])
    out = model(images)
    _, parts = model.adapt.loss(out, {"images": images, "labels": labels}, model)
    boosted = _boosted_student(tiny, model.boost.state_dict())
    with torch.no_grad():
        expected = 10.0 * F.l1_loss(out.image_features, boosted.encode_image(images))
        assert torch.allclose(model.adapt.zs_text_features, boosted.encode_text(), atol=1e-6)
    assert parts["scl_image"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("method", ["kgcoop", "promptsrc"])
def test_an_unknown_anchor_is_refused_naming_the_field(tiny, method):
    with pytest.raises(ConfigError, match="method.anchor.*'clip', 'boosted'.*'student'"):
        _model(tiny, method, anchor="student")

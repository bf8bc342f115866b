"""Methods, the cascade and its token layout, freezing, parameter counts."""

import math

import pytest
import torch
import torch.nn.functional as F

from caspl.errors import CheckpointError, ConfigError
from caspl.methods import BASE, BOOST, build_prompted_clip, list_methods, method_class, method_config
from caspl.methods.promptsrc import GaussianPromptAggregator, gaussian_epoch_weights
from caspl.models import Insert, encode_text
from conftest import METHOD_CASES, TINY_BOOST

CLASSES = ["cat", "sea lion", "dog", "big red bus"]
TEMPLATES = ["a photo of a {}.", "art of the {}.", "a sketch of a {}."]


def _batch(n=2):
    g = torch.Generator().manual_seed(3)
    images = torch.randn(n, 3, 32, 32, generator=g)
    return {"images": images, "labels": torch.tensor([0, 3, 1, 2][:n])}


def _model(tiny, method, boost=None):
    torch.manual_seed(0)
    return build_prompted_clip(tiny.model, tiny.tokenizer, METHOD_CASES[method], boost).set_classes(CLASSES, TEMPLATES)


def test_every_registered_method_has_a_test_case_and_a_kind():
    assert set(METHOD_CASES) | {"boost"} == set(list_methods())
    assert list_methods(BOOST) == ["boost"]
    assert set(list_methods(BASE)) == set(list_methods()) - {"boost", "zeroshot"}
    with pytest.raises(ConfigError, match="unknown method 'nosuch'"):
        method_config("nosuch")
    with pytest.raises(ConfigError, match="unknown config key maple.depht"):
        method_config("maple", depht=3)
    with pytest.raises(ConfigError, match="coop.n_ctx must be an integer >= 1, got 0"):
        method_config("coop", n_ctx=0)


@pytest.mark.parametrize("method", sorted(METHOD_CASES))
def test_method_config_round_trips_through_its_yaml_form(method):
    config = method_config(method, **{k: v for k, v in METHOD_CASES[method].items() if k != "method"})
    again = method_class(method).config_cls.from_config(config.to_config())
    assert again == config and config.to_config()["method"] == method


@pytest.mark.parametrize("method", sorted(METHOD_CASES))
@pytest.mark.parametrize("with_boost", [False, True])
def test_every_method_runs_forward_and_backward(tiny, method, with_boost):
    model = _model(tiny, method, TINY_BOOST if with_boost else None)
    batch = _batch()
    out = model(batch["images"])
    assert out.logits.shape == (2, len(CLASSES)) and torch.isfinite(out.logits).all()
    trainable = model.prompt_parameters()
    if method_class(method).config_cls.kind != BASE:
        assert trainable == []
        return
    loss, parts = model.adapt.loss(out, batch, model)
    loss.backward()
    assert all(p.grad is not None for p in trainable)  # (a dead ReLU unit of CoCoOp's tiny meta-net may get 0)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("tokens") and p.requires_grad)
    assert all(p.grad is None for p in model.clip.parameters())
    if with_boost:  # phase 2: the boosting prompts stay frozen
        assert all(p.grad is None and not p.requires_grad for p in model.boost.parameters())


def test_boost_phase_trains_only_boost_prompts(tiny):
    model = build_prompted_clip(tiny.model, tiny.tokenizer, None, TINY_BOOST).set_classes(CLASSES)
    batch = _batch()
    out = model(batch["images"])
    loss, _ = model.boost.loss(out, {"teacher_logits": torch.randn_like(out.logits)}, model)
    loss.backward()
    names = [n for n, p in model.named_parameters() if p.grad is not None]
    assert names == ["boost.text.tokens", "boost.vision.tokens"]


def test_cascade_token_layout_text(tiny):
    model = _model(tiny, "ivlp", TINY_BOOST)  # text: [SOS, adapt×2, boost×3, class…]
    layout = model.layout
    assert layout.shared_positions("adapt").tolist() == [1, 2]
    assert layout.shared_positions("boost").tolist() == [3, 4, 5]
    sea_lion = tiny.tokenizer.encode("sea lion") + tiny.tokenizer.encode(".")
    assert layout.token_ids[1, 6:6 + len(sea_lion)].tolist() == sea_lion
    assert layout.token_ids[1, 6 + len(sea_lion)] == tiny.tokenizer.eot_token_id


def test_cascade_token_values_at_every_layer(tiny):
    """Hidden states entering each block hold [boost, adapt] (vision) / [adapt, boost] (text) where prompted."""
    model = _model(tiny, "ivlp", TINY_BOOST)
    text_seen, vis_seen = [], []
    hooks = [b.register_forward_pre_hook(lambda m, a, kw: text_seen.append(a[0].detach()), with_kwargs=True)
             for b in model.clip.transformer.resblocks]
    hooks += [b.register_forward_pre_hook(lambda m, a, kw: vis_seen.append(a[0].detach()), with_kwargs=True)
              for b in model.clip.visual.transformer.resblocks]
    with torch.no_grad():
        model(_batch()["images"])
    for h in hooks:
        h.remove()
    boost, adapt = model.boost, model.adapt
    pos = model.clip.positional_embedding
    n_base = 1 + 16
    # input layer: vision [CLS, patches, boost(2), adapt(3)] through ln_pre; text slots get positions
    expected_vis0 = model.clip.visual.ln_pre(torch.cat([boost.vision.tokens[0], adapt.vision.tokens[0]]))
    assert torch.allclose(vis_seen[0][0, n_base:], expected_vis0, atol=1e-6)
    assert torch.allclose(text_seen[0][0, 1:3], adapt.text.tokens[0] + pos[1:3], atol=1e-6)
    assert torch.allclose(text_seen[0][0, 3:6], boost.text.tokens[0] + pos[3:6], atol=1e-6)
    # layer 1: both groups re-inserted in both towers
    assert torch.equal(vis_seen[1][0, n_base:n_base + 2], boost.vision.tokens[1])
    assert torch.equal(vis_seen[1][0, n_base + 2:], adapt.vision.tokens[1])
    assert torch.equal(text_seen[1][0, 1:3], adapt.text.tokens[1])
    assert torch.equal(text_seen[1][0, 3:6], boost.text.tokens[1])
    # layer 2: vision boost depth is 2 (not re-inserted), adapt depth 3 is; text adapt depth 2 stops, boost goes on
    assert not torch.equal(vis_seen[2][0, n_base:n_base + 2], boost.vision.tokens[1])
    assert torch.equal(vis_seen[2][0, n_base + 2:], adapt.vision.tokens[2])
    assert not torch.equal(text_seen[2][0, 1:3], adapt.text.tokens[1])
    assert torch.equal(text_seen[2][0, 3:6], boost.text.tokens[2])


def test_two_token_init_keeps_of_a_between_adapt_and_boost(tiny):
    model = _model(tiny, "maple", TINY_BOOST)  # maple length 2, init "a photo of a"
    of_a = tiny.tokenizer.encode("of a")
    assert model.layout.shared_positions("adapt").tolist() == [1, 2]
    assert model.layout.token_ids[0, 3:5].tolist() == of_a
    assert model.layout.shared_positions("boost").tolist() == [5, 6, 7]
    init = tiny.model.token_embedding(torch.tensor(tiny.tokenizer.encode("a photo")))
    assert torch.equal(model.adapt.text.tokens[0], init)


@pytest.mark.parametrize("position", ["front", "middle"])
def test_coop_class_token_positions(tiny, position):
    adapt = {"method": "coop", "n_ctx": 4, "class_token_position": position}
    model = build_prompted_clip(tiny.model, tiny.tokenizer, adapt, TINY_BOOST).set_classes(CLASSES)
    name_len = len(tiny.tokenizer.encode("sea lion"))
    adapt_pos = model.layout.positions["adapt"][1].tolist()
    if position == "front":
        assert adapt_pos == list(range(1 + name_len, 1 + name_len + 4))
    else:
        assert adapt_pos == [1, 2] + [3 + name_len, 4 + name_len]
    assert model.layout.positions["boost"][1].tolist() == [adapt_pos[-1] + 1 + i for i in range(3)]
    assert model(_batch()["images"]).logits.shape == (2, 4)


def test_class_specific_coop_has_one_context_per_class(tiny):
    adapt = {"method": "coop", "n_ctx": 4, "class_specific": True, "num_classes": 4}
    model = build_prompted_clip(tiny.model, tiny.tokenizer, adapt).set_classes(CLASSES)
    assert model.adapt.ctx.shape == (4, 4, 32)
    with pytest.raises(ConfigError, match="cannot score unseen classes"):
        model.set_classes(CLASSES[:3])


def test_cocoop_prompts_differ_per_image(tiny):
    model = _model(tiny, "cocoop", TINY_BOOST)
    images = _batch()["images"]
    with torch.no_grad():
        feats = model.encode_image(images)
        ctx = model.adapt.text_layers(feats)[0]
        out = model(images)
    assert ctx.shape == (2, 4, 32) and not torch.allclose(ctx[0], ctx[1])
    assert out.text_features.shape == (2, 4, 32) and not torch.allclose(out.text_features[0], out.text_features[1])


VIT_B16_COUNTS = {  # derived in docs/prompt_state.md from widths 512 (text) / 768 (vision), embed 512
    ("boost", (("text_length", 8), ("vision_length", 8), ("text_depth", 12), ("vision_depth", 12))): 122_880,
    ("ivlp", (("text_length", 4), ("vision_length", 4), ("text_depth", 9), ("vision_depth", 9))): 46_080,
    ("promptsrc", (("text_length", 4), ("vision_length", 4), ("text_depth", 9), ("vision_depth", 9))): 46_080,
    ("maple", (("length", 2), ("depth", 9))): 9 * 2 * 512 + 9 * (512 * 768 + 768),
    ("coop", (("n_ctx", 16),)): 16 * 512,
    ("kgcoop", (("n_ctx", 4),)): 4 * 512,
    ("vpt", (("length", 8), ("depth", 12))): 12 * 8 * 768,
    ("cocoop", (("n_ctx", 8),)): 8 * 512 + (512 * 32 + 32) + (32 * 512 + 512),
}


@pytest.mark.parametrize("method,values", list(VIT_B16_COUNTS), ids=[m for m, _ in VIT_B16_COUNTS])
def test_parameter_counts_on_vit_b16(vit_b16, method, values):
    module = build_prompted_clip(vit_b16.model, vit_b16.tokenizer, {"method": method, **dict(values)})
    assert sum(p.numel() for p in module.prompt_parameters()) == VIT_B16_COUNTS[(method, values)]


def test_depth_beyond_the_model_is_refused(tiny):
    with pytest.raises(ConfigError, match="ivlp.text_depth 5 is outside 1..3"):
        build_prompted_clip(tiny.model, tiny.tokenizer, {"method": "ivlp", "text_depth": 5, "vision_depth": 2})


def test_promptsrc_loss_terms_match_hand_computation(tiny):
    model = _model(tiny, "promptsrc")
    batch = _batch()
    out = model(batch["images"])
    loss, parts = model.adapt.loss(out, batch, model)
    # hand computation from the frozen CLIP, without the library's zero-shot helpers
    with torch.no_grad():
        zs_img = F.normalize(tiny.model.encode_image(batch["images"]), dim=-1)
        raw = torch.stack([tiny.model.encode_text(tiny.tokenizer([t.format(c) for c in CLASSES])) for t in TEMPLATES])
        zs_txt = F.normalize(raw.mean(0), dim=-1)
        zs_logits = tiny.model.logit_scale.exp() * zs_img @ zs_txt.t()
    logits = out.logits.detach()
    p = zs_logits.softmax(-1)
    kl = (p * (p.log() - logits.log_softmax(-1))).sum() / logits.numel()
    ce = -logits.log_softmax(-1)[torch.arange(2), batch["labels"]].mean()
    l1_text = (out.text_features.detach() - zs_txt).abs().mean() * 25
    l1_image = (out.image_features.detach() - zs_img).abs().mean() * 10
    assert parts["ce"] == pytest.approx(float(ce), rel=1e-5)
    assert parts["scl_logits"] == pytest.approx(float(kl), rel=1e-4, abs=1e-7)
    assert parts["scl_text"] == pytest.approx(float(l1_text), rel=1e-5)
    assert parts["scl_image"] == pytest.approx(float(l1_image), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(ce + kl + l1_text + l1_image), rel=1e-5)


def test_gpa_weights_match_hand_computed_gaussian():
    weights = gaussian_epoch_weights(20, mean=15, std=1)
    raw = [math.exp(-((e - 15) ** 2) / 2) for e in range(1, 21)]
    assert weights.tolist() == pytest.approx([r / sum(raw) for r in raw], rel=1e-12)
    assert int(weights.argmax()) == 14 and float(weights.sum()) == pytest.approx(1.0)


def test_gpa_aggregates_and_survives_a_state_round_trip():
    agg = GaussianPromptAggregator(3, mean=2, std=1)
    states = [{"adapt.t": torch.full((2,), float(e))} for e in (1, 2, 3)]
    agg.add_epoch(1, states[0])
    resumed = GaussianPromptAggregator(3, mean=2, std=1)
    resumed.load_state_dict(agg.state_dict())
    for agg_ in (agg, resumed):
        agg_.add_epoch(2, states[1])
        agg_.add_epoch(3, states[2])
    w = gaussian_epoch_weights(3, 2, 1)
    expected = float(w[0] * 1 + w[1] * 2 + w[2] * 3)
    assert resumed.aggregated(states[0])["adapt.t"].tolist() == pytest.approx([expected] * 2)
    assert torch.equal(resumed.aggregated(states[0])["adapt.t"], agg.aggregated(states[0])["adapt.t"])
    with pytest.raises(CheckpointError, match="another epoch count"):
        GaussianPromptAggregator(4, 2, 1).load_state_dict(agg.state_dict())


def test_insert_positions_can_differ_per_sequence(tiny):
    """Per-sequence positions [N, n] put each sequence's values at its own slots and leave every other token alone."""
    tokens = tiny.tokenizer(["a b c d e", "a b c d e"])
    positions = torch.tensor([[1], [3]])
    values = torch.randn(2, 1, tiny.model.token_embedding.embedding_dim)
    seen = []
    hook = tiny.model.transformer.resblocks[1].register_forward_pre_hook(
        lambda m, a, kw: seen.append(a[0].detach()), with_kwargs=True)
    with torch.no_grad():
        plain = encode_text(tiny.model, tokens)
        encode_text(tiny.model, tokens, [Insert(positions, [None, values])])
    hook.remove()
    before, after = seen
    assert torch.equal(after[0, 1], values[0, 0]) and torch.equal(after[1, 3], values[1, 0])
    untouched = torch.ones(after.shape[:2], dtype=torch.bool)
    untouched[0, 1] = untouched[1, 3] = False
    assert torch.equal(after[untouched], before[untouched])  # block 0 saw no insert: every other token is as without
    assert not torch.equal(after[0, 3], values[1, 0])  # the rows did not share each other's slot
    assert torch.equal(plain, encode_text(tiny.model, tokens))  # inserts leave nothing behind in the model

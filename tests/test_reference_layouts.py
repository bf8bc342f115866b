"""Pins the text layouts documented in docs/reference_differences.md (where caspl departs from the authors' code).

Each test builds the cascade on the tiny CLIP through the public API and checks the token sequence at the input
(`model.layout`) and, with hooks on the text blocks, what enters every deeper block: prompt slots get the layer's
prompt values, every other position (class-name tokens, fixed words such as "of a") carries the previous block's
output unchanged.
"""

from __future__ import annotations

import pytest
import torch

from caspl.methods import build_prompted_clip
from caspl.models.layout import PLACEHOLDER

CLASSES = ["cat", "sea lion", "big red bus"]
INIT = "a photo of a"
BOOST = {"method": "boost", "text_length": 3, "vision_length": 2, "text_depth": 3, "vision_depth": 2}


def _build(tiny, adapt, boost=BOOST):
    torch.manual_seed(0)
    return build_prompted_clip(tiny.model, tiny.tokenizer, adapt, boost).set_classes(CLASSES)


def _ids(tiny, text: str) -> list[int]:
    return tiny.tokenizer.encode(text)


def _row(model, c: int) -> list[int]:
    """Token ids of class c up to and including EOS."""
    row = model.layout.token_ids[c].tolist()
    return row[: row.index(model.tokenizer.eot_token_id) + 1]


def _expected_row(tiny, *parts) -> list[int]:
    """[SOS] + parts (int n = n placeholder slots, str = words) + [EOS]."""
    ids = [tiny.tokenizer.sot_token_id]
    for part in parts:
        ids += _ids(tiny, PLACEHOLDER) * part if isinstance(part, int) else _ids(tiny, part)
    return ids + [tiny.tokenizer.eot_token_id]


def _name_positions(tiny, model, c: int) -> list[int]:
    """Where the class name's tokens sit in row c, found by searching the row (independent of the slot bookkeeping)."""
    name, row = _ids(tiny, CLASSES[c]), _row(model, c)
    starts = [i for i in range(len(row)) if row[i:i + len(name)] == name]
    assert len(starts) == 1, f"class name {CLASSES[c]!r} not found exactly once in {row}"
    return list(range(starts[0], starts[0] + len(name)))


def _text_block_io(model, run) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Hidden states entering and leaving each text block during `run()`; each [N, L, D]."""
    entering, leaving = [], []
    blocks = model.clip.transformer.resblocks
    hooks = [b.register_forward_pre_hook(lambda m, a, kw: entering.append(a[0].detach()), with_kwargs=True)
             for b in blocks]
    hooks += [b.register_forward_hook(lambda m, a, out: leaving.append(out.detach())) for b in blocks]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    assert len(entering) == len(leaving) == len(blocks)
    return entering, leaving


def _check_deeper_layers(tiny, model, entering, leaving, carried: list[int] = ()) -> None:
    """At every block after the first: slots hold their prompt values, every other position is carried over.

    `carried`: extra positions (shared by all classes) that must be carried, e.g. the fixed words "of a".
    """
    n_seq, length, _ = entering[0].shape
    for layer in range(1, len(entering)):
        replaced = torch.zeros(n_seq, length, dtype=torch.bool)
        for role in ("adapt", "boost"):
            source = getattr(model, role)
            if source is None:
                continue
            values = source.text.per_layer()  # the group's raw per-layer tokens (CoCoOp's bias only touches layer 0)
            if layer < len(values):
                positions = model.layout.positions[role]
                for c in range(n_seq):
                    assert torch.equal(entering[layer][c, positions[c]], values[layer])
                    replaced[c, positions[c]] = True
        for c in range(n_seq):
            name = _name_positions(tiny, model, c)
            assert not replaced[c, name].any(), f"layer {layer} overwrites class-name tokens of {CLASSES[c]!r}"
            assert torch.equal(entering[layer][c, name], leaving[layer - 1][c, name])
            assert torch.equal(entering[layer][c, list(carried)], leaving[layer - 1][c, list(carried)])
        assert replaced.any(), f"nothing was re-inserted before block {layer}; the check would be vacuous"
        assert torch.equal(entering[layer][~replaced], leaving[layer - 1][~replaced])


def test_a_boost_init_words_never_follow_the_boosting_tokens(tiny):
    """(a) 2 boosting text tokens, init "a photo of a": "of a" is dropped in phase 1 as in phase 2."""
    boost = {**BOOST, "text_length": 2, "ctx_init": INIT}
    phase1 = _build(tiny, None, boost)
    adapt4 = {"method": "ivlp", "text_length": 4, "vision_length": 2, "text_depth": 3, "vision_depth": 3}
    phase2 = _build(tiny, adapt4, boost)
    for c, name in enumerate(CLASSES):
        assert _row(phase1, c) == _expected_row(tiny, 2, name, ".")
        assert _row(phase2, c) == _expected_row(tiny, 4 + 2, name, ".")
        for model in (phase1, phase2):  # the class name follows the last boosting slot in both phases
            assert _name_positions(tiny, model, c)[0] == int(model.layout.positions["boost"][c, -1]) + 1
    assert phase1.layout.positions["boost"][0].tolist() == [1, 2]
    assert phase2.layout.positions["boost"][0].tolist() == [5, 6]
    embedding = tiny.model.token_embedding(torch.tensor(_ids(tiny, "a photo")))
    assert torch.equal(phase1.boost.text.tokens[0], embedding)  # initialised from the phrase's first 2 words
    _check_deeper_layers(tiny, phase1, *_text_block_io(phase1, phase1.encode_text))


@pytest.mark.parametrize("ctx_init", [INIT, None], ids=["init", "no_init"])
def test_b_promptsrc_two_tokens_keeps_class_name_states(tiny, ctx_init):
    """(b) PromptSRC with 2 text tokens: "of a" (init) sits between adapt and boost at every layer; no init: none."""
    adapt = {"method": "promptsrc", "text_length": 2, "vision_length": 2, "text_depth": 3, "vision_depth": 3,
             "ctx_init": ctx_init}
    model = _build(tiny, adapt)
    words = ["of a"] if ctx_init else []
    for c, name in enumerate(CLASSES):
        assert _row(model, c) == _expected_row(tiny, 2, *words, 3, name, ".")
    assert model.layout.positions["adapt"][0].tolist() == [1, 2]
    assert model.layout.positions["boost"][0].tolist() == ([5, 6, 7] if ctx_init else [3, 4, 5])
    carried = [3, 4] if ctx_init else []  # "of a" keeps its own hidden states (the reference's deeper "midfix")
    if ctx_init:
        assert model.layout.token_ids[:, 3:5].tolist() == [_ids(tiny, "of a")] * len(CLASSES)
    _check_deeper_layers(tiny, model, *_text_block_io(model, model.encode_text), carried=carried)


@pytest.mark.parametrize("method", ["coop", "cocoop"])
def test_c_two_context_tokens_with_init_keep_of_a_and_add_no_placeholders(tiny, method):
    """(c) CoOp/CoCoOp, n_ctx 2 + init: [SOS, adapt("a photo"), "of", "a", boost, class…]; no stray placeholders."""
    adapt = {"method": method, "n_ctx": 2, "ctx_init": INIT, **({"meta_hidden_ratio": 4} if method == "cocoop" else {})}
    model = _build(tiny, adapt)
    placeholder = _ids(tiny, PLACEHOLDER)[0]
    for c, name in enumerate(CLASSES):
        row = _row(model, c)
        assert row == _expected_row(tiny, 2, "of a", 3, name, ".")
        assert row.count(placeholder) == 2 + 3  # exactly the adapt + boost slots
    assert model.layout.positions["adapt"][0].tolist() == [1, 2]
    assert model.layout.positions["boost"][0].tolist() == [5, 6, 7]
    embedding = tiny.model.token_embedding(torch.tensor(_ids(tiny, "a photo")))
    assert torch.equal(model.adapt.text.tokens[0], embedding)
    image_features = model.encode_image(torch.randn(1, 3, 32, 32)) if method == "cocoop" else None
    entering, leaving = _text_block_io(model, lambda: model.encode_text(image_features))
    _check_deeper_layers(tiny, model, entering, leaving, carried=[3, 4])


@pytest.mark.parametrize("position", ["front", "middle"])
def test_d_coop_class_token_front_or_middle_with_boost_trains(tiny, position):
    """(d) The reference crashes here; caspl runs forward and backward with boost slots after the context."""
    model = _build(tiny, {"method": "coop", "n_ctx": 4, "class_token_position": position})
    for c, name in enumerate(CLASSES):
        expected = (_expected_row(tiny, name, 4, 3, ".") if position == "front"
                    else _expected_row(tiny, 2, name, 2, 3, "."))
        assert _row(model, c) == expected
        adapt, boost = model.layout.positions["adapt"][c].tolist(), model.layout.positions["boost"][c].tolist()
        assert boost == list(range(adapt[-1] + 1, adapt[-1] + 4))
        if position == "middle":
            assert _name_positions(tiny, model, c) == list(range(adapt[1] + 1, adapt[2]))
    torch.manual_seed(1)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    entering, leaving = _text_block_io(model, lambda: model(images))
    _check_deeper_layers(tiny, model, entering, leaving)
    out = model(images)
    assert out.logits.shape == (2, len(CLASSES)) and torch.isfinite(out.logits).all()
    loss, _ = model.adapt.loss(out, {"images": images, "labels": labels}, model)
    loss.backward()
    assert model.adapt.text.tokens.grad is not None and model.adapt.text.tokens.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.boost.parameters())


def test_e_maple_two_tokens_without_init_keeps_the_whole_class_name(tiny):
    """(e) MaPLe with 2 tokens and no init phrase: no fixed words, and every class-name token stays."""
    model = _build(tiny, {"method": "maple", "length": 2, "depth": 3, "ctx_init": None})
    for c, name in enumerate(CLASSES):
        assert _row(model, c) == _expected_row(tiny, 2, 3, name, ".")
    _check_deeper_layers(tiny, model, *_text_block_io(model, model.encode_text))


@pytest.mark.parametrize("method", ["coop", "cocoop"])
def test_f_more_context_tokens_than_init_words_start_random_and_keep_the_class_name(tiny, method):
    """(f) n_ctx 8 + init "a photo of a": random init, no leftover words, the class name complete."""
    adapt = {"method": method, "n_ctx": 8, "ctx_init": INIT, **({"meta_hidden_ratio": 4} if method == "cocoop" else {})}
    model = _build(tiny, adapt)
    for c, name in enumerate(CLASSES):
        assert _row(model, c) == _expected_row(tiny, 8 + 3, name, ".")
    init_words = tiny.model.token_embedding(torch.tensor(_ids(tiny, INIT)))
    assert not torch.allclose(model.adapt.text.tokens[0, :4], init_words)


PAPER_ADAPT = {
    "ivlp": lambda n: {"text_length": n, "vision_length": 4, "text_depth": 3, "vision_depth": 3, "ctx_init": INIT},
    "promptsrc": lambda n: {"text_length": n, "vision_length": 4, "text_depth": 3, "vision_depth": 3, "ctx_init": INIT},
    "maple": lambda n: {"length": n, "depth": 3, "ctx_init": INIT},
    "coop": lambda n: {"n_ctx": n, "ctx_init": INIT},
    "cocoop": lambda n: {"n_ctx": n, "ctx_init": INIT, "meta_hidden_ratio": 4},
}


@pytest.mark.parametrize("n_adapt,n_boost", [(4, 4), (8, 8), (16, 8)])
@pytest.mark.parametrize("method", sorted(PAPER_ADAPT))
def test_paper_token_counts_have_no_fixed_words(tiny, method, n_adapt, n_boost):
    """With 4, 8 or 16 tokens every layout is [SOS, adapt, boost, class…, ".", EOS], as in the reference."""
    boost = {**BOOST, "text_length": n_boost, "ctx_init": INIT}
    model = _build(tiny, {"method": method, **PAPER_ADAPT[method](n_adapt)}, boost)
    for c, name in enumerate(CLASSES):
        assert _row(model, c) == _expected_row(tiny, n_adapt + n_boost, name, ".")
    if n_adapt == 4:  # exactly as many init words as tokens: initialised from them, nothing left over
        embedding = tiny.model.token_embedding(torch.tensor(_ids(tiny, INIT)))
        assert torch.equal(model.adapt.text.tokens[0], embedding)

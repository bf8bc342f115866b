"""ToyWorld teacher/student pretraining: determinism, the content-addressed cache, corruption, strict loading."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from caspl.artifacts import ArtifactStore, sha256_file
from caspl.errors import ConfigError
from caspl.models import ModelSpec, load_clip
from caspl.train import toyworld_pretrain as tp
from caspl.train.metrics import harmonic_mean

TINY = tp.Recipe(domains=("clean", "noisy"), steps=3, batch_size=16, warmup=1, eval_datasets=())
TINY_RECIPES = {tp.TEACHER: tp.Recipe(domains=tp.RECIPES[tp.TEACHER].domains, steps=2, batch_size=16, warmup=1,
                                      seed=1, eval_datasets=()),
                tp.STUDENT: TINY}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _domain_share(recipe: tp.Recipe, domain: str) -> float:
    weights = recipe.domain_weights or (1.0,) * len(recipe.domains)
    return sum(w for d, w in zip(recipe.domains, weights) if d == domain) / sum(weights)


def test_student_is_weaker_and_deep_enough():
    from caspl.data.toyworld import TOY_DATASETS

    teacher, student = (tp.architecture_config(n) for n in (tp.TEACHER, tp.STUDENT))
    assert student["vision_cfg"]["layers"] >= 4 and student["text_cfg"]["layers"] >= 4
    assert student["vision_cfg"]["patch_size"] > teacher["vision_cfg"]["patch_size"]  # fewer tokens: weaker
    assert all(cfg["vision_cfg"]["image_size"] == 32 and cfg["text_cfg"]["context_length"] <= 32
               for cfg in (teacher, student))
    assert set(tp.RECIPES[tp.STUDENT].domains) < set(tp.RECIPES[tp.TEACHER].domains)
    table_domains = {d for name in tp.EVAL_DATASETS for d in TOY_DATASETS[name].domains}
    for domain in table_domains:  # the table's domains: a rare sight for the student, a common one for the teacher
        assert _domain_share(tp.RECIPES[tp.STUDENT], domain) < 0.01 < 0.15 < _domain_share(tp.RECIPES[tp.TEACHER],
                                                                                            domain)


def test_training_is_deterministic_and_seeded():
    first, stats = tp.train_clip(tp.STUDENT, TINY)
    second, _ = tp.train_clip(tp.STUDENT, TINY)
    other_seed, _ = tp.train_clip(tp.STUDENT, tp.Recipe(**{**TINY.__dict__, "seed": 7}))
    assert _equal(first, second)
    assert not _equal(first, other_seed)
    assert math.isfinite(stats["final_loss"])


def test_cache_round_trip_builds_once_and_in_parallel_the_same_weights(tmp_path):
    store = ArtifactStore(tmp_path)
    built = tp.build_toyworld_models(store, recipes=TINY_RECIPES, progress=False, parallel=True)  # a process each
    again = tp.build_toyworld_models(store, recipes=TINY_RECIPES, progress=False)
    assert all(r["built"] for r in built.values()) and not any(r["built"] for r in again.values())
    one_by_one = tp.build_toyworld_models(ArtifactStore(tmp_path / "seq"), recipes=TINY_RECIPES, progress=False,
                                          parallel=False)
    for name in TINY_RECIPES:
        assert one_by_one[name]["key"] == built[name]["key"]
        assert _equal(load_file(one_by_one[name]["weights"]), load_file(built[name]["weights"]))
    for name in TINY_RECIPES:
        assert again[name]["weights"] == built[name]["weights"]
        assert again[name]["info"]["recipe"]["steps"] == TINY_RECIPES[name].steps
    assert built[tp.TEACHER]["key"] != built[tp.STUDENT]["key"]
    forced = tp.build_model(tp.STUDENT, TINY, store, force=True, progress=False)
    assert forced["built"] and _equal(load_file(forced["weights"]), load_file(built[tp.STUDENT]["weights"]))


def test_corrupted_weights_are_detected_and_rebuilt(tmp_path):
    store = ArtifactStore(tmp_path)
    first = tp.build_model(tp.STUDENT, TINY, store, progress=False)
    digest = sha256_file(first["weights"])
    data = bytearray(first["weights"].read_bytes())
    data[-8:] = bytes(8)  # zero the tail of the last tensor: the file still parses, only the checksum knows
    first["weights"].write_bytes(bytes(data))
    rebuilt = tp.build_model(tp.STUDENT, TINY, store, progress=False)
    assert rebuilt["built"]
    assert sha256_file(rebuilt["weights"]) == digest


def test_load_clip_toyworld_is_strict_and_cached(monkeypatch, tmp_path, capfd, caplog):
    for name, recipe in TINY_RECIPES.items():
        monkeypatch.setitem(tp.RECIPES, name, recipe)
    # a store of its own: the session's shared store may hold the tiny student already (the smoke-source test builds
    # the same key), and then load_clip rightly builds no partner
    monkeypatch.setenv("CASPL_CACHE", str(tmp_path))
    caplog.set_level(logging.WARNING)  # conftest hushes the root logger to errors
    loaded = load_clip(ModelSpec(tp.STUDENT, pretrained="toyworld"))
    told = capfd.readouterr().err  # minutes of building on first use: announced, with progress, no "randomly"
    assert f"building ToyWorld weights (toyworld) for {tp.TEACHER}, {tp.STUDENT}" in told, told
    assert f"pretrain {tp.STUDENT}" in told, told
    assert not [r for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]
    expected = tp.build_model(tp.STUDENT, progress=False)
    assert not expected["built"]  # load_clip built it into the default store
    assert not tp.build_model(tp.TEACHER, progress=False)["built"]  # and its partner with it
    assert loaded.checkpoint == str(expected["weights"])
    state = load_file(expected["weights"])
    assert _equal({k: v for k, v in loaded.model.state_dict().items() if k in state}, state)
    with pytest.raises(ConfigError, match="toyworld"):
        load_clip(ModelSpec("caspl-tiny", pretrained="toyworld"))


def test_smoke_source_is_the_same_recipe_at_a_tenth_of_the_steps_under_its_own_key(monkeypatch):
    """`pretrained: toyworld-smoke` (smoke tests, CI) trains the same architecture on the same domains, briefly, and
    never shares a cache entry with the real weights."""
    for name, recipe in tp.RECIPES.items():
        smoke = tp.SMOKE_RECIPES[name]
        assert smoke.domains == recipe.domains and smoke.seed == recipe.seed and smoke.steps <= recipe.steps // 10
        assert tp.model_key(name, smoke) != tp.model_key(name, recipe)
    monkeypatch.setitem(tp.SMOKE_RECIPES, tp.STUDENT, TINY)
    loaded = load_clip(ModelSpec(tp.STUDENT, pretrained="toyworld-smoke"))
    assert loaded.checkpoint == str(tp.build_model(tp.STUDENT, TINY, progress=False)["weights"])
    assert loaded.checkpoint != str(ArtifactStore().folder(tp.KIND, tp.model_key(tp.STUDENT, tp.RECIPES[tp.STUDENT]))
                                 / tp.WEIGHTS_FILE)



def test_redefining_an_evaluation_dataset_changes_the_key(monkeypatch):
    """info.json reports zero-shot accuracy on the recipe's evaluation datasets: a dataset given other classes must
    not be reported with the numbers measured on its old definition."""
    from dataclasses import replace

    from caspl.data.toyworld.datasets import TOY_DATASETS

    recipe = tp.RECIPES[tp.STUDENT]
    faded_only = replace(recipe, eval_datasets=("toy_faded",))
    before = tp.model_key(tp.STUDENT, recipe), tp.model_key(tp.STUDENT, faded_only)
    redefined = replace(TOY_DATASETS["toy_night"], template="a night photo of a {}.")
    monkeypatch.setitem(TOY_DATASETS, "toy_night", redefined)
    assert tp.model_key(tp.STUDENT, recipe) != before[0]
    assert tp.model_key(tp.STUDENT, faded_only) == before[1]  # a recipe that does not evaluate it keeps its key


EVAL_RECIPES = {name: tp.Recipe(**{**recipe.__dict__, "eval_datasets": ("toy_sketch",)})
                for name, recipe in TINY_RECIPES.items()}


def test_zeroshot_metrics_stored_with_the_model():
    store = ArtifactStore()  # the session's test store: the CLI test below reuses the dataset and this build
    result = tp.build_model(tp.STUDENT, EVAL_RECIPES[tp.STUDENT], store, progress=False)
    metrics = result["info"]["zeroshot"]["toy_sketch"]
    assert 0 <= metrics["base"] <= 100 and 0 <= metrics["novel"] <= 100
    assert metrics["hm"] == pytest.approx(harmonic_mean(metrics["base"], metrics["novel"]), abs=0.01)
    loaded = load_clip(ModelSpec(tp.STUDENT, pretrained=str(result["weights"])))
    assert tp.zeroshot_base_novel(loaded, "toy_sketch", store) == pytest.approx(metrics, abs=0.01)
    table = tp.format_zeroshot_table({tp.STUDENT: result})
    assert "toy_sketch" in table and f"{metrics['hm']:.2f}" in table


def test_cli_toyworld_build_prints_table(monkeypatch, capsys):
    from caspl.cli import main

    for name, recipe in EVAL_RECIPES.items():
        monkeypatch.setitem(tp.RECIPES, name, recipe)
    assert main(["toyworld", "build"]) == 0
    out = capsys.readouterr().out
    student_hm = tp.build_model(tp.STUDENT, progress=False)["info"]["zeroshot"]["toy_sketch"]["hm"]
    assert "toy_sketch" in out and tp.TEACHER in out and f"{student_hm:.2f}" in out


def test_lr_schedule_warms_up_then_decays():
    recipe = tp.Recipe(domains=("clean",), steps=100, lr=1e-3, warmup=10, final_lr_fraction=0.1)
    assert tp.lr_at(recipe, 0) == pytest.approx(1e-4)
    assert tp.lr_at(recipe, 9) == pytest.approx(1e-3)
    assert tp.lr_at(recipe, 99) == pytest.approx(1e-4)
    assert tp.lr_at(recipe, 50) < tp.lr_at(recipe, 20)


def test_contrastive_loss_counts_identical_captions_as_positives():
    import torch.nn.functional as F

    torch.manual_seed(0)
    images, texts = (F.normalize(torch.randn(3, 8), dim=-1) for _ in range(2))
    logits = 10.0 * images @ texts.T
    scale = torch.tensor(math.log(10.0))
    labels = torch.arange(3)
    clip_loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert tp.contrastive_loss(images, texts, scale, ["a", "b", "c"]).item() == pytest.approx(clip_loss.item())

    def soft_ce(log_probs: torch.Tensor) -> torch.Tensor:  # captions 0 and 1 are the same: half the target on each
        per_row = [(log_probs[0, 0] + log_probs[0, 1]) / 2, (log_probs[1, 0] + log_probs[1, 1]) / 2, log_probs[2, 2]]
        return -torch.stack(per_row).mean()

    expected = (soft_ce(logits.log_softmax(1)) + soft_ce(logits.T.log_softmax(1))) / 2
    assert tp.contrastive_loss(images, texts, scale, ["a", "a", "c"]).item() == pytest.approx(expected.item())


def test_smoke_overrides_swap_only_toyworld_weights_for_the_smoke_recipes():
    """The study's and the toy table's smoke tests train on `toyworld-smoke` weights; other weights stay as given."""
    from caspl.config import load_yaml
    from studies.boost_sweep import DEFAULT_CONFIG, smoke_overrides

    study = smoke_overrides(load_yaml(DEFAULT_CONFIG))
    assert study["student"]["pretrained"] == study["teacher"]["pretrained"] == "toyworld-smoke"
    tagged = {"name": "ViT-B-16", "pretrained": "openai"}
    assert tp.with_smoke_weights(tagged) == tagged
    assert tp.with_smoke_weights({"name": "caspl-tiny"}) == {"name": "caspl-tiny"}

"""Protocols and metrics: hand-computed base/novel/HM and seed aggregation, class lists of the few-shot and
cross-dataset protocols, text features once per class set (CoCoOp per image)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

import caspl.train.protocols as protocols
from caspl.config import from_dict
from caspl.data import Dataset, Item
from caspl.errors import ConfigError
from caspl.methods import BASE, build_prompted_clip, list_methods
from caspl.train.adapt import AdaptRunConfig
from caspl.train.metrics import aggregate_seeds, harmonic_mean
from conftest import METHOD_CASES

SKETCH = {"dataset": "toy_sketch", "options": {"n_train": 4, "n_val": 2, "n_test": 2}}
TEXTURES = {"dataset": "toy_textures", "options": {"n_train": 2, "n_val": 1, "n_test": 2}}


def _cfg(method=None, **overrides) -> AdaptRunConfig:
    data = {"student": {"name": "caspl-tiny"}, "data": SKETCH, "method": method or METHOD_CASES["coop"],
            "shots": 2, "seeds": [1, 2], "optim": {"lr": 0.01, "epochs": 1, "batch_size": 8, "warmup_epochs": 0}}
    return from_dict(AdaptRunConfig, {**data, **overrides})


def test_harmonic_mean_and_seed_aggregation_by_hand():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(0.0, 0.0) == 0.0
    rows = [{"base": 80.0, "novel": 60.0}, {"base": 70.0, "novel": 50.0}, {"base": 90.0, "novel": 40.0}]
    out = aggregate_seeds(rows)
    assert out["seeds"] == 3 and out["base"] == pytest.approx(80.0) and out["novel"] == pytest.approx(50.0)
    assert out["base_std"] == pytest.approx(10.0) and out["novel_std"] == pytest.approx(10.0)
    assert out["hm"] == pytest.approx(2 * 80 * 50 / 130)  # HM of the means, not the mean of per-seed HMs
    assert out["hm"] != pytest.approx(sum(harmonic_mean(r["base"], r["novel"]) for r in rows) / 3)


class _ColourOracle(torch.nn.Module):
    """Predicts, for each image, the class index written into its red channel (index * 20)."""

    def __init__(self, spec):
        super().__init__()
        self.clip = torch.nn.Module()
        self.clip.logit_scale = torch.nn.Parameter(torch.zeros(()))
        self.clip.visual = torch.nn.Module()
        self.clip.visual.preprocess_cfg = {"size": 8, "mean": spec[0], "std": spec[1]}
        self.adapt, self.classnames, self.text_calls = None, [], 0

    @property
    def device(self):
        return torch.device("cpu")

    def set_classes(self, classnames, templates=()):
        self.classnames = list(classnames)
        return self

    def encode_text(self):
        self.text_calls += 1
        return torch.zeros(len(self.classnames), 1)

    def forward(self, images, text_features=None):
        red = images[:, 0].mean(dim=(1, 2)) * self.clip.visual.preprocess_cfg["std"][0] \
            + self.clip.visual.preprocess_cfg["mean"][0]
        predicted = torch.round(red * 255 / 20).long().clamp(0, len(self.classnames) - 1)
        return type("Out", (), {"logits": torch.nn.functional.one_hot(predicted, len(self.classnames)).float()})


def _oracle_dataset(tmp_path) -> Dataset:
    """4 classes (base 0, 1; novel 2, 3). Base: 3 of 4 right (75 %); novel: 1 of 2 right (50 %); HM 60."""
    plan = [(0, 0), (0, 0), (1, 1), (1, 0),  # (true label, predicted index among the subset's classes)
            (2, 0), (3, 0)]  # novel labels 2, 3 become 0, 1 after relabelling: first right, second wrong
    test = []
    for n, (label, predicted) in enumerate(plan):
        path = tmp_path / f"img{n}.png"
        Image.fromarray(np.full((8, 8, 3), predicted * 20, dtype=np.uint8)).save(path)
        test.append(Item(str(path), label, f"class{label}"))
    return Dataset(name="oracle", classnames=[f"class{i}" for i in range(4)], template="a photo of a {}.",
                   train=[], val=[], test=test, root=str(tmp_path))


def test_base_novel_accuracy_matches_hand_computation(tmp_path):
    model = _ColourOracle(((0.0,) * 3, (1.0,) * 3))
    metrics = protocols.evaluate_base_novel(model, _oracle_dataset(tmp_path), batch_size=2)
    assert metrics["base"] == pytest.approx(75.0) and metrics["novel"] == pytest.approx(50.0)
    assert metrics["hm"] == pytest.approx(60.0)
    assert model.text_calls == 2  # once per class set, not once per batch


def test_text_features_once_per_class_set_except_cocoop(tiny, monkeypatch):
    from caspl.data import build_dataset

    dataset = build_dataset("toy_sketch", None, **SKETCH["options"])
    for method, expected in ((METHOD_CASES["ivlp"], 2), (METHOD_CASES["cocoop"], 2 * 3)):
        model = build_prompted_clip(tiny.model, tiny.tokenizer, method)
        calls = []
        original = model.encode_text
        monkeypatch.setattr(model, "encode_text", lambda *a, **k: calls.append(1) or original(*a, **k))
        protocols.evaluate_base_novel(model, dataset, batch_size=7)  # 20 test images a subset: 3 batches
        assert len(calls) == expected, method


def _spy_evaluations(monkeypatch):
    seen = []
    original = protocols.accuracy

    def spy(model, items, spec, batch_size=256):
        seen.append((list(model.classnames), sorted({i.label for i in items}), len(items)))
        return original(model, items, spec, batch_size)

    monkeypatch.setattr(protocols, "accuracy", spy)
    return seen


def test_few_shot_protocol_trains_and_tests_on_all_classes(tiny, monkeypatch):
    from caspl.data import build_dataset

    trained = []
    original_run = protocols.run_adapt

    def run_spy(cfg, seed, *args, **kwargs):
        outcome = original_run(cfg, seed, *args, **kwargs)
        trained.append((cfg.shots, seed, outcome.train))
        return outcome

    monkeypatch.setattr(protocols, "run_adapt", run_spy)
    seen = _spy_evaluations(monkeypatch)
    results = protocols.few_shot(_cfg(), shots=(1, 2), student=tiny, log=lambda line: None)
    dataset = build_dataset("toy_sketch", None, **SKETCH["options"])
    assert [r.extra["shots"] for r in results] == [1, 2] and [len(r.per_seed) for r in results] == [2, 2]
    assert [(k, s) for k, s, _ in trained] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for k, _, split in trained:
        assert split.classnames == dataset.classnames  # all 20 classes, not the base half
        assert len(split.train) == k * 20 and len(split.val) == min(k, 4, 2) * 20
    test_evals = [s for s in seen if s[2] == len(dataset.test)]
    assert len(test_evals) == 4 and all(names == dataset.classnames for names, _, _ in test_evals)
    assert all(labels == list(range(20)) for _, labels, _ in test_evals)
    summary = results[0].summary
    assert summary["accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in results[0].per_seed]))


def test_cross_dataset_scores_each_target_on_its_own_classes(tiny, monkeypatch):
    from caspl.data import build_dataset

    seen = _spy_evaluations(monkeypatch)
    result = protocols.cross_dataset(_cfg(seeds=[1]), targets=[from_dict(protocols.DataConfig, TEXTURES)],
                                     student=tiny, log=lambda line: None)
    source = build_dataset("toy_sketch", None, **SKETCH["options"])
    target = build_dataset("toy_textures", None, **TEXTURES["options"])
    evaluated = {tuple(names): n for names, _, n in seen if n in (len(source.test), len(target.test))}
    assert evaluated[tuple(source.classnames)] == len(source.test)
    assert evaluated[tuple(target.classnames)] == len(target.test)
    row = result.per_seed[0]
    assert set(row) == {"seed", "toy_sketch", "toy_textures"}
    assert result.summary["targets_mean"] == pytest.approx(row["toy_textures"])


def test_base_to_novel_reports_every_seed_and_their_aggregate(tiny):
    result = protocols.base_to_novel(_cfg(), student=tiny, log=lambda line: None)
    assert [r["seed"] for r in result.per_seed] == [1, 2]
    expected = aggregate_seeds(result.per_seed)
    assert result.summary == pytest.approx(expected)
    assert all(math.isclose(r["hm"], harmonic_mean(r["base"], r["novel"])) for r in result.per_seed)
    with pytest.raises(ConfigError, match="subsample: base"):
        protocols.base_to_novel(_cfg(subsample="all"), student=tiny)


@pytest.mark.slow(seconds=60)
def test_toy_table_smoke_test_writes_a_row_for_every_method(tmp_path):
    """The CI-sized ToyWorld table (builds the ToyWorld models on first use, then boosts and adapts briefly)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "studies" / "toy_table.py"
    done = subprocess.run([sys.executable, str(script), "--smoke-test", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in (tmp_path / "table.md").read_text().splitlines() if line.startswith("| ")]
    labels = [row.split("|")[1].strip() for row in rows[1:]]
    methods = list_methods(BASE)
    expected = [label for m in methods for label in (m, f"{m}+caspl")]
    assert labels == ["zeroshot teacher", "zeroshot", "zeroshot+caspl", "linear probe"] + expected
    assert all(len(row.split("|")) == 2 + 1 + 6 for row in rows[1:])  # label + (base, novel, HM) x (dataset, average)
    probe = [cell.strip() for cell in rows[4].split("|")[2:-1]]
    assert probe[0] != "-" and probe[1:3] == ["-", "-"]  # the probe knows the base classes only
    assert (tmp_path / "hm.png").stat().st_size > 0 and (tmp_path / "results.json").exists()


def test_toy_table_judges_coops_fit_by_its_last_epoch_and_reports_the_selected_one_too():
    """The fit check asks whether the prompts can fit the K-shot images by the end of training (their leverage); the
    epoch that validation selects is reported beside it, not judged."""
    from studies.toy_table import acceptance, fit_summary

    fits = ((1, 80.0, 86.0), (2, 82.0, 88.0))  # seed, selected epoch's fit, last epoch's fit
    rows = [{"dataset": "toy_night", "label": "coop", "seed": s, "base": 70.0, "novel": 40.0, "train": selected,
             "train_last_epoch": last, "zeroshot_train": 65.0} for s, selected, last in fits]
    rows += [{"dataset": "toy_night", "label": label, "seed": s, "base": b, "novel": n}
             for label, b, n in (("coop+caspl", 72.0, 55.0),) for s in (1, 2)]
    fit = fit_summary(rows, ["toy_night"])["toy_night"]
    assert fit["train_last_epoch"] == 87.0 and fit["train"] == 81.0 and fit["zeroshot_train"] == 65.0
    assert fit["train_last_epoch_std"] == pytest.approx(2 ** 0.5)
    table = {"zeroshot": {"average": {"base": 58.0, "novel": 44.0}},
             "coop": {"average": {"base": 70.0, "novel": 40.0, "hm": 50.9}},
             "coop+caspl": {"average": {"base": 72.0, "novel": 55.0, "hm": 62.4}}}
    checks = acceptance(table, ["coop"], rows, ["toy_night"])
    assert checks["coop fits toy_night train by its last epoch (87.0) >= zeroshot (65.0) + 20"] is True
    rows[0]["train_last_epoch"] = rows[1]["train_last_epoch"] = 84.0
    assert acceptance(table, ["coop"], rows, ["toy_night"])[
        "coop fits toy_night train by its last epoch (84.0) >= zeroshot (65.0) + 20"] is False

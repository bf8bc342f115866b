"""The study's objective: a pseudo-novel task made of base classes only, Spearman's rank correlation, averages over
datasets, and the agreement of each objective with test HM."""

import math

import pytest

from caspl.artifacts import ArtifactStore
from caspl.config import from_dict
from caspl.data import build_dataset, pseudo_novel_split, subsample_classes
from caspl.study.report import objective_agreement
from caspl.study.trial import adapt_and_evaluate, average_scores
from caspl.train.adapt import AdaptRunConfig
from caspl.train.metrics import harmonic_mean, ranks, spearman
from conftest import METHOD_CASES

SHAPES = {"dataset": "toy_shapes", "options": {"n_train": 3, "n_val": 2, "n_test": 2}}


def test_pseudo_novel_task_holds_base_classes_only_in_a_seeded_order():
    dataset = build_dataset("toy_shapes", None, **SHAPES["options"])
    base, novel = subsample_classes(dataset, "base"), subsample_classes(dataset, "novel")
    pseudo = pseudo_novel_split(dataset, seed=0)
    assert sorted(pseudo.classnames) == sorted(base.classnames) and not set(pseudo.classnames) & set(novel.classnames)
    assert pseudo.test == [] and pseudo.name == "toy_shapes~pseudo0"
    assert all(pseudo.classnames[item.label] == item.classname for item in pseudo.train + pseudo.val)
    assert {i.path for i in pseudo.train + pseudo.val} == {i.path for i in base.train + base.val}
    again, other = pseudo_novel_split(dataset, seed=0), pseudo_novel_split(dataset, seed=1)
    assert again.classnames == pseudo.classnames and other.classnames != pseudo.classnames
    assert pseudo.classnames != base.classnames  # a seeded shuffle, not the base order again


def test_the_objective_run_reads_no_novel_image(tiny, tmp_path, monkeypatch):
    import caspl.data.base
    import caspl.train.adapt
    import caspl.train.evaluate

    dataset = build_dataset("toy_shapes", None, **SHAPES["options"])
    novel = {i.path for i in subsample_classes(dataset, "novel").train + subsample_classes(dataset, "novel").val
             + dataset.test}
    loaded = []
    original = caspl.data.base.load_image
    for module in (caspl.train.adapt, caspl.train.evaluate):
        monkeypatch.setattr(module, "load_image", lambda path: loaded.append(str(path)) or original(path))
    cfg = from_dict(AdaptRunConfig, {"student": {"name": "caspl-tiny"}, "data": SHAPES, "method": METHOD_CASES["coop"],
                                     "shots": 2, "seeds": [1], "optim": {"epochs": 2, "batch_size": 8,
                                                                         "warmup_epochs": 0}})
    result = adapt_and_evaluate(cfg, 1, ArtifactStore(tmp_path), pseudo_novel_split(dataset, 0), boost_prompts=None,
                                splits=("val",), on_epoch=lambda metrics, model: None)
    assert loaded and not novel & set(loaded)
    assert set(result["val"]) == {"base", "novel", "hm"}


def test_spearman_with_ties_matches_a_hand_computation():
    assert ranks([3, 1, 2, 2]) == [4.0, 1.0, 2.5, 2.5]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x = 1, 2.5, 2.5, 4; y = 1, 3, 2, 4: Pearson of the ranks by hand
    rx, ry = [1, 2.5, 2.5, 4], [1, 3, 2, 4]
    cov = sum((a - 2.5) * (b - 2.5) for a, b in zip(rx, ry))
    expected = cov / math.sqrt(sum((a - 2.5) ** 2 for a in rx) * sum((b - 2.5) ** 2 for b in ry))
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(expected)
    assert math.isnan(spearman([1, 2], [2, 1])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_scores_average_over_datasets_as_the_paper_does():
    per_dataset = {"a": {"test_base": 80.0, "test_novel": 60.0, "test_hm": harmonic_mean(80, 60)},
                   "b": {"test_base": 40.0, "test_novel": 20.0, "test_hm": harmonic_mean(40, 20)}}
    averaged = average_scores(per_dataset)
    assert averaged["test_base"] == 60.0 and averaged["test_novel"] == 40.0
    assert averaged["test_hm"] == pytest.approx(harmonic_mean(60, 40))  # HM of the means, not the mean of the HMs
    assert average_scores({"a": per_dataset["a"]}) == pytest.approx(per_dataset["a"])


def test_agreement_of_each_objective_with_test_hm_over_finished_trials():
    rows = [{"metrics": {"finished": True, "pseudo_hm": p, "val_hm": v, "test_hm": t}}
            for p, v, t in ((1, 3, 10), (2, 2, 20), (3, 1, 30))]
    rows.append({"metrics": {"phase": "adapt", "pseudo_hm": 99}})  # unfinished: ignored
    assert objective_agreement(rows) == {"pseudo_hm": pytest.approx(1.0), "val_hm": pytest.approx(-1.0)}

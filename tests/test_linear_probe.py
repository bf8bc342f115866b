"""The linear-probe reference: logistic regression on frozen image features, weight decay chosen on validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from caspl.data import build_dataset, subsample_classes
from caspl.errors import ConfigError
from caspl.train.linear_probe import base_linear_probe, fit_logistic_regression, linear_probe


def _clusters(n_per_class: int, num_classes: int = 4, dim: int = 16, spread: float = 0.1, seed: int = 0):
    """L2-normalised points around random class centres: [N, dim] features, [N] labels."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)), dim=-1)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    points = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return F.normalize(points, dim=-1), labels


def test_separable_features_are_fit_and_generalise():
    train, val, test = _clusters(16, seed=1), _clusters(4, seed=2), _clusters(30, seed=3)
    result = linear_probe(train, val, test, num_classes=4)
    assert result.train_accuracy == 100.0 and result.test_accuracy >= 99.0
    assert set(result.val_by_weight_decay) >= {1e-6, 1.0}


def test_unlearnable_labels_stay_near_chance_on_test():
    (x, _), (xv, _), (xt, _) = _clusters(16, seed=1), _clusters(4, seed=2), _clusters(30, seed=3)
    shuffled = [torch.randperm(len(v), generator=torch.Generator().manual_seed(s)) % 4 for s, v in
                ((4, x), (5, xv), (6, xt))]
    result = linear_probe((x, shuffled[0]), (xv, shuffled[1]), (xt, shuffled[2]), num_classes=4)
    assert result.test_accuracy < 45.0  # chance is 25 %: nothing learnable leaks from train to test


def test_weight_decay_is_chosen_on_validation_never_on_test():
    train, val, test = _clusters(8, spread=0.6, seed=1), _clusters(8, spread=0.6, seed=2), _clusters(30, seed=3)
    clean = linear_probe(train, val, test, num_classes=4)
    garbled = linear_probe(train, val, (test[0], (test[1] + 1) % 4), num_classes=4)  # test labels all wrong
    assert garbled.weight_decay == clean.weight_decay  # the choice cannot depend on test
    assert garbled.test_accuracy < clean.test_accuracy
    best = max(clean.val_by_weight_decay.values())
    assert clean.val_accuracy == best == clean.val_by_weight_decay[clean.weight_decay]


def test_fit_is_deterministic_and_regularised():
    x, y = _clusters(8, spread=0.5, seed=1)
    first = fit_logistic_regression(x, y, 4, 1e-3)
    again = fit_logistic_regression(x, y, 4, 1e-3)
    assert torch.equal(first.weight, again.weight) and torch.equal(first.bias, again.bias)
    strong = fit_logistic_regression(x, y, 4, 10.0)
    assert strong.weight.norm() < first.weight.norm() / 5


def test_bad_input_is_a_config_error():
    x, y = _clusters(4)
    with pytest.raises(ConfigError, match="validation"):
        linear_probe((x, y), (x[:0], y[:0]), (x, y), num_classes=4)
    with pytest.raises(ConfigError, match="weight_decay"):
        fit_logistic_regression(x, y, 4, -1.0)
    with pytest.raises(ConfigError, match=r"\[N, D\]"):
        fit_logistic_regression(x[0], y, 4, 0.1)


def test_probe_on_frozen_features_of_a_toyworld_dataset_beats_chance(tiny):
    """Random-weight tiny CLIP features still carry colour: a probe on toy_night's base classes (colour and texture)
    beats chance."""
    dataset = build_dataset("toy_night", None, n_train=16, n_val=4, n_test=8)
    result = base_linear_probe(tiny, dataset, shots=8, seed=1)
    chance = 100.0 / subsample_classes(dataset, "base").num_classes
    assert result.test_accuracy > 2.5 * chance
    assert result.train_accuracy >= result.test_accuracy
    again = base_linear_probe(tiny, dataset, shots=8, seed=1)
    assert again == result

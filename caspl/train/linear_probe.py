"""A linear-probe reference: multinomial logistic regression on frozen, L2-normalised image features.

The CoOp paper's reference point for few-shot prompt learning: the same K-shot training images, the same frozen
image encoder, a linear classifier instead of prompts. The weight decay is chosen on the validation split (never on
test), the classifier is then refit on the training images alone. The fit is full-batch L-BFGS in float64, so the
result is a deterministic function of the features.

    result = base_linear_probe(student, dataset, shots=16, seed=1)   # base classes, as base-to-novel trains
    result.test_accuracy, result.train_accuracy, result.weight_decay
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from caspl.artifacts import ArtifactStore
from caspl.data import Dataset, Item, few_shot_split, subsample_classes
from caspl.data.views import model_view_spec
from caspl.errors import ConfigError
from caspl.models import LoadedCLIP, encode_image
from caspl.train.evaluate import eval_batches

# L2 penalty on the weights (per training image, as in `fit_logistic_regression`); log-spaced like sklearn's C grid.
WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 1.0)


@dataclass(frozen=True)
class LinearClassifier:
    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """[N, D] features -> [N, C] logits."""
        return features.to(self.weight.dtype) @ self.weight.T + self.bias

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 accuracy (%) on [N, D] features with [N] labels."""
        if len(labels) == 0:
            return 0.0
        return 100.0 * float((self.logits(features).argmax(-1) == labels).double().mean())


@dataclass(frozen=True)
class ProbeResult:
    weight_decay: float  # the one chosen on validation
    train_accuracy: float
    val_accuracy: float
    test_accuracy: float
    val_by_weight_decay: dict[float, float]

    def to_dict(self) -> dict:
        return asdict(self)


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float,
                            max_iter: int = 500) -> LinearClassifier:
    """Multinomial logistic regression: mean cross-entropy + weight_decay/2 · ||W||² (bias unpenalised).

    features [N, D], labels [N] in [0, num_classes). Full-batch L-BFGS with a strong-Wolfe line search in float64
    from zero weights: a convex problem, so the solution does not depend on an initial seed.
    """
    if features.dim() != 2 or len(features) != len(labels) or len(labels) == 0:
        raise ConfigError(f"linear probe needs [N, D] features and N labels, got {tuple(features.shape)} and "
                          f"{tuple(labels.shape)}")
    if weight_decay < 0:
        raise ConfigError(f"linear probe weight_decay must be >= 0, got {weight_decay}")
    x = features.detach().to(torch.float64)
    y = labels.detach().long()
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return LinearClassifier(weight.detach(), bias.detach())


def linear_probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                 test: tuple[torch.Tensor, torch.Tensor], num_classes: int,
                 weight_decays: Sequence[float] = WEIGHT_DECAYS) -> ProbeResult:
    """Pick the weight decay with the best validation accuracy (ties: the larger decay), report train/val/test.

    Each split is ([N, D] features, [N] labels). Test is only scored with the chosen classifier.
    """
    if len(val[1]) == 0:
        raise ConfigError("linear probe needs validation images to choose its weight decay (never test)")
    if not weight_decays:
        raise ConfigError("linear probe needs at least one weight decay to try")
    fits = {wd: fit_logistic_regression(*train, num_classes, wd) for wd in sorted(weight_decays)}
    val_acc = {wd: clf.accuracy(*val) for wd, clf in fits.items()}
    chosen = max(sorted(val_acc), key=lambda wd: (val_acc[wd], wd))  # ties go to the stronger regularisation
    best = fits[chosen]
    return ProbeResult(chosen, best.accuracy(*train), val_acc[chosen], best.accuracy(*test), val_acc)


@torch.no_grad()
def image_features(student: LoadedCLIP, items: Sequence[Item],
                   batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image features [N, E] of the unprompted student (evaluation preprocessing) and labels [N]."""
    model = student.model
    was_training = model.training
    model.eval()
    spec = model_view_spec(model)
    features, labels = [], []
    device, dtype = model.logit_scale.device, model.logit_scale.dtype
    for images, batch_labels in eval_batches(items, spec, batch_size):
        features.append(encode_image(model, images.to(device, dtype=dtype), (), normalize=True).float().cpu())
        labels.append(batch_labels)
    model.train(was_training)
    if not features:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)


def base_linear_probe(student: LoadedCLIP, dataset: Dataset, shots: int = 16, seed: int = 1,
                      store: ArtifactStore | None = None, weight_decays: Sequence[float] = WEIGHT_DECAYS,
                      subsample: str = "base", val_shots: int | None = None) -> ProbeResult:
    """The probe on `subsample` classes with the adapting runs' K-shot train and validation images for `seed`.

    The same split as `caspl.train.adapt.training_split` (`few_shot_split` with the same shots and val_shots).
    """
    classes = subsample_classes(dataset, subsample)
    split = few_shot_split(classes, shots, seed, store, val_k=val_shots)
    train, val = image_features(student, split.train), image_features(student, split.val)
    test = image_features(student, classes.test)
    return linear_probe(train, val, test, classes.num_classes, weight_decays)

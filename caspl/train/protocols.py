"""Evaluation protocols (DESIGN §2.4), with seeds as a first-class axis.

- base-to-novel: train on K-shot base classes; test accuracy on base and on novel classes (each among its own
  classes) and their HM.
- few-shot: train on K-shot samples of all classes (K in 1, 2, 4, 8, 16; validation min(K, 4) shots); test accuracy
  over all classes.
- cross-dataset: train on one dataset (all classes); test accuracy on it and on each target dataset, each against
  the target's own classes. Domain generalisation is the same protocol with domain-shifted targets (e.g. ImageNet
  -> ImageNet-V2/-Sketch/-A/-R) wherever those datasets are registered.

Each protocol returns per-seed rows and `aggregate_seeds` summaries (mean, sample std, and HM of the mean base and
novel accuracies). Text features are computed once per class set (`caspl.train.evaluate.accuracy`), except for
CoCoOp whose text depends on the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from caspl.artifacts import ArtifactStore
from caspl.config import DataConfig
from caspl.data import Dataset
from caspl.data.views import model_view_spec
from caspl.errors import ConfigError
from caspl.models import LoadedCLIP, PromptedCLIP, load_clip
from caspl.train.adapt import AdaptRunConfig, load_dataset, resolve_boost_prompts, run_adapt
from caspl.train.evaluate import accuracy, base_novel_accuracy
from caspl.train.metrics import aggregate_seeds

PROTOCOLS = ("base2novel", "fewshot", "cross")
FEW_SHOTS = (1, 2, 4, 8, 16)

Log = Callable[[str], None]


@dataclass
class ProtocolResult:
    protocol: str
    label: str  # e.g. "coop+caspl"
    dataset: str
    per_seed: list[dict]  # {"seed": s, <metric>: value, ...}
    summary: dict  # aggregate_seeds over per_seed
    extra: dict = field(default_factory=dict)  # e.g. {"shots": K}

    def to_dict(self) -> dict:
        return {"protocol": self.protocol, "label": self.label, "dataset": self.dataset, **self.extra,
                "per_seed": self.per_seed, "summary": self.summary}


# --- evaluating one trained model --------------------------------------------------------------------------------


def evaluate_base_novel(model: PromptedCLIP, dataset: Dataset, batch_size: int = 256) -> dict[str, float]:
    """Test accuracy on base and novel classes and their HM."""
    return base_novel_accuracy(model, dataset, model_view_spec(model.clip), "test", batch_size)


def evaluate_all_classes(model: PromptedCLIP, dataset: Dataset, batch_size: int = 256) -> float:
    """Test accuracy over all classes of `dataset`."""
    model.set_classes(dataset.classnames, dataset.templates)
    return accuracy(model, dataset.test, model_view_spec(model.clip), batch_size)


def evaluate_targets(model: PromptedCLIP, datasets: dict[str, Dataset], batch_size: int = 256) -> dict[str, float]:
    """Test accuracy on each dataset against its own class list."""
    return {name: evaluate_all_classes(model, ds, batch_size) for name, ds in datasets.items()}


# --- protocols: train per seed, then evaluate ---------------------------------------------------------------------


class _Session:
    """What the seeds of one protocol share: the store, the student, the boosting prompts, the dataset."""

    def __init__(self, cfg: AdaptRunConfig, store: ArtifactStore | None, student: LoadedCLIP | None,
                 boost_prompts: Path | None, log: Log):
        self.cfg, self.log = cfg, log
        self.store = store or ArtifactStore(cfg.runtime.store)
        self.student = student or load_clip(cfg.student.spec(cfg.runtime))
        self.boost_prompts = boost_prompts or resolve_boost_prompts(cfg, self.store, log)
        self.dataset = load_dataset(cfg.data)

    def train(self, cfg: AdaptRunConfig, seed: int):
        return run_adapt(cfg, seed, self.store, student=self.student, boost_prompts=self.boost_prompts,
                         dataset=self.dataset, log=self.log)


def base_to_novel(cfg: AdaptRunConfig, store: ArtifactStore | None = None, *, student: LoadedCLIP | None = None,
                  boost_prompts: Path | None = None, log: Log = print) -> ProtocolResult:
    if cfg.subsample != "base":
        raise ConfigError("base-to-novel trains on the base classes: set subsample: base")
    session = _Session(cfg, store, student, boost_prompts, log)
    rows = []
    for seed in cfg.seeds:
        outcome = session.train(cfg, seed)
        metrics = evaluate_base_novel(outcome.model, session.dataset, cfg.optim.eval_batch_size)
        rows.append({"seed": seed, **metrics, "val": _finite(outcome.val_accuracy), "epoch": outcome.selected_epoch})
        log(f"[base2novel {cfg.label} seed {seed}] base {metrics['base']:.2f}  novel {metrics['novel']:.2f}  "
            f"HM {metrics['hm']:.2f}")
    return ProtocolResult("base2novel", cfg.label, cfg.data.dataset, rows, aggregate_seeds(rows))


def few_shot(cfg: AdaptRunConfig, shots: Sequence[int] = FEW_SHOTS, store: ArtifactStore | None = None, *,
             student: LoadedCLIP | None = None, boost_prompts: Path | None = None,
             log: Log = print) -> list[ProtocolResult]:
    """One result per K: training on K shots of all classes, test accuracy over all classes."""
    cfg = replace(cfg, subsample="all")
    session = _Session(cfg, store, student, boost_prompts, log)
    results = []
    for k in shots:
        run_cfg = replace(cfg, shots=k)
        rows = []
        for seed in cfg.seeds:
            outcome = session.train(run_cfg, seed)
            acc = evaluate_all_classes(outcome.model, session.dataset, cfg.optim.eval_batch_size)
            rows.append({"seed": seed, "accuracy": acc, "val": _finite(outcome.val_accuracy)})
            log(f"[fewshot {cfg.label} K={k} seed {seed}] accuracy {acc:.2f}")
        results.append(ProtocolResult("fewshot", cfg.label, cfg.data.dataset, rows,
                                      aggregate_seeds(rows, keys=("accuracy",)), {"shots": k}))
    return results


def cross_dataset(cfg: AdaptRunConfig, targets: Sequence[DataConfig] | None = None,
                  store: ArtifactStore | None = None, *, student: LoadedCLIP | None = None,
                  boost_prompts: Path | None = None, log: Log = print) -> ProtocolResult:
    """Train on `cfg.data` (all classes), test on it and on every target (default: `cfg.targets`)."""
    cfg = replace(cfg, subsample="all")
    targets = list(targets if targets is not None else cfg.targets)
    if not targets:
        raise ConfigError("cross-dataset evaluation needs targets: a list of data sections")
    session = _Session(cfg, store, student, boost_prompts, log)
    datasets = {cfg.data.dataset: session.dataset, **{t.dataset: load_dataset(t) for t in targets}}
    rows = []
    for seed in cfg.seeds:
        outcome = session.train(cfg, seed)
        scores = evaluate_targets(outcome.model, datasets, cfg.optim.eval_batch_size)
        rows.append({"seed": seed, **scores})
        log(f"[cross {cfg.label} seed {seed}] " + "  ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    summary = aggregate_seeds(rows, keys=list(datasets))
    summary["targets_mean"] = sum(summary[t.dataset] for t in targets) / len(targets)
    return ProtocolResult("cross", cfg.label, cfg.data.dataset, rows, summary)


def _finite(value: float) -> float | None:
    """None for "no validation" (zero-shot), so results stay valid JSON."""
    return None if math.isnan(value) else value


domain_generalisation = cross_dataset  # the same protocol with domain-shifted targets of the source's classes


def run_protocol(name: str, cfg: AdaptRunConfig, store: ArtifactStore | None = None, *,
                 log: Log = print) -> list[ProtocolResult]:
    """Dispatch by protocol name (the CLI's `--protocol`)."""
    if name == "base2novel":
        return [base_to_novel(cfg, store, log=log)]
    if name == "fewshot":
        return few_shot(cfg, store=store, log=log)
    if name == "cross":
        return [cross_dataset(cfg, store=store, log=log)]
    raise ConfigError(f"unknown protocol {name!r}; choose one of {list(PROTOCOLS)}")

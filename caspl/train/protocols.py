"""Evaluation protocols (DESIGN §2.4), with seeds as a first-class axis.

- base-to-novel: train on K-shot base classes; test accuracy on base and on novel classes (each among its own
  classes) and their HM.
- few-shot: train on K-shot samples of all classes (K in 1, 2, 4, 8, 16; validation min(K, 4) shots); test accuracy
  over all classes.
- cross-dataset: train on one dataset (all classes); test accuracy on it and on each target dataset, each against
  the target's own classes.
- domain generalisation (`dg`): train on the source (ImageNet, all classes, K shots); test accuracy on the source and
  on each domain-shifted target (ImageNet-V2/-Sketch/-A/-R), each against the target's own classes, plus the
  targets' mean. Every target's class names must be a subset of the source's (checked before any training).

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
from caspl.data import Dataset, check_trainable
from caspl.data.views import model_view_spec
from caspl.errors import ConfigError
from caspl.models import LoadedCLIP, PromptedCLIP, load_clip
from caspl.train.adapt import AdaptRunConfig, load_dataset, resolve_boost_prompts, run_adapt
from caspl.train.evaluate import accuracy, base_novel_accuracy
from caspl.train.metrics import aggregate_seeds

PROTOCOLS = ("base2novel", "fewshot", "cross", "dg")
FEW_SHOTS = (1, 2, 4, 8, 16)
TARGETS_MEAN = "targets_mean"

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


def evaluate_domain_generalisation(model: PromptedCLIP, source: Dataset, targets: dict[str, Dataset],
                                   batch_size: int = 256) -> dict[str, float]:
    """Test accuracy on the source and on each target (each against its own classes), and the targets' mean."""
    scores = evaluate_targets(model, {source.name: source, **targets}, batch_size)
    scores[TARGETS_MEAN] = sum(scores[name] for name in targets) / len(targets)
    return scores


def check_targets_within_source(source: Dataset, targets: dict[str, Dataset]) -> None:
    """ConfigError unless every target's class names are among the source's (domain shift, same label space)."""
    known = set(source.classnames)
    for name, target in targets.items():
        outside = [c for c in target.classnames if c not in known]
        if outside:
            raise ConfigError(
                f"domain-generalisation target {name}: class {outside[0]!r} (+{len(outside) - 1} more) is not a class "
                f"of the source {source.name}; a target must reuse the source's class names (copy the source's "
                f"classnames.txt into it) or be evaluated with --protocol cross")


def load_dg_datasets(source_cfg: DataConfig, target_cfgs: Sequence[DataConfig]) -> tuple[Dataset, dict[str, Dataset]]:
    """The source (trainable) and the targets keyed by dataset name, checked for the protocol before any training."""
    if not target_cfgs:
        raise ConfigError("domain generalisation needs targets: a list of data sections "
                          "(e.g. imagenet_v2, imagenet_sketch, imagenet_a, imagenet_r)")
    source = load_dataset(source_cfg)
    check_trainable(source)
    targets: dict[str, Dataset] = {}
    for target_cfg in target_cfgs:
        target = load_dataset(target_cfg)
        if target.name in targets or target.name in (source.name, TARGETS_MEAN):
            raise ConfigError(f"domain-generalisation target {target_cfg.dataset!r} is listed twice or is the source; "
                              "list each target once")
        targets[target.name] = target
    check_targets_within_source(source, targets)
    return source, targets


# --- protocols: train per seed, then evaluate ---------------------------------------------------------------------


class _Session:
    """What the seeds of one protocol share: the store, the student, the boosting prompts, the dataset."""

    def __init__(self, cfg: AdaptRunConfig, store: ArtifactStore | None, student: LoadedCLIP | None,
                 boost_prompts: Path | None, log: Log, dataset: Dataset | None = None):
        self.cfg, self.log = cfg, log
        self.store = store or ArtifactStore(cfg.runtime.store)
        self.student = student or load_clip(cfg.student.spec(cfg.runtime))
        self.boost_prompts = boost_prompts or resolve_boost_prompts(cfg, self.store, log)
        self.dataset = dataset or load_dataset(cfg.data)

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
    summary[TARGETS_MEAN] = sum(summary[t.dataset] for t in targets) / len(targets)
    return ProtocolResult("cross", cfg.label, cfg.data.dataset, rows, summary)


def domain_generalisation(cfg: AdaptRunConfig, targets: Sequence[DataConfig] | None = None,
                          store: ArtifactStore | None = None, *, student: LoadedCLIP | None = None,
                          boost_prompts: Path | None = None, log: Log = print) -> ProtocolResult:
    """Train on the source `cfg.data` (all classes, K shots), test on it and on every domain-shifted target.

    Targets default to `cfg.targets`; each is scored against its own class list (ImageNet-A/-R: their 200 classes),
    and their names must all be source classes. Rows: seed, source and target accuracies, `targets_mean`, the source's
    validation accuracy (`val`, what selected the epoch); the summary aggregates the accuracies over seeds. `extra`
    names the targets and the number of classes each was scored on.
    """
    cfg = replace(cfg, subsample="all")
    source, target_sets = load_dg_datasets(cfg.data, list(targets if targets is not None else cfg.targets))
    session = _Session(cfg, store, student, boost_prompts, log, dataset=source)
    rows = []
    for seed in cfg.seeds:
        outcome = session.train(cfg, seed)
        scores = evaluate_domain_generalisation(outcome.model, source, target_sets, cfg.optim.eval_batch_size)
        rows.append({"seed": seed, **scores, "val": _finite(outcome.val_accuracy)})
        log(f"[dg {cfg.label} seed {seed}] " + "  ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    summary = aggregate_seeds(rows, keys=[source.name, *target_sets, TARGETS_MEAN])
    classes = {name: ds.num_classes for name, ds in {source.name: source, **target_sets}.items()}
    return ProtocolResult("dg", cfg.label, source.name, rows, summary,
                          {"targets": list(target_sets), "classes": classes})


def _finite(value: float) -> float | None:
    """None for "no validation" (zero-shot), so results stay valid JSON."""
    return None if math.isnan(value) else value


def run_protocol(name: str, cfg: AdaptRunConfig, store: ArtifactStore | None = None, *,
                 log: Log = print) -> list[ProtocolResult]:
    """Dispatch by protocol name (the CLI's `--protocol`)."""
    if name == "base2novel":
        return [base_to_novel(cfg, store, log=log)]
    if name == "fewshot":
        return few_shot(cfg, store=store, log=log)
    if name == "cross":
        return [cross_dataset(cfg, store=store, log=log)]
    if name == "dg":
        return [domain_generalisation(cfg, store=store, log=log)]
    raise ConfigError(f"unknown protocol {name!r}; choose one of {list(PROTOCOLS)}")

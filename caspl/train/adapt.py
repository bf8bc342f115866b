"""CasPL phase 2: the adapting loop of any base method, alone or over frozen boosting prompts ("+CasPL").

One run = one seed: K-shot samples of the training classes (`subsample: base` for base-to-novel, `all` for the
few-shot and cross-dataset protocols), the base method's own loss and SGD schedule, model selection on the
(few-shot) validation split, never on test. Every random choice — prompt init, the epoch's shuffle, each image's
crop and flip — derives from (seed, epoch, image), so a run resumed from its checkpoint ends bit-exactly where an
uninterrupted one ends. The loop names no method: per-method behaviour goes through the hooks documented on
`caspl.methods.PromptMethod` (PromptSRC's Gaussian prompt aggregation state is its `training_state`).

A run lives in `<store>/runs/adapt/<key>/` (key = hash of everything that determines its result):

    train_state.pt   epoch, adapting prompts, optimizer, best-so-far, the method's training state, history
    prompts/         the final prompt-only checkpoint (adapt + boost), loadable by `caspl eval --prompts`
    result.json      history, selected epoch, validation accuracy
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch

from caspl.artifacts import ArtifactStore, atomic_write_text, content_key, sha256_file
from caspl.config import DataConfig, ModelConfig, OptimConfig, RuntimeConfig, to_dict
from caspl.data import Dataset, Item, build_dataset, few_shot_split, load_image, subsample_classes
from caspl.data.views import ViewSpec, eval_tensor, model_view_spec, stack_views
from caspl.errors import CheckpointError, ConfigError
from caspl.methods import MethodConfig, build_prompted_clip, config_from_dict
from caspl.methods.state import load_prompt_state, read_prompt_state, save_prompt_state
from caspl.models import ADAPT, LoadedCLIP, PromptedCLIP, load_clip
from caspl.train.boost import BoostRunConfig, BoostSection, run_boost
from caspl.train.checkpoint import load_training_state, save_training_state
from caspl.train.evaluate import accuracy
from caspl.train.schedule import build_optimizer, lr_at_epoch, set_lr

RUN_KIND = "adapt"
RESULT_FILE = "result.json"

Log = Callable[[str], None]


@dataclass(kw_only=True)
class AdaptSection:
    """How a base method adapts: the settings an adapting run and a study's `adapt:` section share."""

    shots: int = 16
    val_shots: int | None = None  # validation shots per class; None: the paper's min(shots, 4)
    subsample: Literal["base", "all"] = "base"  # training classes: base (base-to-novel) or all (few-shot, cross)
    augment: Literal["crop", "none"] = "crop"  # crop: random resized crop + flip per (seed, epoch); none: eval tensors
    crop_scale: tuple[float, float] = (0.08, 1.0)
    select: Literal["val", "last"] = "val"  # a method's `final_prompts` (PromptSRC's GPA) overrides selection
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        if self.shots < 1 or (self.val_shots is not None and self.val_shots < 0):
            raise ConfigError(f"adapting needs shots >= 1 and val_shots >= 0 (got {self.shots}, {self.val_shots})")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"crop_scale {self.crop_scale} must satisfy 0 < low <= high <= 1")


@dataclass(kw_only=True)
class AdaptRunConfig(AdaptSection):
    """Adapting runs of one base method on one dataset, one per seed; alone, or +CasPL with a `boost` section."""

    student: ModelConfig
    data: DataConfig
    method: MethodConfig  # `{method: coop, n_ctx: 8, ...}` in YAML, parsed by the method registry
    boost: BoostSection | str | None = None  # a boosting section, a saved boosting prompt folder, or none
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    targets: list[DataConfig] = field(default_factory=list)  # cross-dataset / domain-generalisation evaluation
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self):
        super().__post_init__()
        self.method = config_from_dict(self.method)
        if not self.seeds:
            raise ConfigError("adapting needs at least one seed in seeds")
        if isinstance(self.boost, BoostSection) and self.boost.teacher is None:
            raise ConfigError("missing required config key boost.teacher (the teacher CLIP of the boosting phase)")

    @property
    def method_name(self) -> str:
        return self.method.name

    @property
    def label(self) -> str:
        """e.g. "coop" or "coop+caspl"."""
        return self.method_name + ("+caspl" if self.boost is not None else "")

    @property
    def val_k(self) -> int:
        return min(self.shots, 4) if self.val_shots is None else self.val_shots


# --- boosting prompts -------------------------------------------------------------------------------------------


def boost_run_config(cfg: AdaptRunConfig) -> BoostRunConfig:
    """The BoostRunConfig of `cfg.boost` (a section), sharing the adapting run's student, data and runtime."""
    if not isinstance(cfg.boost, BoostSection):
        raise ConfigError("boost is not a boosting section")
    return BoostRunConfig.of(cfg.boost, student=cfg.student, data=cfg.data, runtime=cfg.runtime)


def resolve_boost_prompts(cfg: AdaptRunConfig, store: ArtifactStore, log: Log = print) -> Path | None:
    """The boosting prompt folder for `cfg` (running or reusing the boosting run), or None without CasPL."""
    if cfg.boost is None:
        return None
    if isinstance(cfg.boost, str):
        folder = Path(cfg.boost).expanduser()
        read_prompt_state(folder)  # verifies it is an intact prompt checkpoint
        return folder
    result = run_boost(boost_run_config(cfg), store, progress=False, log=log)
    log(f"[adapt] boosting prompts {result.key} ({'reused' if result.reused else 'trained'}): {result.prompts}")
    return result.prompts


def boost_method_of(folder: Path) -> dict:
    """The boosting method config saved with a prompt folder."""
    _, meta = read_prompt_state(folder)
    if not meta.get("boost"):
        raise CheckpointError(f"{folder} holds no boosting prompts")
    return meta["boost"]


# --- the model ----------------------------------------------------------------------------------------------------


def build_adapt_model(student: LoadedCLIP, method: MethodConfig | dict, boost_prompts: Path | None,
                      seed: int) -> PromptedCLIP:
    """Student + adapting method (initialised from `seed`) + frozen boosting prompts loaded from their folder."""
    torch.manual_seed(seed)
    boost = boost_method_of(boost_prompts) if boost_prompts is not None else None
    model = build_prompted_clip(student.model, student.tokenizer, method, boost)
    if boost_prompts is not None:
        load_prompt_state(model, boost_prompts, roles=("boost",))
    return model


def adapt_state(model: PromptedCLIP) -> dict[str, torch.Tensor]:
    """The adapting method's tensors (`adapt.*`): what training changes."""
    return {k: v for k, v in model.prompt_state_dict().items() if k.startswith(ADAPT + ".")}


def load_adapt_state(model: PromptedCLIP, state: dict[str, torch.Tensor]) -> None:
    model.adapt.load_state_dict({k[len(ADAPT) + 1:]: v for k, v in state.items()}, strict=True)


# --- data ---------------------------------------------------------------------------------------------------------


def load_dataset(data: DataConfig) -> Dataset:
    return build_dataset(data.dataset, data.root, **data.options)


def training_split(dataset: Dataset, cfg: AdaptRunConfig, seed: int, store: ArtifactStore | None) -> Dataset:
    """K-shot train and `val_k`-shot val of the training classes (relabelled from 0); test untouched."""
    return few_shot_split(subsample_classes(dataset, cfg.subsample), cfg.shots, seed, store, val_k=cfg.val_k)


class TrainingImages:
    """The K-shot images; batches are views chosen by (seed, epoch) or plain evaluation tensors.

    Sets up to KEEP_DECODED images stay decoded in memory; larger ones (e.g. 16-shot ImageNet) are read per batch.
    """

    KEEP_DECODED = 4096

    def __init__(self, items: Sequence[Item], augment: str, train_spec: ViewSpec, eval_spec: ViewSpec, seed: int):
        self.items = list(items)
        self.labels = torch.tensor([i.label for i in self.items])
        self.ids = [sha256_file(Path(i.path))[:24] for i in self.items]  # content ids: crops survive a moved store
        self.augment, self.train_spec, self.eval_spec, self.seed = augment, train_spec, eval_spec, seed
        self._kept: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.items)

    def order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def batch(self, indices: list[int], epoch: int) -> dict[str, torch.Tensor]:
        if self.augment == "none":
            images = torch.stack([self._decoded(i) for i in indices])
        else:
            images = stack_views([self._decoded(i) for i in indices], [self.ids[i] for i in indices],
                                 [epoch] * len(indices), self.seed, self.train_spec)
        return {"images": images, "labels": self.labels[indices]}

    def _decoded(self, index: int):
        """The PIL image (augment: crop) or its evaluation tensor (augment: none)."""
        if index in self._kept:
            return self._kept[index]
        image = load_image(self.items[index].path)
        value = eval_tensor(image, self.eval_spec) if self.augment == "none" else image
        if len(self) <= self.KEEP_DECODED:
            self._kept[index] = value
        return value


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Full batches only (as Dassl's drop_last), but at least one batch when the set is smaller than a batch."""
    return max(1, n_images // batch_size)


# --- the loop -----------------------------------------------------------------------------------------------------


@dataclass
class AdaptOutcome:
    """One finished adapting run: its model holds the final prompts (selected or GPA-aggregated)."""

    model: PromptedCLIP
    folder: Path | None
    history: list[dict]
    selected_epoch: int
    val_accuracy: float
    train: Dataset  # the few-shot training split (its classes are the training classes)

    @property
    def prompts(self) -> Path | None:
        return self.folder / "prompts" if self.folder is not None else None


def run_key(cfg: AdaptRunConfig, seed: int, student: LoadedCLIP, boost_prompts: Path | None,
            dataset: Dataset) -> str:
    """What determines an adapting run's result (not threads, not the store location). The dataset's name and
    classes count too: a study's pseudo-novel task is a different dataset with the same data config."""
    boost_id = json.loads((boost_prompts / "MANIFEST.json").read_text())["files"] if boost_prompts else None
    return content_key(RUN_KIND, student.identity, to_dict(cfg.data), dataset.name, dataset.classnames,
                       cfg.method.to_config(), cfg.method.revision, boost_id, cfg.shots,
                       cfg.val_k, seed, cfg.subsample, cfg.augment, list(cfg.crop_scale), cfg.select,
                       to_dict(cfg.optim), cfg.runtime.precision)


def run_adapt(cfg: AdaptRunConfig, seed: int, store: ArtifactStore | None = None, *,
              student: LoadedCLIP | None = None, boost_prompts: Path | None = None, folder: Path | None = None,
              dataset: Dataset | None = None, log: Log = print,
              on_epoch: Callable[[dict, PromptedCLIP], None] | None = None) -> AdaptOutcome:
    """Train (or resume, or just reload) one adapting run for `seed`.

    `boost_prompts`: the boosting prompt folder (default: resolved from `cfg.boost`). `folder`: where the run keeps
    its checkpoint and result (default: `<store>/runs/adapt/<key>`). `on_epoch(metrics, model)` sees each epoch
    after the checkpoint is written (raising there interrupts the run resumably).
    """
    store = store or ArtifactStore(cfg.runtime.store)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    student = student or load_clip(cfg.student.spec(cfg.runtime))
    if boost_prompts is None and cfg.boost is not None:
        boost_prompts = resolve_boost_prompts(cfg, store, log)
    dataset = dataset or load_dataset(cfg.data)
    split = training_split(dataset, cfg, seed, store)
    model = build_adapt_model(student, cfg.method, boost_prompts, seed).set_classes(split.classnames, split.templates)
    if not model.prompt_parameters():  # zero-shot (optionally over boosting prompts): nothing to train
        return AdaptOutcome(model, None, [], 0, float("nan"), split)
    folder = folder or store.root / "runs" / RUN_KIND / run_key(cfg, seed, student, boost_prompts, dataset)
    loop = _AdaptLoop(cfg, model, split, seed, folder, f"{cfg.label} seed {seed}", log)
    outcome = loop.run(on_epoch)
    save_prompt_state(model, folder / "prompts", extra={"seed": seed, "selected_epoch": outcome.selected_epoch,
                                                         "classnames": split.classnames})
    atomic_write_text(folder / RESULT_FILE, json.dumps({
        "label": cfg.label, "seed": seed, "selected_epoch": outcome.selected_epoch,
        "val_accuracy": outcome.val_accuracy, "history": outcome.history}, indent=1))
    return outcome


class _AdaptLoop:
    def __init__(self, cfg: AdaptRunConfig, model: PromptedCLIP, split: Dataset, seed: int, folder: Path,
                 name: str, log: Log):
        self.cfg, self.model, self.split, self.seed, self.folder, self.name, self.log = (
            cfg, model, split, seed, folder, name, log)
        clip = model.clip
        self.eval_spec = model_view_spec(clip)
        if cfg.select == "val" and not split.val:
            raise ConfigError(f"{cfg.data.dataset} has no validation images; use select: last")
        self.images = TrainingImages(split.train, cfg.augment, model_view_spec(clip, cfg.crop_scale), self.eval_spec,
                                     seed)
        self.optimizer = build_optimizer(model.prompt_parameters(), cfg.optim)
        model.adapt.on_train_begin(cfg.optim.epochs)
        self.history: list[dict] = []
        self.best = {"epoch": 0, "val": -1.0, "prompts": adapt_state(model)}
        self.start = 0

    def run(self, on_epoch: Callable[[dict, PromptedCLIP], None] | None) -> AdaptOutcome:
        self._resume()
        for epoch in range(self.start, self.cfg.optim.epochs):
            metrics = self._train_epoch(epoch)
            self.history.append(metrics)
            save_training_state(self.folder, self._state(epoch + 1))
            self.log(_epoch_line(self.name, metrics, self.cfg.optim.epochs))
            if on_epoch is not None:
                on_epoch(metrics, self.model)
        return self._finish()

    def _resume(self) -> None:
        state = load_training_state(self.folder)
        if state is None:
            return
        if state.get("seed") != self.seed or state.get("epochs") != self.cfg.optim.epochs:
            raise CheckpointError(f"{self.folder}: checkpoint of another run (seed/epochs differ); delete it")
        load_adapt_state(self.model, state["prompts"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start, self.history, self.best = int(state["epoch"]), list(state["history"]), dict(state["best"])
        self.model.adapt.load_training_state(state.get("method_state"))
        if self.start < self.cfg.optim.epochs:
            self.log(f"[adapt {self.name}] resuming after epoch {self.start}")

    def _state(self, epochs_done: int) -> dict:
        return {"epoch": epochs_done, "seed": self.seed, "epochs": self.cfg.optim.epochs,
                "prompts": adapt_state(self.model), "optimizer": self.optimizer.state_dict(),
                "history": self.history, "best": self.best,
                "method_state": self.model.adapt.training_state()}

    def _train_epoch(self, epoch: int) -> dict:
        cfg, model = self.cfg, self.model
        set_lr(self.optimizer, lr_at_epoch(cfg.optim, epoch))
        began = time.perf_counter()
        order, batch_size = self.images.order(epoch), cfg.optim.batch_size
        steps = steps_per_epoch(len(self.images), batch_size)
        sums: dict[str, float] = {}
        model.train()
        for step in range(steps):
            batch = self.images.batch(order[step * batch_size:(step + 1) * batch_size].tolist(), epoch)
            batch = {"images": batch["images"].to(model.device, dtype=model.clip.logit_scale.dtype),
                     "labels": batch["labels"].to(model.device)}
            loss, parts = model.adapt.loss(model(batch["images"]), batch, model)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            for key, value in {"loss": float(loss.detach()), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value
        model.adapt.on_epoch_end(epoch + 1)
        val = self._validate()
        if val > self.best["val"]:
            self.best = {"epoch": epoch + 1, "val": val, "prompts": adapt_state(model)}
        return {"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()}, "val_acc": val,
                "lr": self.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - began}

    def _validate(self) -> float:
        if not self.split.val:
            return float("nan")
        return accuracy(self.model, self.split.val, self.eval_spec, self.cfg.optim.eval_batch_size)

    def _finish(self) -> AdaptOutcome:
        final = self.model.adapt.final_prompts()
        if final is not None:  # the method's own choice (PromptSRC: its Gaussian-weighted prompt aggregate)
            self.model.adapt.load_state_dict(final, strict=True)
            selected, val, how = self.cfg.optim.epochs, self._validate(), f"{self.model.adapt.name}'s final prompts"
        elif self.cfg.select == "val":
            load_adapt_state(self.model, self.best["prompts"])
            selected, val = int(self.best["epoch"]), float(self.best["val"])
            how = f"epoch {selected} (best validation)"
        else:
            selected, val = self.cfg.optim.epochs, float(self.history[-1]["val_acc"])
            how = f"epoch {selected} (last)"
        self.log(f"[adapt {self.name}] final prompts: {how}, val {val:.2f}")
        return AdaptOutcome(self.model, self.folder, self.history, selected, val, self.split)


def _epoch_line(name: str, metrics: dict, epochs: int) -> str:
    parts = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("epoch", "val_acc", "lr", "seconds"))
    return (f"[adapt {name}] epoch {metrics['epoch']}/{epochs}  {parts}  val {metrics['val_acc']:.2f}  "
            f"lr {metrics['lr']:.2e}  {metrics['seconds']:.1f}s")

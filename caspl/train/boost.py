"""CasPL phase 1: boosting prompts on the student, distilled from cached (or online) teacher logits.

`BoostRunConfig` describes one run. `prepare_boost` resolves the unlabeled images and builds the teacher cache
(Ray Data actors); `run_boost` trains (in-process, or with DDP on Ray Train) and stores the prompt-only result
content-addressed, so runs that share a config and teacher cache share the result.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

from caspl.artifacts import ArtifactStore, content_key
from caspl.config import DataConfig, ModelConfig, OptimConfig, RuntimeConfig, to_dict
from caspl.data import build_dataset, check_trainable, subsample_classes
from caspl.data.base import load_image
from caspl.data.views import model_view_spec, stack_views
from caspl.distill.cache import (KIND, BuildReport, CacheConfig, CacheStatus, LogitsCache, UnlabeledImages,
                                 build_logits_cache, cache_key, inspect_cache)
from caspl.distill.loss import kd_loss
from caspl.errors import ConfigError
from caspl.methods import build_prompted_clip
from caspl.methods.boost import BoostConfig
from caspl.models import load_clip, model_identity
from caspl.train.checkpoint import load_training_state, save_training_state
from caspl.train.schedule import build_optimizer, lr_at_epoch, set_lr

RESULT_KIND = "boost_prompts"


@dataclass(kw_only=True)
class BoostSection:
    """The boosting phase as configured: a boosting run's fields, an adapting run's `boost:` and a study's `boost:`.

    `teacher` is required for a run (a study names it once at its top level); `data` defaults to the run's data.
    """

    teacher: ModelConfig | None = None
    data: DataConfig | None = None
    method: BoostConfig = field(default_factory=BoostConfig)  # lengths, depths, temperature, ctx_init
    classes: Literal["all", "base"] = "all"  # class names scored by teacher and student (all = transductive, paper)
    images: Literal["train", "train+val", "test"] = "train"  # the unlabeled images
    teacher_mode: Literal["cached", "online"] = "cached"
    seed: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    workers: int = 0  # Ray Train DDP workers; 0 = train in this process
    cpus_per_worker: float = 1.0
    use_gpu: bool = False

    def __post_init__(self):
        if self.workers < 0 or self.cpus_per_worker <= 0:
            raise ConfigError(f"boost.workers must be >= 0 and boost.cpus_per_worker > 0 (got {self.workers}, "
                              f"{self.cpus_per_worker})")
        if self.workers and self.optim.batch_size % self.workers:
            raise ConfigError(f"boost.optim.batch_size {self.optim.batch_size} must divide by workers {self.workers}")


@dataclass(kw_only=True)
class BoostRunConfig(BoostSection):
    """One boosting run: a boosting section plus the student, the data and the runtime."""

    student: ModelConfig
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self):
        super().__post_init__()
        for name in ("teacher", "data"):
            if getattr(self, name) is None:
                raise ConfigError(f"missing required config key {name} (the boosting run's {name})")

    @classmethod
    def of(cls, section: BoostSection, *, student: ModelConfig, data: DataConfig, runtime: RuntimeConfig,
           teacher: ModelConfig | None = None) -> "BoostRunConfig":
        """The run of `section` for this student, data and runtime (the section's own teacher and data first)."""
        values = {f.name: getattr(section, f.name) for f in dataclasses.fields(BoostSection)}
        values.update(teacher=section.teacher or teacher, data=section.data or data)
        return cls(**values, student=student, runtime=runtime)

    @property
    def temperature(self) -> float:
        return self.method.temperature


@dataclass
class BoostInputs:
    """Everything a boosting worker needs besides the config (picklable)."""

    classnames: list[str]
    template: str
    images: UnlabeledImages
    cache_key: str
    store_root: str


def unlabeled_inputs(cfg: BoostRunConfig) -> tuple[list[str], str, UnlabeledImages]:
    """(class names scored, the dataset's template, the unlabeled images) of a boosting run; no teacher work."""
    dataset = build_dataset(cfg.data.dataset, cfg.data.root, **cfg.data.options)
    if cfg.images != "test":
        check_trainable(dataset)  # a test-only set (ImageNet-A, ...) has no train images to boost on
    scored = subsample_classes(dataset, cfg.classes)
    items = {"train": scored.train, "train+val": scored.train + scored.val, "test": scored.test}[cfg.images]
    return scored.classnames, dataset.template, UnlabeledImages.from_paths([i.path for i in items])


def prepare_boost(cfg: BoostRunConfig, store: ArtifactStore, *,
                  progress: bool = True) -> tuple[BoostInputs, BuildReport]:
    """Resolve classes and images; with a cached teacher, make sure its cache exists (computing only what is missing).

    An online teacher builds no cache: its run is keyed by the key the cache would have.
    """
    classnames, template, images = unlabeled_inputs(cfg)
    teacher = cfg.teacher.spec(cfg.runtime)
    if cfg.teacher_mode == "online":
        key = cache_key(model_identity(teacher), classnames, template, cfg.cache, images.ids)
        report = BuildReport(store.folder(KIND, key), key)
    else:
        report = build_logits_cache(teacher, classnames, template, images, cfg.cache, store, progress=progress)
    return BoostInputs(classnames, template, images, report.key, str(store.root)), report


def inspect_teacher_cache(cfg: BoostRunConfig, store: ArtifactStore) -> CacheStatus:
    """The state of a boosting run's teacher cache, read-only (nothing is computed, moved or deleted)."""
    classnames, template, images = unlabeled_inputs(cfg)
    return inspect_cache(cfg.teacher.spec(cfg.runtime), classnames, template, images, cfg.cache, store)


def boost_key(cfg: BoostRunConfig, inputs: BoostInputs) -> str:
    """What determines the boosting result; worker count and resources do not (DDP is equivalent)."""
    return content_key("boost", model_identity(cfg.student.spec(cfg.runtime)), cfg.method,
                       to_dict(cfg.optim), cfg.seed, cfg.teacher_mode, inputs.cache_key, cfg.runtime.precision)


# --- the training loop (one process, or one DDP rank) ------------------------------------------------------------


def view_of(image_id: str, epoch: int, views: int) -> int:
    """Which cached view image `image_id` uses in `epoch`: cycles through all views, starting at an id offset."""
    return (epoch + int(image_id[:8], 16)) % views


def train_boost(cfg: BoostRunConfig, inputs: BoostInputs, checkpoint_dir: Path | None, *, rank: int = 0,
                world: int = 1, report: Callable[[dict, bool], None] | None = None,
                load_state: dict | None = None) -> dict:
    """Run (or resume) the boosting epochs; returns the final metrics. Rank 0 writes checkpoints."""
    torch.manual_seed(cfg.seed)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    student = load_clip(cfg.student.spec(cfg.runtime))
    model = build_prompted_clip(student.model, student.tokenizer, None, cfg.method)
    model.set_classes(inputs.classnames)
    net = _maybe_ddp(model, world)
    optimizer = build_optimizer(model.prompt_parameters(), cfg.optim)
    view_spec = model_view_spec(student.model, cfg.cache.crop_scale)
    teacher = teacher_source(cfg, inputs)
    teacher_spec = getattr(teacher, "view_spec", None)  # online mode only
    ids = teacher.usable_ids if isinstance(teacher, LogitsCache) else list(inputs.images.ids)
    paths = dict(zip(inputs.images.ids, inputs.images.paths))
    state = load_state if load_state is not None else (load_training_state(checkpoint_dir) if checkpoint_dir else None)
    start, history = 0, []
    if state is not None:
        model.load_state_dict(state["prompts"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        start, history = int(state["epoch"]), list(state["history"])
    batch, local = cfg.optim.batch_size, cfg.optim.batch_size // world
    steps = len(ids) // batch
    if steps == 0:
        raise ConfigError(f"boosting has {len(ids)} usable images, fewer than one batch of {batch}")
    scale = model.logit_scale().detach()
    for epoch in range(start, cfg.optim.epochs):
        set_lr(optimizer, lr_at_epoch(cfg.optim, epoch))
        began = time.perf_counter()
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        loss_sum, agree = torch.zeros(()), torch.zeros(())
        for step in range(steps):
            chosen = order[step * batch:(step + 1) * batch][rank * local:(rank + 1) * local].tolist()
            batch_ids = [ids[i] for i in chosen]
            views = [view_of(i, epoch, cfg.cache.views) for i in batch_ids]
            pil = [load_image(paths[i]) for i in batch_ids]
            images = stack_views(pil, batch_ids, views, cfg.cache.seed, view_spec).to(model.device)
            if isinstance(teacher, LogitsCache):
                sims = teacher.lookup(batch_ids, views)
            else:  # online: the same crops, at the teacher's own size and normalisation
                sims = teacher(stack_views(pil, batch_ids, views, cfg.cache.seed, teacher_spec))
            out = net(images)
            loss = kd_loss(out.logits, scale * sims.to(out.logits.device), cfg.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().cpu()
            agree += (out.logits.argmax(-1).cpu() == sims.argmax(-1).cpu()).float().mean()
        metrics = _epoch_metrics(epoch, loss_sum / steps, agree / steps, optimizer, world, began)
        history.append(metrics)
        state = {"epoch": epoch + 1, "prompts": model.prompt_state_dict(), "optimizer": optimizer.state_dict(),
                 "history": history}
        if rank == 0 and checkpoint_dir is not None:
            save_training_state(checkpoint_dir, state)
        if report is not None:
            report({**metrics, "state": state}, epoch + 1 == cfg.optim.epochs)
    return {"history": history, "prompts": model.prompt_state_dict(), "model": model}


def _maybe_ddp(model, world: int):
    if world <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, broadcast_buffers=False)


def teacher_source(cfg: BoostRunConfig, inputs: BoostInputs):
    store = ArtifactStore(inputs.store_root)
    if cfg.teacher_mode == "cached":
        return LogitsCache.open(store, inputs.cache_key)
    from caspl.distill.teacher import TeacherScorer, load_teacher, teacher_text_features

    teacher = load_teacher(cfg.teacher.spec(cfg.runtime))
    text = teacher_text_features(teacher, inputs.classnames, inputs.template, store)
    return TeacherScorer(teacher, text, cfg.cache.crop_scale)


def _epoch_metrics(epoch, loss_mean, agree_mean, optimizer, world, began) -> dict:
    values = torch.stack([loss_mean, agree_mean])
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(values)
        values /= world
    return {"epoch": epoch + 1, "boost/kd_loss": float(values[0]), "boost/teacher_agreement": float(values[1]),
            "boost/lr": optimizer.param_groups[0]["lr"], "boost/epoch_seconds": time.perf_counter() - began}


# --- orchestration: cached result, in-process or DDP on Ray Train ------------------------------------------------


@dataclass
class BoostResult:
    folder: Path  # <store>/boost_prompts/<key>; prompts in folder / "prompts"
    key: str
    history: list[dict]
    reused: bool
    cache_key: str

    @property
    def prompts(self) -> Path:
        return self.folder / "prompts"


def run_boost(cfg: BoostRunConfig, store: ArtifactStore, *, storage_path: str | None = None,
              progress: bool = True, log: Callable[[str], None] = print) -> BoostResult:
    """Boosting prompts for `cfg`: reused when a run with the same key finished before, else trained and stored."""
    import json

    inputs, cache_report = prepare_boost(cfg, store, progress=progress)
    key = boost_key(cfg, inputs)
    if (found := store.get(RESULT_KIND, key)) is not None:
        history = json.loads((found / "history.json").read_text())
        return BoostResult(found, key, history, True, inputs.cache_key)
    if cfg.workers == 0:
        out = train_boost(cfg, inputs, store.root / "runs" / "boost" / key,
                          report=lambda m, last: log(_epoch_line(m, cfg.optim.epochs)))
        history, model = out["history"], out["model"]
    else:
        history, prompts = _fit_on_ray_train(cfg, inputs, key, storage_path or str(store.root / "ray_train"), log)
        model = _boost_model(cfg, inputs)
        model.load_state_dict(prompts, strict=False)

    def build(tmp: Path) -> dict:
        from caspl.methods.state import save_prompt_state

        save_prompt_state(model, tmp / "prompts", extra={"boost_key": key, "teacher_cache": inputs.cache_key,
                                                          "classnames": inputs.classnames})
        (tmp / "history.json").write_text(json.dumps(history, indent=1))
        return {"kind": RESULT_KIND, "cache_key": inputs.cache_key}

    folder = store.get_or_build(RESULT_KIND, key, build, log=None)
    return BoostResult(folder, key, history, False, inputs.cache_key)


def _boost_model(cfg: BoostRunConfig, inputs: BoostInputs):
    student = load_clip(cfg.student.spec(cfg.runtime))
    model = build_prompted_clip(student.model, student.tokenizer, None, cfg.method)
    return model.set_classes(inputs.classnames)


def _epoch_line(metrics: dict, epochs: int) -> str:
    return (f"[boost] epoch {metrics['epoch']}/{epochs}  kd {metrics['boost/kd_loss']:.4f}  "
            f"agree {metrics['boost/teacher_agreement']:.3f}  lr {metrics['boost/lr']:.2e}  "
            f"{metrics['boost/epoch_seconds']:.1f}s")


def _fit_on_ray_train(cfg: BoostRunConfig, inputs: BoostInputs, key: str, storage_path: str, log):
    """DDP over `cfg.workers` Ray Train workers (gloo on CPU, NCCL on GPU); resumes from the run's last checkpoint."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from caspl.ray_env import ensure_ray

    ensure_ray()
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"cfg": cfg, "inputs": inputs},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=f"boost-{key}", storage_path=storage_path),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"boosting run boost-{key} produced no checkpoint; see the Ray Train logs above")
    with result.checkpoint.as_directory() as folder:
        state = load_training_state(folder)
    for metrics in state["history"]:
        log(_epoch_line(metrics, cfg.optim.epochs))
    return state["history"], state["prompts"]


def _ray_worker(config: dict) -> None:
    import tempfile

    import ray.train

    cfg, inputs = config["cfg"], config["inputs"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    state = None
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder:
            state = load_training_state(folder)

    def report(metrics: dict, last: bool) -> None:
        state = metrics.pop("state")
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                save_training_state(folder, state)
            checkpoint = ray.train.Checkpoint.from_directory(folder) if rank == 0 else None
            ray.train.report(metrics, checkpoint=checkpoint)

    if cfg.use_gpu:
        device = str(ray.train.torch.get_device())
        cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, device=device))
    train_boost(cfg, inputs, None, rank=rank, world=world, report=report, load_state=state)

"""Contrastive pretraining of the tiny ToyWorld teacher and student CLIPs (DESIGN §5), cached by content.

Both are open_clip ViT CLIPs from our JSON configs (`caspl-toy-teacher`, `caspl-toy-student`), trained from scratch
by CLIP's symmetric InfoNCE (learnable logit scale; identical captions in a batch count as positives of each other)
on `pretraining_stream` image-caption batches (varied captions whose words before the noun carry the domain and
the attributes, so the text tower learns to let them steer the features: what gives prompts their leverage).

The two differ the way web-scale CLIPs do: by capacity and by what their data covered. The teacher looks at
4-pixel patches (64 tokens) and sees every domain, the shifted ones (dark, faded, underwater) more often than the
rest. The student looks at 8-pixel patches (16 tokens), has a 4-head text tower, trains longer on clean, noisy and
(rarely) sketch images, and sees a dark, faded or underwater image about once in 180: like CLIP meeting EuroSAT
or DTD, it knows the words but has barely seen the pictures. The ToyWorld table's datasets live in those domains,
so there the student's zero-shot accuracy is far below what its image features allow (a linear probe), prompts
can close part of that gap, and the teacher is far better: the gap CasPL's boosting prompts distil. Both towers
of both models have 4 layers (the range a prompt-depth search needs); the 49408-token embedding dominates the
parameter count. `build_toyworld_models` trains the two in parallel, one process and one thread each.

A model lives in the ArtifactStore under kind "toyworld_models", keyed by the hash of its architecture config,
its recipe, the ToyWorld generator version and this module's PRETRAIN_VERSION:

    <store>/toyworld_models/<key>/model.safetensors   the state dict, loaded strictly by `load_clip`
    <store>/toyworld_models/<key>/info.json           recipe, training stats, zero-shot base/novel/HM at build time

`load_clip(ModelSpec("caspl-toy-student", pretrained="toyworld"))` reaches `resolve_weights`, which builds on
first use and afterwards only verifies the checksums. Training and evaluation are deterministic: fixed seeds,
deterministic algorithms and a single torch thread (CPU matmuls round differently with another thread count).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from caspl.artifacts import ArtifactStore, atomic_write_text, content_key
from caspl.data.toyworld.datasets import TOY_DATASETS
from caspl.data.toyworld.render import DOMAINS, GENERATOR_VERSION
from caspl.data.toyworld.stream import pretraining_stream
from caspl.errors import ConfigError
from caspl.models import LoadedCLIP, ModelSpec, architecture_config, load_clip, register_weight_source
from caspl.models.loading import quiet_open_clip
from caspl.train.schedule import set_lr, warmup_cosine

KIND = "toyworld_models"
PRETRAIN_VERSION = 2  # bump on any change to the training code that alters the weights (it is part of the key)
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "info.json"
TEACHER, STUDENT = "caspl-toy-teacher", "caspl-toy-student"
EVAL_DATASETS = ("toy_faded", "toy_underwater", "toy_night")  # the ToyWorld table's datasets
MAX_LOGIT_SCALE = math.log(100.0)
PARALLEL_MIN_STEPS = 100  # shorter recipes build one after the other (see build_toyworld_models)


@dataclass(frozen=True)
class Recipe:
    """Everything besides the architecture that determines the pretrained weights."""

    domains: tuple[str, ...]
    steps: int
    domain_weights: tuple[float, ...] | None = None  # how often each domain is drawn; None = uniform
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 40
    final_lr_fraction: float = 0.05  # cosine decays from lr to lr * this
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    init_logit_scale: float = 50.0  # CLIP starts at 1/0.07; a higher start speeds up these short runs
    seed: int = 0
    eval_datasets: tuple[str, ...] = field(default=EVAL_DATASETS)  # measured once, stored in info.json

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2 or self.lr <= 0 or not self.domains:
            raise ConfigError(f"invalid ToyWorld pretraining recipe {self}: need steps >= 1, batch_size >= 2, "
                              "lr > 0 and at least one domain")
        if self.domain_weights is not None and (len(self.domain_weights) != len(self.domains)
                                                or min(self.domain_weights) < 0 or sum(self.domain_weights) <= 0):
            raise ConfigError(f"recipe domain_weights {self.domain_weights} need one weight >= 0 per domain "
                              f"{self.domains}, not all zero")


# Sized for one CPU thread each, the two trained in parallel: about 0.36 s per teacher step and 0.2 s per student
# step on an idle core, so both finish in about the same time. The student's rare domains (weight 0.05 against 9)
# were chosen by measurement: never seen, its zero-shot accuracy there sits at chance and prompt training collapses;
# seen in 1.6 % of images, zero-shot reaches what its image features allow and prompts have nothing left to fix.
RECIPES: dict[str, Recipe] = {
    TEACHER: Recipe(domains=DOMAINS, domain_weights=(1, 1, 1, 2, 1, 2, 2), steps=600, seed=1),
    STUDENT: Recipe(domains=("clean", "noisy", "sketch", "dark", "faded", "underwater"),
                    domain_weights=(4, 4, 1, 0.05, 0.05, 0.05), steps=900, seed=2),
}

# `pretrained: toyworld-smoke`: the same architectures, domains and code path at a tenth of the steps, 40 at most
# (seconds for both), for smoke tests and CI, which check that things run and fit together, not what the miniature
# measures.
SMOKE_RECIPES: dict[str, Recipe] = {name: replace(recipe, steps=min(40, max(10, recipe.steps // 10)),
                                                  warmup=max(2, recipe.warmup // 10), eval_datasets=("toy_sketch",))
                                    for name, recipe in RECIPES.items()}
SOURCES = {"toyworld": RECIPES, "toyworld-smoke": SMOKE_RECIPES}  # weight source name -> its recipes


# ------------------------------------------------------------------------------------------------------- public
def with_smoke_weights(model: dict) -> dict:
    """A config's model entry (name, pretrained, ...) with ToyWorld weights from the smoke recipes instead of the full
    ones; an entry with any other weights, unchanged."""
    return {**model, "pretrained": "toyworld-smoke"} if model.get("pretrained") == "toyworld" else model


def model_key(name: str, recipe: Recipe) -> str:
    """The content key of `name` pretrained by `recipe`. info.json holds zero-shot results on the recipe's evaluation
    datasets, so their definitions are part of the key: a redefined dataset is never reported with stale numbers."""
    evaluated_on = {ds: asdict(TOY_DATASETS[ds]) for ds in recipe.eval_datasets}
    return content_key(KIND, PRETRAIN_VERSION, GENERATOR_VERSION, name, architecture_config(name), asdict(recipe),
                       evaluated_on)


def resolve_weights(spec: ModelSpec) -> Path:
    """The ToyWorld weights file for `spec.name` (a `caspl-toy-*` architecture) by the recipes of the weight
    source `spec.pretrained` ("toyworld" or "toyworld-smoke"), built on first use.

    A missing model is built together with its missing partner of the same source: whatever needs one of them
    almost always needs the other next, and the pair built in parallel costs the time of the slower one.
    """
    recipes = SOURCES[spec.pretrained or "toyworld"]
    if spec.name not in recipes:
        raise ConfigError(f"pretrained {spec.pretrained!r} exists only for {sorted(recipes)}, not {spec.name!r}; "
                          "use one of those architectures or another weight source")
    store = ArtifactStore()
    if store.get(KIND, model_key(spec.name, recipes[spec.name])) is None:
        missing = [name for name, recipe in recipes.items() if store.get(KIND, model_key(name, recipe)) is None]
        print(f"[caspl] building ToyWorld weights ({spec.pretrained or 'toyworld'}) for {', '.join(missing)}: first "
              f"use, then reused from {store.root / KIND} (the full recipes took 3 min 45 s to 5 min 10 s on 2 "
              "cores here)", file=sys.stderr, flush=True)
        build_toyworld_models(store, recipes=recipes)
    return build_model(spec.name, recipes[spec.name], store=store)["weights"]


def build_model(
    name: str,
    recipe: Recipe | None = None,
    store: ArtifactStore | None = None,
    force: bool = False,
    progress: bool = True,
    bar_position: int = 0,
) -> dict:
    """Build (or load from the store) `name` pretrained by `recipe` (default RECIPES[name]).

    Returns {"name", "key", "weights": Path, "built": bool, "info": dict from info.json}.
    """
    if recipe is None:
        if name not in RECIPES:
            raise ConfigError(f"no ToyWorld recipe for {name!r}; known: {sorted(RECIPES)}")
        recipe = RECIPES[name]
    store = store or ArtifactStore()
    key = model_key(name, recipe)
    if force:
        _discard(store, key)
    built = []

    def build(tmp: Path) -> dict:
        built.append(True)
        return _build_into(tmp, name, recipe, store, progress, bar_position)

    folder = store.get_or_build(KIND, key, build, log=None)
    info = json.loads((folder / INFO_FILE).read_text())
    return {"name": name, "key": key, "weights": folder / WEIGHTS_FILE, "built": bool(built), "info": info}


def build_toyworld_models(
    store: ArtifactStore | None = None,
    force: bool = False,
    recipes: Mapping[str, Recipe] | None = None,
    progress: bool = True,
    parallel: bool | None = None,
) -> dict[str, dict]:
    """Build or load the teacher and the student; returns {architecture name: build_model(...) result}.

    Models to build train in one process each when `parallel` (each on one thread, so the weights are the same
    bytes as a build one after the other); None: in parallel when every model to build trains for at least
    PARALLEL_MIN_STEPS steps, since a process start (imports, a few seconds) costs more than a short recipe.
    Cached models are only loaded and verified.
    """
    recipes = dict(recipes or RECIPES)
    store = store or ArtifactStore()
    missing = [name for name, recipe in recipes.items() if force or store.get(KIND, model_key(name, recipe)) is None]
    if parallel is None:
        parallel = all(recipes[name].steps >= PARALLEL_MIN_STEPS for name in missing)
    results = {}
    if parallel and len(missing) > 1 and not multiprocessing.current_process().daemon:
        context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
        jobs = [(name, recipes[name], str(store.root), force, i if progress else None)
                for i, name in enumerate(missing)]
        with ProcessPoolExecutor(max_workers=len(missing), mp_context=context) as pool:
            results = dict(zip(missing, pool.map(_build_in_process, jobs)))
    for name, recipe in recipes.items():
        if name not in results:
            results[name] = build_model(name, recipe, store, force and name in missing, progress)
    return {name: results[name] for name in recipes}


def _build_in_process(job: tuple[str, Recipe, str, bool, int | None]) -> dict:
    """build_model in a worker process; `bar` is the progress bar's line (None: no bar)."""
    name, recipe, root, force, bar = job
    return build_model(name, recipe, ArtifactStore(root), force, progress=bar is not None, bar_position=bar or 0)


def zeroshot_base_novel(loaded: LoadedCLIP, dataset_name: str, store: ArtifactStore | None = None) -> dict:
    """Zero-shot top-1 accuracy (%) on the test split, base and novel classes separately, and their HM."""
    from caspl.data import build_dataset
    from caspl.data.views import model_view_spec
    from caspl.methods import build_prompted_clip
    from caspl.train.evaluate import base_novel_accuracy

    dataset = build_dataset(dataset_name, store or ArtifactStore())
    model = build_prompted_clip(loaded.model, loaded.tokenizer, {"method": "zeroshot"})
    return base_novel_accuracy(model, dataset, model_view_spec(model.clip), "test")


def format_zeroshot_table(results: Mapping[str, dict]) -> str:
    """A text table of the zero-shot base/novel/HM stored with each model (rows: datasets), plus build times."""
    infos = [r["info"] for r in results.values()]
    datasets = list(dict.fromkeys(ds for info in infos for ds in info.get("zeroshot", {})))
    lines = [f"{'':14s}" + "".join(f" | {name:>20s}" for name in results),
             f"{'dataset':14s}" + f" | {'base  novel     HM':>20s}" * len(infos)]
    lines.append("-" * len(lines[0]))
    for ds in datasets:
        cells = [info["zeroshot"].get(ds) for info in infos]
        lines.append(f"{ds:14s}" + "".join(
            f" | {c['base']:6.2f} {c['novel']:6.2f} {c['hm']:6.2f}" if c else f" | {'-':>20s}" for c in cells))
    lines.append(f"{'build seconds':14s}" + "".join(f" | {info['build_seconds']:>20.1f}" for info in infos))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ training
def train_clip(name: str, recipe: Recipe, progress: bool = False,
               bar_position: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """Pretrain `name` from scratch by `recipe`; returns (state dict, training stats)."""
    import open_clip

    with _reproducible():
        torch.manual_seed(recipe.seed)
        with quiet_open_clip():
            model = open_clip.create_model(name, pretrained=None).train()
        model.logit_scale.data.fill_(math.log(recipe.init_logit_scale))
        start = time.perf_counter()
        losses = _fit(model, open_clip.get_tokenizer(name, context_length=model.context_length), recipe,
                      progress and f"pretrain {name}", bar_position)
        seconds = time.perf_counter() - start
    stats = {"train_seconds": round(seconds, 2), "final_loss": round(float(np.mean(losses[-20:])), 4),
             "logit_scale": round(model.logit_scale.detach().exp().item(), 3)}
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, stats


def _fit(model, tokenizer, recipe: Recipe, progress: str | bool, bar_position: int = 0) -> list[float]:
    """The training loop over the recipe's stream; `progress` is the tqdm label (False: no bar)."""
    from tqdm.auto import tqdm

    optimizer = _optimizer(model, recipe)
    mean, std = _normalisation(model)
    stream = pretraining_stream(recipe.seed, recipe.domains, recipe.batch_size, recipe.steps,
                                image_size=model.visual.image_size[0], domain_weights=recipe.domain_weights)
    losses: list[float] = []
    with tqdm(total=recipe.steps, desc=progress or "", unit="step", disable=not progress,
              position=bar_position) as bar:
        for step, (images, texts) in enumerate(stream):
            set_lr(optimizer, lr_at(recipe, step))
            losses.append(_train_step(model, optimizer, _to_tensor(images, mean, std), tokenizer(texts), texts))
            bar.update()
            if step % 10 == 0 or step == recipe.steps - 1:
                bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    return losses


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, texts: list[str]
) -> torch.Tensor:
    """Symmetric CLIP InfoNCE; pairs with identical captions count as positives of each other."""
    logits = logit_scale.exp() * image_features @ text_features.T
    ids = {text: i for i, text in enumerate(dict.fromkeys(texts))}
    caption = torch.tensor([ids[t] for t in texts])
    same = (caption[:, None] == caption[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)  # symmetric: duplicates form blocks
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def _train_step(model, optimizer, images: torch.Tensor, tokens: torch.Tensor, texts: list[str]) -> float:
    image_features = model.encode_image(images, normalize=True)
    text_features = model.encode_text(tokens, normalize=True)
    loss = contrastive_loss(image_features, text_features, model.logit_scale, texts)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return loss.item()


def _optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    decay, plain = [], []
    for pname, param in model.named_parameters():
        no_decay = param.ndim < 2 or "ln" in pname or "bias" in pname or "logit_scale" in pname
        (plain if no_decay else decay).append(param)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.betas, eps=1e-6)


def lr_at(recipe: Recipe, step: int) -> float:
    """Linear warm-up to `lr`, then cosine down to `lr * final_lr_fraction` at the last step."""
    return warmup_cosine(step, recipe.steps, recipe.lr, recipe.warmup, floor=recipe.lr * recipe.final_lr_fraction,
                         end_at_floor=True)


def _normalisation(model) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.visual.preprocess_cfg
    return torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)


def _to_tensor(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W], as the eval preprocessing does at native size."""
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std


@contextmanager
def _reproducible() -> Iterator[None]:
    """One thread and deterministic algorithms: the same weights on any machine with the same torch build.

    One thread also keeps the build fast on a shared machine: with two OpenMP threads on two busy cores a step
    took 10-20x longer (every parallel region waits for the descheduled thread), with one about 1.5x.
    """
    before = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.set_num_threads(before[1])


# --------------------------------------------------------------------------------------------------- artefacts
def _build_into(tmp: Path, name: str, recipe: Recipe, store: ArtifactStore, progress: bool,
                bar_position: int = 0) -> dict:
    from safetensors.torch import save_file

    start = time.perf_counter()
    with _reproducible():
        state, stats = train_clip(name, recipe, progress, bar_position)
        save_file(state, str(tmp / WEIGHTS_FILE))
        loaded = load_clip(ModelSpec(name, pretrained=str(tmp / WEIGHTS_FILE)))  # the saved file, loaded strictly
        zeroshot = {ds: _rounded(zeroshot_base_novel(loaded, ds, store)) for ds in recipe.eval_datasets}
    info = {
        "name": name, "architecture": architecture_config(name), "recipe": asdict(recipe),
        "generator_version": GENERATOR_VERSION, "pretrain_version": PRETRAIN_VERSION,
        "torch": torch.__version__, **stats, "build_seconds": round(time.perf_counter() - start, 2),
        "zeroshot": zeroshot,
    }
    atomic_write_text(tmp / INFO_FILE, json.dumps(info, indent=1, sort_keys=True))
    return {"name": name, "recipe": asdict(recipe)}


def _rounded(metrics: dict) -> dict:
    return {k: round(v, 2) for k, v in metrics.items()}


def _discard(store: ArtifactStore, key: str) -> None:
    """Move a cached build aside and delete it (for force=True)."""
    folder = store.folder(KIND, key)
    if folder.exists():
        target = folder.with_name(f".{key}.discarded.{time.time_ns()}")
        folder.rename(target)
        shutil.rmtree(target, ignore_errors=True)


for _source in SOURCES:
    register_weight_source(_source, resolve_weights)

"""The study's validation pass: what every trial will build, checked before Ray starts; each problem is one line.

`check_study` reads no data and writes nothing: datasets and roots, model names and weight sources, the search
space, and for each method the boosting and adapting configs and the prompt modules themselves (on an uninitialised
copy of the student architecture) at the corners of the space: every parameter at each of its extreme values,
the others at their low or their high ends, plus every point of `points_to_evaluate`. Depths are checked against
the student's layers whether searched, fixed or left at their defaults, because the method configs and modules
check them. `check_devices` and `check_resources` compare what trials ask for with what the machine (a local Ray)
has.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from caspl.config import DataConfig, from_dict
from caspl.errors import CasplError, ConfigError
from caspl.study.config import StudyConfig
from caspl.study.space import SearchSpace, build_space, range_ends, trial_configs

PROBE_CLASSES = ("object",)  # one class name is enough to lay the text tokens out (the prompts take the room)
PROBE_TEMPLATES = ("a photo of a {}.",)


def check_study(study: StudyConfig) -> SearchSpace:
    """Everything about the config that can be checked without Ray, data or weights; returns the search space."""
    from caspl.models import architecture_config, check_weight_source, meta_clip

    for where, data in [("data", d) for d in study.datasets] + [("boost.data", study.boost.data)]:
        if data is not None:
            check_data(where, data)
    architecture_config(study.teacher.name)
    for model in (study.student, study.teacher):
        check_weight_source(model.spec(study.runtime))
    student = meta_clip(study.student.name)
    space = build_space(study, _layers(student[0]))
    check_trials(study, space, student)
    check_devices(study)
    return space


def check_data(where: str, data: DataConfig) -> None:
    """The dataset is registered and an explicit root is an existing folder (a missing ToyWorld root would be
    created silently as a new, empty store)."""
    from caspl.data.registry import resolve_name

    resolve_name(data.dataset)
    if data.root is not None and not Path(data.root).expanduser().is_dir():
        raise ConfigError(f"{where}.root {data.root} is not an existing folder; point it at the folder holding the "
                          "dataset (for ToyWorld: an artefact store), or leave it out")


def _layers(clip) -> int:
    return min(len(clip.transformer.resblocks), len(clip.visual.transformer.resblocks))


# --- every trial's configs and prompt modules ---------------------------------------------------------------------


def check_trials(study: StudyConfig, space: SearchSpace, student) -> None:
    """Build each corner trial's run configs and its prompt modules (student + adapting method + boosting prompts)."""
    from caspl.train.adapt import AdaptRunConfig
    from caspl.train.boost import BoostRunConfig

    for params in corner_trials(study, space):
        try:
            _, boost, adapt = trial_configs(study, params, seed=study.search.seeds[0])
            boost_cfg = from_dict(BoostRunConfig, boost, "boost")
            adapt_cfg = from_dict(AdaptRunConfig, adapt, "adapt")
            _build_modules(student, adapt_cfg.method, boost_cfg.method)
        except CasplError as exc:
            raise type(exc)(f"{exc} (in trials with {_describe(params)})") from None


def _build_modules(student, adapt_method, boost_method) -> None:
    """On the meta device: every shape and check of the real build, no memory and no arithmetic."""
    import torch

    from caspl.methods import build_prompted_clip

    clip, tokenizer = student
    with torch.device("meta"):
        build_prompted_clip(clip, tokenizer, adapt_method, boost_method).set_classes(PROBE_CLASSES, PROBE_TEMPLATES)


def corner_trials(study: StudyConfig, space: SearchSpace) -> Iterator[dict]:
    """Distinct parameter sets per method: all parameters low, all high, and each extreme value of each parameter
    with the others low or high; then the `points_to_evaluate` (for each method when a point names none)."""
    for point in study.search.points_to_evaluate:
        unknown = sorted(set(point) - set(space.params) - {"method"})
        if unknown or point.get("method", space.methods[0]) not in space.methods:
            raise ConfigError(f"search.points_to_evaluate: {point} names {unknown or point['method']!r}, which is "
                              f"not a searched parameter or method (parameters: {sorted(space.params)})")
    seen = set()
    for method in space.methods:
        ends = {name: range_ends(spec) for name, spec in space.params.items() if space.applies(name, method)}
        lows = {name: values[0] for name, values in ends.items()}
        highs = {name: values[-1] for name, values in ends.items()}
        corners = [lows, highs] + [{**rest, name: value} for name, values in ends.items() for value in values
                                   for rest in (lows, highs)]
        for point in study.search.points_to_evaluate:
            if point.get("method", method) == method:
                corners.append({**lows, **point})
        for corner in corners:
            params = {"method": method, **corner}
            key = json.dumps(params, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                yield params


def _describe(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


# --- devices and resources ----------------------------------------------------------------------------------------


def check_devices(study: StudyConfig) -> None:
    """`runtime.device` names a device, and what asks for GPUs agrees with it."""
    import torch

    device = study.runtime.device
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"runtime.device {device!r} must be cpu, cuda or cuda:N")
    if kind == "cuda" and study.resources.trial_gpus <= 0:
        raise ConfigError("runtime.device cuda needs resources.trial_gpus > 0: a trial without a GPU sees none")
    if study.boost.use_gpu and kind != "cuda":
        raise ConfigError("boost.use_gpu: true needs runtime.device cuda (or set use_gpu: false)")


def local_resources(study: StudyConfig) -> dict[str, float]:
    """What a local Ray started by the study will have: `resources.ray_num_cpus` (else every core) and the GPUs."""
    import torch

    return {"CPU": float(study.resources.ray_num_cpus or os.cpu_count() or 1),
            "GPU": float(torch.cuda.device_count())}


def check_resources(study: StudyConfig, available: dict[str, float], where: str = "the local Ray") -> None:
    """ConfigError when trials (or the teacher cache's actors) ask for more than `available` can ever give: Ray
    would wait forever instead of failing."""
    cpus, gpus = available.get("CPU", 0.0), available.get("GPU", 0.0)
    res, boost, cache = study.resources, study.boost, study.boost.cache
    trial_cpus = res.trial_cpus + boost.workers * boost.cpus_per_worker
    trial_gpus = res.trial_gpus + (boost.workers if boost.use_gpu else 0)
    demands = [
        ("resources.trial_cpus" + (" + boost.workers x boost.cpus_per_worker" if boost.workers else ""),
         trial_cpus, cpus, "CPUs"),
        ("resources.trial_gpus" + (" + boost.workers (use_gpu)" if boost.use_gpu else ""), trial_gpus, gpus, "GPUs"),
        ("boost.cache.actors x actor_num_cpus", cache.actors * cache.actor_num_cpus, cpus, "CPUs"),
        ("boost.cache.actors x actor_num_gpus", cache.actors * cache.actor_num_gpus, gpus, "GPUs"),
    ]
    if study.runtime.device.startswith("cuda") and gpus < 1:
        raise ConfigError(f"runtime.device {study.runtime.device} but {where} has no CUDA GPU; use device: cpu")
    for what, asked, has, unit in demands:
        if asked > has:
            raise ConfigError(f"{what} = {asked:g} {unit} exceeds the {has:g} {unit} of {where}, so Ray would wait "
                              "forever; lower it (or raise resources.ray_num_cpus)")

"""The define-by-run search space (Optuna through Ray Tune) and the mapping of sampled values onto run configs."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from caspl.config import DataConfig, merge, to_dict
from caspl.errors import ConfigError
from caspl.methods import BASE, list_methods
from caspl.study.config import SearchParam, StudyConfig

DEPTH_ALIASES = {"boost.depth": ("text_depth", "vision_depth"), "boost.length": ("text_length", "vision_length")}
BOOST_DEPTHS = ("boost.depth", "boost.text_depth", "boost.vision_depth")


class SearchSpace:
    """Callable define-by-run space: picks `method`, then the shared and that method's own parameters.

    A class instance (not a closure) so that Tune can pickle it with the searcher and restore it after a crash.
    """

    def __init__(self, methods: list[str], params: dict[str, dict]):
        self.methods = list(methods)
        self.params = params
        self.base_methods = list_methods(BASE)

    def applies(self, name: str, method: str) -> bool:
        """Whether parameter `name` is sampled in trials of `method` (a `<method>.` parameter only in its own)."""
        owner = name.split(".", 1)[0]
        return owner not in self.base_methods or owner == method

    def __call__(self, trial) -> None:
        method = trial.suggest_categorical("method", self.methods)
        for name, spec in self.params.items():
            if not self.applies(name, method):
                continue
            if spec["type"] == "categorical":
                trial.suggest_categorical(name, spec["choices"])
            elif spec["type"] == "int":
                trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=spec["log"],
                                  step=int(spec["step"] or 1))
            else:
                trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=spec["log"],
                                    step=spec["step"])
        return None


def build_space(study: StudyConfig, student_layers: int) -> SearchSpace:
    """Validate the study's parameters against the student and return the space."""
    params = {}
    for name, param in study.search.space.items():
        params[name] = _checked(name, param, study, student_layers)
    return SearchSpace(study.methods, params)


def _checked(name: str, param: SearchParam, study: StudyConfig, student_layers: int) -> dict:
    owner = name.split(".", 1)[0]
    if owner not in ("boost", "adapt", *study.methods):
        raise ConfigError(f"search parameter {name!r}: the prefix must be boost., adapt. or one of the study's "
                          f"methods {study.methods}")
    spec = dataclasses.asdict(param)
    if spec["high"] == "max":
        spec["high"] = student_layers
    if param.type != "categorical":
        if not isinstance(spec["high"], (int, float)) or spec["low"] > spec["high"]:
            raise ConfigError(f"search parameter {name!r}: need low <= high (got {spec['low']}, {spec['high']})")
    values = range_ends(spec)
    if name in BOOST_DEPTHS and not all(1 <= int(v) <= student_layers for v in values):
        raise ConfigError(f"search parameter {name!r}: depths {values} must lie in 1..{student_layers} (the student "
                          f"{study.student.name} has {student_layers} layers)")
    if name.endswith("temperature") and not all(float(v) > 0 for v in values):
        raise ConfigError(f"search parameter {name!r}: temperatures must be > 0, got {values}")
    if name.endswith(".lr") and not all(float(v) > 0 for v in values):
        raise ConfigError(f"search parameter {name!r}: learning rates must be > 0, got {values}")
    return spec


def range_ends(spec: dict) -> list:
    """The extreme values of a parameter: every categorical choice, or a range's low end and its highest reachable
    value (a stepped range stops at the last low + k * step <= high, as Optuna samples it)."""
    if spec["type"] == "categorical":
        return list(spec["choices"])
    low, high, step = spec["low"], spec["high"], spec["step"]
    if step:
        high = low + step * ((high - low) // step)
    cast = int if spec["type"] == "int" else float
    return [cast(low), cast(high)]


def _set_path(target: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value


def trial_configs(study: StudyConfig, params: dict[str, Any], seed: int,
                  data: DataConfig | None = None) -> tuple[str, dict, dict]:
    """(method, boost run config dict, adapt run config dict) for one trial's sampled parameters on one of the
    study's datasets (default: its first)."""
    method = params["method"]
    data = data or study.datasets[0]
    shared = {"student": to_dict(study.student), "runtime": to_dict(study.runtime)}
    boost = {**merge(to_dict(study.boost), study.boost_by_dataset.get(data.dataset, {})), **shared,
             "teacher": to_dict(study.teacher), "data": to_dict(study.boost.data or data)}
    adapt = to_dict(study.adapt)
    method_defaults = adapt.pop("methods")
    adapt["optim"].update(adapt.pop("optim_by_method").get(method, {}))
    adapt = {**adapt, **shared, "data": to_dict(data), "seeds": [seed],
             "method": {"method": method, **copy.deepcopy(method_defaults.get(method, {}))}}
    for name, value in params.items():
        if name == "method" or name.startswith("__"):
            continue
        owner, rest = name.split(".", 1)
        if name in DEPTH_ALIASES:
            for field_name in DEPTH_ALIASES[name]:
                boost["method"][field_name] = value
        elif owner == "boost" and rest.split(".")[0] in ("optim", "cache"):
            _set_path(boost, rest, value)
        elif owner == "boost":
            boost["method"][rest] = value
        elif owner == "adapt":
            _set_path(adapt, rest, value)
        elif owner == method:
            adapt["method"][rest] = value
    return method, boost, adapt

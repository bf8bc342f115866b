"""The study config: what to search, over which base methods, with which budgets and resources.

Search parameters are named by where they go:
    boost.depth / boost.length      both towers' boosting depth / length (or boost.text_depth, boost.vision_length…)
    boost.temperature               distillation temperature (> 0)
    boost.optim.lr, adapt.optim.lr  learning rates (any optim field)
    <method>.<field>                a method-specific field, sampled only in trials of that method (e.g. coop.n_ctx)
An upper bound `max` stands for the student's layer count. `method` itself is always searched over `methods`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from caspl.config import DataConfig, ModelConfig, RuntimeConfig, from_dict
from caspl.errors import ConfigError
from caspl.methods import BASE, list_methods, method_class, method_config
from caspl.train.adapt import AdaptSection
from caspl.train.boost import BoostSection

PARAM_TYPES = ("int", "float", "categorical")


@dataclass
class SearchParam:
    type: str
    low: float | None = None
    high: Any = None  # a number, or "max" (the student's layer count) for depths
    log: bool = False
    step: float | None = None
    choices: list = field(default_factory=list)

    def __post_init__(self):
        if self.type not in PARAM_TYPES:
            raise ConfigError(f"search parameter type {self.type!r} must be one of {PARAM_TYPES}")
        if self.type == "categorical" and not self.choices:
            raise ConfigError("a categorical search parameter needs a non-empty `choices` list")
        if self.type != "categorical" and (self.low is None or self.high is None):
            raise ConfigError(f"an {self.type} search parameter needs `low` and `high`")


@dataclass
class SearchConfig:
    space: dict = field(default_factory=dict)  # name -> SearchParam fields
    num_samples: int = 8  # configurations suggested by Optuna (each repeated once per seed)
    seeds: list[int] = field(default_factory=lambda: [1])  # adapting seeds: repeats; the searcher sees their mean
    searcher_seed: int = 0
    max_concurrent: int = 2
    points_to_evaluate: list[dict] = field(default_factory=list)
    scheduler: str | None = None  # None or "asha" (on per-epoch validation HM)
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass
class TrackingConfig:
    env_file: str | None = "mlflow.env"  # relative to the study config's folder's repository root (see runner)
    tracking_uri: str | None = None  # overrides the env file
    experiment: str | None = None


@dataclass
class ResourcesConfig:
    trial_cpus: float = 1.0
    trial_gpus: float = 0.0
    ray_num_cpus: int | None = None  # for a local Ray started by the study; ignored on a cluster


@dataclass(kw_only=True)
class StudyAdaptSection(AdaptSection):
    """The study's adapting settings (every trial's), plus per-method defaults: `methods: {coop: {n_ctx: 4}}`."""

    methods: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        for name, values in self.methods.items():
            if method_class(name).config_cls.kind != BASE or not isinstance(values, dict):
                raise ConfigError(f"adapt.methods.{name}: expected a base method's settings, one of "
                                  f"{list_methods(BASE)}")
            method_config(name, **values)  # an unknown or invalid key fails here, at load time


@dataclass
class StudyConfig:
    name: str
    student: ModelConfig
    teacher: ModelConfig
    data: DataConfig
    methods: list[str]
    search: SearchConfig = field(default_factory=SearchConfig)
    boost: BoostSection = field(default_factory=BoostSection)  # the teacher is the study's own `teacher`
    adapt: StudyAdaptSection = field(default_factory=StudyAdaptSection)
    baselines: bool = True  # also adapt each method without CasPL (once per method and seed) for comparison
    storage: str = "runs"  # Tune storage: a local path (relative to the current directory) or a URI
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self):
        base_methods = list_methods(BASE)
        unknown = [m for m in self.methods if m not in base_methods]
        if unknown or not self.methods:
            raise ConfigError(f"methods {self.methods} must be a non-empty list of base methods from {base_methods}")
        if self.boost.teacher is not None:
            raise ConfigError("boost.teacher: a study names its teacher once, at the top level (`teacher:`)")
        self.search.space = {name: from_dict(SearchParam, spec, f"search.space.{name}")
                             for name, spec in self.search.space.items()}
        if not self.search.space and not self.search.points_to_evaluate:
            raise ConfigError("search.space is empty: name at least one parameter (e.g. boost.depth)")


def load_study_config(data: dict) -> StudyConfig:
    return from_dict(StudyConfig, copy.deepcopy(data))

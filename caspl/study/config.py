"""The study config: what to search, over which base methods, with which budgets and resources.

Search parameters are named by where they go:
    boost.depth / boost.length      both towers' boosting depth / length (or boost.text_depth, boost.vision_length…)
    boost.temperature               distillation temperature (> 0)
    boost.optim.lr, adapt.optim.lr  learning rates (any optim field)
    <method>.<field>                a method-specific field, sampled only in trials of that method (e.g. coop.n_ctx)
An upper bound `max` stands for the student's layer count. `method` itself is always searched over `methods`.

The objective the searcher maximises (`search.objective`):
    pseudo_novel (default)  label-free on novel classes: the base classes are split by a seeded rule into pseudo-base
                            (adapting trains on them during the search) and pseudo-novel (held out), and the objective
                            is the HM of their validation accuracies. No image or label of a novel class is used;
                            boosting still sees the unlabeled images and class names (CasPL's own, logged, transductive
                            setting).
    val_hm                  HM of base and novel accuracy on the labelled validation images of both (novel included).
Every trial also adapts on the real base classes for its test numbers, which the searcher never sees; the summary
reports how well each objective ranks trials by test HM (Spearman).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from caspl.config import DataConfig, ModelConfig, OptimConfig, RuntimeConfig, from_dict, merge, to_dict
from caspl.errors import ConfigError, FieldError
from caspl.methods import BASE, list_methods, method_class, method_config
from caspl.train.adapt import AdaptSection
from caspl.train.boost import BoostSection

PARAM_TYPES = ("int", "float", "categorical")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # a folder name and a Tune experiment name


def check_study_name(name: str) -> None:
    """ConfigError unless `name` is a safe identifier: it names the study's folder under the storage."""
    if not isinstance(name, str) or not SAFE_NAME.match(name):
        raise ConfigError(f"study name {name!r} must be 1-100 letters, digits, '.', '_' or '-', starting with a "
                          "letter or digit (it names the study's folder under storage)")


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
        if self.type == "categorical" and not all(isinstance(c, (bool, int, float, str)) for c in self.choices):
            raise FieldError("choices", f"must be numbers or strings, got {self.choices}")
        if self.type == "int" and not all(_is_int(v) for v in (self.low, self.high, self.step) if v != "max"):
            raise FieldError("low", f"high and step of an int parameter must be integers (got {self.low}, "
                                    f"{self.high}, {self.step})")
        if self.step is not None and (self.step <= 0 or self.log):
            raise FieldError("step", f"must be > 0 and cannot be combined with log: true (got {self.step})")
        if self.log and self.low is not None and self.low <= 0:
            raise FieldError("low", f"must be > 0 for a log-scaled parameter, got {self.low}")


@dataclass
class SearchConfig:
    space: dict = field(default_factory=dict)  # name -> SearchParam fields
    num_samples: int = 8  # configurations suggested by Optuna (each repeated once per seed)
    seeds: list[int] = field(default_factory=lambda: [1])  # adapting seeds: repeats; the searcher sees their mean
    searcher_seed: int = 0
    max_concurrent: int = 2
    points_to_evaluate: list[dict] = field(default_factory=list)
    objective: Literal["pseudo_novel", "val_hm"] = "pseudo_novel"  # what the searcher maximises (module docstring)
    pseudo_split_seed: int = 0  # the seeded rule splitting the base classes into pseudo-base and pseudo-novel
    scheduler: Literal["asha"] | None = None  # None or "asha" (on the per-epoch objective)
    grace_period: int = 1
    reduction_factor: int = 2

    def __post_init__(self):
        for name, minimum in (("num_samples", 1), ("max_concurrent", 1), ("grace_period", 1),
                              ("reduction_factor", 2)):
            if getattr(self, name) < minimum:
                raise FieldError(name, f"must be >= {minimum}, got {getattr(self, name)}")
        if not self.seeds:
            raise FieldError("seeds", "must name at least one adapting seed, e.g. [1]")
        if len(set(self.seeds)) != len(self.seeds):
            raise FieldError("seeds", f"repeats a seed ({self.seeds}); each seed is one repeat")
        if not all(isinstance(point, dict) for point in self.points_to_evaluate):
            raise FieldError("points_to_evaluate", "must be a list of {parameter: value} mappings")

    @property
    def trials(self) -> int:
        """The number of trials the study runs: each sampled configuration once per seed."""
        return self.num_samples * len(self.seeds)


@dataclass
class TrackingConfig:
    env_file: str | None = "mlflow.env"  # relative to the study config's folder's repository root (see runner)
    tracking_uri: str | None = None  # overrides the env file
    experiment: str | None = None

    def __post_init__(self):
        if self.experiment is not None and not self.experiment.strip():
            raise FieldError("experiment", "must be a non-empty MLflow experiment name (or null for the env file's)")


@dataclass
class ResourcesConfig:
    trial_cpus: float = 1.0
    trial_gpus: float = 0.0
    ray_num_cpus: int | None = None  # for a local Ray started by the study; ignored on a cluster
    max_failures: int = 2  # retries of a trial whose worker process or node died, each from its last checkpoint

    def __post_init__(self):
        if not self.trial_cpus > 0:
            raise FieldError("trial_cpus", f"must be > 0 (a small fraction is fine), got {self.trial_cpus}")
        if self.trial_gpus < 0:
            raise FieldError("trial_gpus", f"must be >= 0, got {self.trial_gpus}")
        if self.ray_num_cpus is not None and self.ray_num_cpus < 1:
            raise FieldError("ray_num_cpus", f"must be >= 1 (or null for all cores), got {self.ray_num_cpus}")
        if self.max_failures < 0:
            raise FieldError("max_failures", f"must be >= 0, got {self.max_failures}")


@dataclass(kw_only=True)
class StudyAdaptSection(AdaptSection):
    """The study's adapting settings (every trial's), plus per-method settings: `methods: {coop: {n_ctx: 4}}` and
    per-method optimiser overrides `optim_by_method: {coop: {epochs: 50, batch_size: 32}}` (each method's paper
    budget)."""

    methods: dict[str, dict] = field(default_factory=dict)
    optim_by_method: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        for where, table in (("methods", self.methods), ("optim_by_method", self.optim_by_method)):
            for name, values in table.items():
                if method_class(name).config_cls.kind != BASE or not isinstance(values, dict):
                    raise ConfigError(f"adapt.{where}.{name}: expected a base method's settings, one of "
                                      f"{list_methods(BASE)}")
        for name, values in self.methods.items():
            method_config(name, **values)  # an unknown or invalid key fails here, at load time
        for name, values in self.optim_by_method.items():
            from_dict(OptimConfig, {**to_dict(self.optim), **values}, f"adapt.optim_by_method.{name}")


@dataclass
class StudyConfig:
    name: str
    student: ModelConfig
    teacher: ModelConfig
    data: DataConfig | list[DataConfig]  # one dataset, or several: each trial runs them all and reports their average
    methods: list[str]
    search: SearchConfig = field(default_factory=SearchConfig)
    boost: BoostSection = field(default_factory=BoostSection)  # the teacher is the study's own `teacher`
    boost_by_dataset: dict[str, dict] = field(default_factory=dict)  # {imagenet: {optim: {batch_size: 128}}}
    adapt: StudyAdaptSection = field(default_factory=StudyAdaptSection)
    baselines: bool = True  # also adapt each method without CasPL (once per method and seed) for comparison
    storage: str = "runs"  # Tune storage: a local path (relative to the current directory) or a URI
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self):
        check_study_name(self.name)
        base_methods = list_methods(BASE)
        unknown = [m for m in self.methods if m not in base_methods]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods {self.methods} must be a non-empty list of distinct base methods from "
                              f"{base_methods}")
        if self.boost.teacher is not None:
            raise ConfigError("boost.teacher: a study names its teacher once, at the top level (`teacher:`)")
        self.search.space = {name: from_dict(SearchParam, spec, f"search.space.{name}")
                             for name, spec in self.search.space.items()}
        if not self.search.space and not self.search.points_to_evaluate:
            raise ConfigError("search.space is empty: name at least one parameter (e.g. boost.depth)")
        names = [d.dataset for d in self.datasets]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"data must name at least one dataset, each once (got {names})")
        if len(names) > 1 and self.boost.data is not None:
            raise ConfigError("boost.data: a study over several datasets boosts on each of them; leave boost.data out")
        for name, changes in self.boost_by_dataset.items():
            if name not in names or not isinstance(changes, dict):
                raise ConfigError(f"boost_by_dataset.{name}: names no dataset of the study ({names}); give "
                                  "{dataset: {boost fields to change}}")
            from_dict(BoostSection, merge(to_dict(self.boost), changes), f"boost_by_dataset.{name}")
        if len(names) > 1 and self.search.scheduler is not None:
            raise ConfigError("search.scheduler: early stopping compares per-epoch results of one dataset; use it "
                              "with a single dataset (or set scheduler: null)")

    @property
    def datasets(self) -> list[DataConfig]:
        """The study's datasets, in order (`data` as one section or a list)."""
        return list(self.data) if isinstance(self.data, list) else [self.data]


def load_study_config(data: dict) -> StudyConfig:
    return from_dict(StudyConfig, copy.deepcopy(data))


def _is_int(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == int(value))

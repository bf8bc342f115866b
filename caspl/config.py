"""Typed configs: dataclasses built from YAML, validated before any expensive work, hashed for cache keys.

`from_dict(Cls, data)` builds nested dataclasses strictly: an unknown key, a missing required key, a value of the
wrong type or a value outside a `Literal[...]` is a ConfigError naming the dotted key (e.g. `boost.optim.lr`).
A class with a `from_config(data, where)` classmethod parses its own section; method sections use it to dispatch on
their `method:` key through the method registry, so every section is typed once, at load time.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from caspl.artifacts import content_key
from caspl.errors import ConfigError, FieldError

T = TypeVar("T")


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, strictly (see module docstring)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section {where or '<root>'} must be a mapping, got {type(data).__name__}")
    if hasattr(cls, "from_config"):
        return cls.from_config(data, where)
    return build_dataclass(cls, data, where)


def build_dataclass(cls: type[T], data: dict, where: str = "") -> T:
    """The strict field-by-field build of `from_dict`, without a class's own `from_config` hook."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {_join(where, unknown[0])}; known keys here: {sorted(fields)}")
    values = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name in data:
            values[name] = _coerce(hints[name], data[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {key}")
    try:
        return cls(**values)
    except FieldError as exc:
        raise ConfigError(f"{_join(where, exc.field)} {exc.problem}") from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid config section {where or '<root>'}: {exc}") from exc


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"config key {key} cannot be null")
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, key)
    if origin in (list, tuple) or hint in (list, tuple):
        origin = origin or hint
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key} must be a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"config key {key} is {value!r}; choose one of {list(args)}")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-5 as a string
        except ValueError:
            pass
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"config key {key} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def to_dict(obj: Any) -> Any:
    """The plain-data form of a config, the inverse of `from_dict` (a section's own `to_config()` is used)."""
    if hasattr(obj, "to_config"):
        return obj.to_config()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def merge(base: dict, changes: dict) -> dict:
    """A copy of config mapping `base` with `changes` applied key by key (nested mappings merged, values replaced)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def config_hash(obj: Any) -> str:
    return content_key(to_dict(obj))


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


# --- shared sections -------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name: str
    pretrained: str | None = None
    quick_gelu: bool | None = None

    def spec(self, runtime: "RuntimeConfig"):
        from caspl.models import ModelSpec

        return ModelSpec(self.name, self.pretrained, self.quick_gelu, runtime.precision, runtime.device)


@dataclass
class RuntimeConfig:
    device: str = "cpu"
    precision: str = "fp32"  # fp32 on CPU; bf16/fp16 on GPU
    store: str | None = None  # artefact store root; None: $CASPL_CACHE or ~/.cache/caspl
    threads: int | None = None  # torch threads per process; None: torch's default

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"runtime.precision {self.precision!r} must be fp32, bf16 or fp16")
        if self.device == "cpu" and self.precision == "fp16":
            raise ConfigError("runtime.precision fp16 needs a GPU; use fp32 (or bf16) on CPU")


@dataclass
class DataConfig:
    dataset: str
    root: str | None = None  # $DATA for the CoOp datasets; the artefact store for ToyWorld
    options: dict = field(default_factory=dict)  # extra builder arguments (e.g. ToyWorld sizes)


@dataclass
class OptimConfig:
    lr: float = 0.0025
    epochs: int = 20
    batch_size: int = 4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    eval_batch_size: int = 256

    def __post_init__(self):
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"optim needs lr > 0, epochs >= 1, batch_size >= 1 (got {self.lr}, {self.epochs}, "
                              f"{self.batch_size})")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"optim.warmup_epochs {self.warmup_epochs} must be in [0, epochs)")

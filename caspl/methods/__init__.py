"""Prompt methods registered by name; `list_methods()` shows them. CasPL = any base method + frozen `boost` prompts.

Every module of this package is imported here, so a method registers by being a file in `caspl/methods/`.
"""

import importlib
import pkgutil

from caspl.methods.base import (
    BASE,
    BOOST,
    ZEROSHOT,
    MethodConfig,
    PromptMethod,
    build_method,
    config_from_dict,
    list_methods,
    method_class,
    method_config,
    register_method,
)
from caspl.methods.compose import build_prompted_clip

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "BASE",
    "BOOST",
    "ZEROSHOT",
    "MethodConfig",
    "PromptMethod",
    "build_method",
    "build_prompted_clip",
    "config_from_dict",
    "list_methods",
    "method_class",
    "method_config",
    "register_method",
]

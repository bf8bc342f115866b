"""Prompt methods registered by name; `list_methods()` shows them. CasPL = any of them + frozen `boost` prompts."""

from caspl.methods.base import (
    MethodConfig,
    PromptMethod,
    build_method,
    config_from_dict,
    list_methods,
    method_config,
    register_method,
)
from caspl.methods.compose import build_prompted_clip

__all__ = [
    "MethodConfig",
    "PromptMethod",
    "build_method",
    "build_prompted_clip",
    "config_from_dict",
    "list_methods",
    "method_config",
    "register_method",
]

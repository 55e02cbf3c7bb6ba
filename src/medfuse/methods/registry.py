"""Build any method by name (as timm does for models): `build_method("dwt", params)`.

Entries are import paths resolved on first use, so importing the registry stays cheap and a
method's heavy dependencies load only when that method is used. A learned method's factory
takes its merged config (method settings + variant overrides) and returns a `FusionNet`;
a classical one returns a `Fuser`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from medfuse.errors import ConfigError

# name -> "module:factory". One place lists every method the project knows, and the stages of
# a multi-stage method that are trained on their own ("<method>:<stage>", never fused with).
_FACTORIES: dict[str, str] = {
    "average": "medfuse.methods.classical:AverageFusion",
    "max": "medfuse.methods.classical:MaxFusion",
    "dwt": "medfuse.methods.classical:DWTFusion",
    "laplacian": "medfuse.methods.classical:LaplacianFusion",
    "wdualmine": "medfuse.methods.wdualmine:build",
    "asfe-fusion": "medfuse.methods.asfe_fusion:build",
    "adafuse": "medfuse.methods.adafuse:build",
    "mmif-amin": "medfuse.methods.mmif_amin:build",
    "dm-fnet:stage1": "medfuse.methods.dm_fnet:build_unet",  # its first stage (medfuse.train)
    "dm-fnet": "medfuse.methods.dm_fnet:build",
}


def method_names() -> list[str]:
    """The methods that fuse (not their separately trained stages)."""
    return sorted(name for name in _FACTORIES if ":" not in name)


def _resolve(name: str) -> Callable[..., Any]:
    if name not in _FACTORIES:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(sorted(_FACTORIES))}")
    module_name, attr = _FACTORIES[name].split(":")
    return getattr(importlib.import_module(module_name), attr)


def build_method(name: str, config: Mapping[str, Any] | None = None) -> Any:
    """Instantiate method `name` from its (merged) config section of params.yaml."""
    factory = _resolve(name)
    settings = {k: v for k, v in (config or {}).items() if k != "kind"}
    missing = [
        p.name
        for p in inspect.signature(factory).parameters.values()
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in settings
    ]
    if missing:  # the classes hold no defaults: params.yaml is the one place for them
        raise ConfigError(
            f"methods.{name}: missing key(s) {', '.join(missing)} (set them in params.yaml)"
        )
    return factory(**settings)

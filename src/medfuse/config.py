"""params.yaml plus profile overlays, deep-merged and validated against the workflow's schema.

One loader for the CLI, the Snakefile and the tests, so a bad value fails at once, everywhere,
with the key that is wrong.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from medfuse.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")
# Extra overlays from the environment (colon-separated), e.g. a local mirror for the data.
OVERLAY_ENV = "MEDFUSE_PARAMS_OVERLAY"
# A profile name from the environment wins over params.yaml's `profile` key.
PROFILE_ENV = "MEDFUSE_PROFILE"
WORKFLOW_DIR = Path(__file__).resolve().parents[2] / "workflow"
SCHEMA_PATH = WORKFLOW_DIR / "schemas" / "params.schema.yaml"


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `override` into a copy of `base`: mappings merge recursively, other values replace."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def validate(params: Mapping[str, Any], source: str = "params") -> None:
    schema = yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(params), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = ".".join(str(p) for p in first.path) or "<top level>"
        raise ConfigError(f"{source}: {where}: {first.message}")


def overlays_from_env() -> list[Path]:
    raw = os.environ.get(OVERLAY_ENV, "")
    return [Path(p) for p in raw.split(os.pathsep) if p]


def profile_overlay(profile: str) -> Path:
    """The overlay file of a named profile (workflow/profiles/<name>/params.yaml)."""
    path = WORKFLOW_DIR / "profiles" / profile / "params.yaml"
    if not path.is_file():
        known = sorted(p.parent.name for p in (WORKFLOW_DIR / "profiles").glob("*/params.yaml"))
        raise ConfigError(f"unknown profile {profile!r} ({path} not found); known: {known}")
    return path


def load_params(
    path: str | Path = DEFAULT_PARAMS,
    overlays: Sequence[str | Path] | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    """Load `path`, then merge in order: the profile's overlay, `overlays`, $MEDFUSE_PARAMS_OVERLAY.

    The profile is `profile`, else $MEDFUSE_PROFILE, else params.yaml's `profile` key; the
    merged result records the profile actually used.
    """
    path = Path(path)
    params = _read_yaml(path)
    profile = profile or os.environ.get(PROFILE_ENV) or params.get("profile", "paper")
    params["profile"] = profile
    overlay_paths = [profile_overlay(profile)]
    overlay_paths += [Path(p) for p in (overlays or [])] + overlays_from_env()
    for overlay in overlay_paths:
        params = deep_merge(params, _read_yaml(overlay))
    names = " + ".join(str(p) for p in [path, *overlay_paths])
    validate(params, names)
    return params


def canonical_method(name: str) -> str:
    """`published:asfe-fusion` (the user-facing spelling) is `published-asfe-fusion` in files."""
    return name.replace(":", "-")


def method_config(params: Mapping[str, Any], method: str, variant: str = "full") -> dict[str, Any]:
    """A method's settings with a variant's overrides merged in (ablations are configuration)."""
    method = canonical_method(method)
    methods = params["methods"]
    if method not in methods:
        raise ConfigError(f"unknown method {method!r}; known: {', '.join(sorted(methods))}")
    variants = params.get("variants", {}).get(method, {"full": {}})
    if variant not in variants and variant != "full":
        raise ConfigError(
            f"unknown variant {variant!r} of {method!r}; known: {', '.join(sorted(variants))}"
        )
    return deep_merge(methods[method], variants.get(variant, {}))

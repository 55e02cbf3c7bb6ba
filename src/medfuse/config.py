"""params.yaml plus profile overlays, deep-merged and validated against the workflow's schema.

One loader for the CLI, the Snakefile and the tests, so a bad value fails at once, everywhere,
with the key that is wrong.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import jsonschema
import yaml

from medfuse.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")
# Extra overlays from the environment (colon-separated), e.g. a local mirror for the data.
OVERLAY_ENV = "MEDFUSE_PARAMS_OVERLAY"
# A profile name from the environment wins over params.yaml's `profile` key.
PROFILE_ENV = "MEDFUSE_PROFILE"
# The package's default project, laid out as the repository: params.yaml and workflow/'s schema
# and profile overlays (links to the repository's files in a source tree, copies in a wheel).
PACKAGED_PROJECT = Path(__file__).with_name("default_project")
PACKAGED_PARAMS = PACKAGED_PROJECT / DEFAULT_PARAMS
# A profile's overlay inside a project: <project>/workflow/profiles/<name>/params.yaml.
PROFILES_DIR = Path("workflow") / "profiles"
# The schema is the code's own contract with params.yaml, so it always comes with the package.
SCHEMA_PATH = PACKAGED_PROJECT / "workflow" / "schemas" / "params.schema.yaml"


ConfigT = TypeVar("ConfigT")


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `override` into a copy of `base`: mappings merge recursively, other values replace."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, except that `1e-3` is a float, as in YAML 1.2 (and DVC, which reads
    params.yaml too); YAML 1.1 reads it as a string unless written `1.0e-3`."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found")
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


@cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = yaml.load(SCHEMA_PATH.read_text(encoding="utf-8"), Loader=_Loader)
    return jsonschema.Draft202012Validator(schema)


def _initials(key: str) -> str:
    return "".join(part[:1] for part in key.split("_"))


def _nearest(word: str, known: Sequence[str]) -> str | None:
    """The known key `word` most likely meant: spelt alike, or one is the other's initials
    (`learning_rate` for `lr`, `wd` for `weight_decay`)."""
    for key in known:
        if (len(key) > 1 and key == _initials(word)) or (len(word) > 1 and word == _initials(key)):
            return key
    close = difflib.get_close_matches(word, known, n=1)
    return close[0] if close else None


def _did_you_mean(word: str, known: Sequence[str]) -> str:
    nearest = _nearest(word, known)
    return f" (did you mean {nearest!r}?)" if nearest else f" (known: {', '.join(known)})"


def _unknown_keys(error: jsonschema.ValidationError) -> str | None:
    """`unknown key 'x' (did you mean 'y'?)` for an additionalProperties: false error, else None."""
    if error.validator != "additionalProperties" or error.validator_value is not False:
        return None
    known = list(error.schema.get("properties", {}))
    patterns = list(error.schema.get("patternProperties", {}))
    unknown = [
        str(key)
        for key in error.instance
        if key not in known and not any(re.search(p, str(key)) for p in patterns)
    ]
    return "; ".join(f"unknown key {key!r}{_did_you_mean(key, known)}" for key in unknown)


def _describe(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.path)
    unknown = _unknown_keys(error)
    if unknown:
        return f"{where}: {unknown}" if where else unknown
    return f"{where or '<top level>'}: {error.message}"


def _check_wavelets(params: Mapping[str, Any], source: str) -> None:
    """The DWT's wavelet (and its variants') must be one PyWavelets knows: fail here, in one
    line, rather than with a traceback when the first image is fused."""
    sections = {"methods.dwt": params.get("methods", {}).get("dwt", {})}
    for variant, override in params.get("variants", {}).get("dwt", {}).items():
        sections[f"variants.dwt.{variant}"] = override
    named = {where: s["wavelet"] for where, s in sections.items() if "wavelet" in s}
    if not named:
        return
    import pywt  # only when a wavelet is named: keeps loading params.yaml light

    known = pywt.wavelist(kind="discrete")
    for where, name in named.items():
        if name not in known:
            nearest = _nearest(str(name), known)
            hint = f" (did you mean {nearest!r}?)" if nearest else ""
            raise ConfigError(
                f"{source}: {where}.wavelet: unknown wavelet {name!r}{hint}; "
                'known: pywt.wavelist(kind="discrete")'
            )


def validate(params: Mapping[str, Any], source: str = "params") -> None:
    """Check `params` against the schema; raise one line naming the first wrong key."""
    errors = sorted(_validator().iter_errors(params), key=lambda e: [str(p) for p in e.path])
    if errors:
        raise ConfigError(f"{source}: {_describe(errors[0])}")
    _check_wavelets(params, source)


def config_from_mapping(
    cls: type[ConfigT], where: str, settings: Mapping[str, Any] | None
) -> ConfigT:
    """Build settings dataclass `cls` from the params section at `where`. The dataclasses hold
    no defaults (params.yaml is the one place for them): a key missing here is an error, as is
    an unknown one, each named."""
    settings = dict(settings or {})
    known = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    unknown = [key for key in settings if key not in known]
    if unknown:
        raise ConfigError(
            f"{where}: "
            + "; ".join(f"unknown key {key!r}{_did_you_mean(key, known)}" for key in unknown)
        )
    missing = [key for key in known if key not in settings]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)} (set them in params.yaml)")
    try:
        return cls(**settings)
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def setting(section: Mapping[str, Any], key: str, where: str) -> Any:
    """`section[key]`, or one line naming the missing key (no default outside params.yaml)."""
    if key not in section:
        raise ConfigError(f"{where}: missing key {key!r} (set it in params.yaml)")
    return section[key]


def overlays_from_env() -> list[Path]:
    raw = os.environ.get(OVERLAY_ENV, "")
    return [Path(p) for p in raw.split(os.pathsep) if p]


def profile_overlay(profile: str, project: Path = Path(".")) -> Path:
    """The overlay of a named profile: the project's workflow/profiles/<name>/params.yaml, else
    the package's own (a project with no workflow/ folder, e.g. beside an installed wheel)."""
    roots = (project, PACKAGED_PROJECT)
    for root in roots:
        path = root / PROFILES_DIR / profile / "params.yaml"
        if path.is_file():
            return path
    known = sorted({p.parent.name for r in roots for p in (r / PROFILES_DIR).glob("*/params.yaml")})
    missing = project / PROFILES_DIR / profile / "params.yaml"
    raise ConfigError(f"unknown profile {profile!r} ({missing} not found); known: {known}")


def params_file(path: str | Path | None, packaged_fallback: bool = False) -> Path:
    """`path`, else ./params.yaml; with `packaged_fallback`, the package's defaults when there
    is no ./params.yaml (for commands that need no project, e.g. fusing two given images)."""
    if path is not None:
        return Path(path)
    if packaged_fallback and not DEFAULT_PARAMS.is_file():
        return PACKAGED_PARAMS
    return DEFAULT_PARAMS


# The settings that name files or folders: relative ones are relative to the project root, the
# folder of the params file (Snakemake and DVC run there; a command run elsewhere with
# --params gets them resolved, so it reads the project's data, not the current folder's).
PATH_KEYS = (
    ("data", "raw_dir"),
    ("data", "prepare", "raw_root"),
    ("data", "prepare", "out_dir"),
    ("tracking", "artifact_root"),
)
SQLITE_PREFIX = "sqlite:///"


def _is_local_relative(value: str) -> bool:
    return "://" not in value and not Path(value).is_absolute()


def resolve_paths(params: dict[str, Any], root: Path) -> dict[str, Any]:
    """`params` with every relative path setting made absolute against `root`."""
    resolved = copy.deepcopy(params)
    for keys in PATH_KEYS:
        node = resolved
        for key in keys[:-1]:
            node = node[key]
        if _is_local_relative(str(node[keys[-1]])):
            node[keys[-1]] = str(root / node[keys[-1]])
    for dataset in resolved["data"]["datasets"].values():
        for key in ("manifest", "base_url"):
            if _is_local_relative(str(dataset[key])):
                dataset[key] = str(root / dataset[key])
    uri = str(resolved["tracking"]["uri"])
    if uri.startswith(SQLITE_PREFIX) and _is_local_relative(uri[len(SQLITE_PREFIX) :]):
        resolved["tracking"]["uri"] = SQLITE_PREFIX + str(root / uri[len(SQLITE_PREFIX) :])
    return resolved


def parameter_files(path: Path, overlays: Sequence[str | Path], profile: str) -> list[Path]:
    """What load_params merges over `path`, in order: the profile's overlay, `overlays`, then
    $MEDFUSE_PARAMS_OVERLAY's."""
    return [profile_overlay(profile, path.parent), *map(Path, overlays), *overlays_from_env()]


def load_params(
    path: str | Path = DEFAULT_PARAMS,
    overlays: Sequence[str | Path] | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    """Load `path`, then merge in order: the profile's overlay, `overlays`, $MEDFUSE_PARAMS_OVERLAY.

    The profile is `profile`, else $MEDFUSE_PROFILE, else params.yaml's `profile` key; the
    merged result records the profile actually used. The project root, where the profiles'
    overlays are looked up first, is the folder of `path`.
    """
    path = Path(path)
    params = _read_yaml(path)
    profile = profile or os.environ.get(PROFILE_ENV) or params.get("profile", "paper")
    params["profile"] = profile
    overlay_paths = parameter_files(path, overlays or [], profile)
    for overlay in overlay_paths:
        params = deep_merge(params, _read_yaml(overlay))
    names = " + ".join(str(p) for p in [path, *overlay_paths])
    validate(params, names)
    root = path.resolve().parent
    # Run from elsewhere: the project's files, not the current folder's. The package's own
    # defaults (no project at all) keep paths relative to the current folder.
    packaged = path.absolute() == PACKAGED_PARAMS.absolute()
    if root != Path.cwd().resolve() and not packaged:
        params = resolve_paths(params, root)
    return params


def canonical_method(name: str) -> str:
    """`published:asfe-fusion` (the user-facing spelling) is `published-asfe-fusion` in files."""
    return name.replace(":", "-")


# A variant trained with another seed than `seed`: <variant>_seed<N> (experiments.extra_seeds).
SEEDED_VARIANT = re.compile(r"^(?P<variant>[A-Za-z0-9_]+?)_seed(?P<seed>[0-9]+)$")


def seeded_variant(variant: str, seed: int) -> str:
    """The variant name (and results folder) of `variant` trained with `seed`."""
    return f"{variant}_seed{seed}"


def split_seed(variant: str) -> tuple[str, int | None]:
    """`full_seed7` -> ("full", 7); a plain variant -> (variant, None)."""
    match = SEEDED_VARIANT.match(variant)
    return (match["variant"], int(match["seed"])) if match else (variant, None)


def job_params(params: Mapping[str, Any], variant: str) -> dict[str, Any]:
    """The params a job of `variant` runs with: a seeded variant sets its own training seed."""
    seed = split_seed(variant)[1]
    return dict(params) if seed is None else {**params, "seed": seed}


def method_config(params: Mapping[str, Any], method: str, variant: str = "full") -> dict[str, Any]:
    """A method's settings with a variant's overrides merged in (ablations are configuration;
    a seeded variant has the settings of the variant it repeats)."""
    method = canonical_method(method)
    variant = split_seed(variant)[0]
    methods = params["methods"]
    if method not in methods:
        raise ConfigError(f"unknown method {method!r}; known: {', '.join(sorted(methods))}")
    variants = params.get("variants", {}).get(method, {"full": {}})
    if variant not in variants and variant != "full":
        raise ConfigError(
            f"unknown variant {variant!r} of {method!r}; known: {', '.join(sorted(variants))}"
        )
    return deep_merge(methods[method], variants.get(variant, {}))

"""The pinned environment: requirements/lock.txt pins every dependency exactly, environment.yml
and CI install from it, and torch is the one version the results were measured with."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock.txt"
CUDA_LOCK = REPO / "requirements" / "lock-cuda.txt"
TORCH = "2.13.0"
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)$")


def _pins(path: Path) -> dict[str, str]:
    """name -> version of a lock file; every requirement line must be an exact pin."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = PIN.match(line.strip())
        assert match, f"{path.name}: not an exact pin: {line!r}"
        pins[canonicalize_name(match["name"])] = match["version"]
    return pins


def _declared() -> list[Requirement]:
    """pyproject.toml's dependencies and the `dev` extra (the ranges library users get)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = project["dependencies"] + project["optional-dependencies"]["dev"]
    return [Requirement(text) for text in names]


def test_lock_pins_every_declared_dependency_within_its_range():
    pins = _pins(LOCK)
    for requirement in _declared():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"lock.txt does not pin {requirement.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"lock.txt pins {name}=={pins[name]}, outside pyproject.toml's {requirement}"
        )


def test_torch_is_the_measured_version_everywhere():
    assert _pins(LOCK)["torch"] == TORCH
    assert _pins(CUDA_LOCK)["torch"] == TORCH
    declared = {canonicalize_name(r.name): r for r in _declared()}
    assert str(declared["torch"].specifier) == f"=={TORCH}"


def test_cuda_lock_agrees_with_the_lock_and_adds_only_torch_cuda_runtime():
    pins, cuda = _pins(LOCK), _pins(CUDA_LOCK)
    for name in pins.keys() & cuda.keys():
        assert pins[name] == cuda[name], f"{name}: {pins[name]} in lock.txt, {cuda[name]} in cuda"
    runtime = {
        canonicalize_name(line.strip())
        for line in (REPO / "requirements" / "cuda-runtime.in").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert runtime <= cuda.keys()  # pinned for PyPI's CUDA wheel ...
    assert not runtime & pins.keys()  # ... and never installed with the CPU wheel
    assert all(n.startswith(("nvidia-", "cuda-", "triton")) for n in cuda.keys() - pins.keys())


def test_lock_has_no_hashes_nor_local_versions():
    """torch's CPU wheel and PyPI's CUDA wheel are different files of 2.13.0: a hash or a
    `+cpu` pin would refuse one of them."""
    for path in (LOCK, CUDA_LOCK):
        text = path.read_text(encoding="utf-8")
        assert "--hash" not in text
        assert not [v for v in _pins(path).values() if Version(v).local], path.name


def test_environment_yml_installs_the_same_pins():
    env = yaml.safe_load((REPO / "environment.yml").read_text(encoding="utf-8"))
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "python=3.11" in conda
    assert "-r requirements/lock.txt" in pip and "-c requirements/lock-cuda.txt" in pip
    # Nothing else in the pip section may name a version of its own.
    assert [line for line in pip if not line.startswith(("-r ", "-c "))] == ["-e ."]


def test_ci_installs_from_the_lock():
    command = _ci_test_command()
    assert "pip install -q -r requirements/lock.txt -c requirements/lock-cuda.txt" in command
    assert "pip install -q --no-deps -e ." in command


def test_readme_test_command_is_the_ci_command():
    """.ci/run runs exactly the README's test command (its comment says so)."""
    assert f"\n{_ci_test_command()}\n" in (REPO / "README.md").read_text(encoding="utf-8")


def _ci_test_command() -> str:
    lines = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    return next(line for line in lines if line.startswith("python3 -m venv"))

"""Throw-away copies of the repository for the workflow tests, as a fresh clone would be."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# Every dataset of params.yaml and its folder in the read-only mirror.
MIRRORS = {
    "aanlib": SHARED / "aanlib",
    "published-asfe-fusion": SHARED / "published-fusions" / "ASFE-Fusion",
    "published-adafuse": SHARED / "published-fusions" / "AdaFuse",
}


def copy_repo(src: Path, dst: Path) -> Path:
    """Tracked and untracked-but-not-ignored files only, committed in a new git repository."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=src,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, listed):
        if (src / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"],
    ):
        subprocess.run(cmd, cwd=dst, check=True)
    return dst


def mirror_env(repo: Path) -> dict[str, str]:
    """The environment of a run that downloads every dataset from the local mirrors."""
    overlay = repo / "mirror.yaml"
    datasets = {name: {"base_url": str(path)} for name, path in MIRRORS.items()}
    overlay.write_text(yaml.safe_dump({"data": {"datasets": datasets}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MEDFUSE_"))}
    env["MEDFUSE_PARAMS_OVERLAY"] = str(overlay)
    return env


def set_param(repo: Path, keys: list[str], value: object) -> None:
    """Edit one key of the copy's params.yaml (DVC expands its stages from that file alone)."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    node = params
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))

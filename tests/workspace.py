"""Throw-away copies of the repository for the workflow tests, as a fresh clone would be, and
the data source they download from: the read-only mirrors in ../shared when present, else
phantom mirrors (tests/phantoms.py) served over HTTP on 127.0.0.1."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.phantoms import write_phantom_mirrors

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# Every dataset of params.yaml and its folder in the read-only mirror.
MIRRORS = {
    "aanlib": SHARED / "aanlib",
    "published-asfe-fusion": SHARED / "published-fusions" / "ASFE-Fusion",
    "published-adafuse": SHARED / "published-fusions" / "AdaFuse",
    "pretrained-mmif-amin": SHARED / "published-models" / "MMIF-AMIN",
}
# Set to 1 to run the workflow tests on the phantom mirrors even where ../shared exists.
NO_MIRROR_ENV = "MEDFUSE_TEST_NO_MIRROR"


@dataclass(frozen=True)
class DataSource:
    """Where a test run downloads each dataset from.

    `folders`: dataset -> a local folder in the mirror's layout; `base_urls`: dataset -> the
    base URL the run uses; `manifests`: dataset -> a manifest that replaces the repository's
    pinned one (phantoms have other files; empty for the real mirrors)."""

    folders: dict[str, Path]
    base_urls: dict[str, str]
    manifests: dict[str, Path] = field(default_factory=dict)


def real_mirrors_available() -> bool:
    return os.environ.get(NO_MIRROR_ENV) != "1" and all(p.is_dir() for p in MIRRORS.values())


def real_mirrors() -> DataSource:
    return DataSource(dict(MIRRORS), {name: str(path) for name, path in MIRRORS.items()})


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """An HTTP server for `directory` on 127.0.0.1 (any free port) while the block runs."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def phantom_mirrors(root: Path, params: Mapping[str, Any]) -> Iterator[DataSource]:
    """Phantom mirrors of every dataset written under `root` and served over HTTP, so that the
    download's HTTP code path runs as it would against the public base URLs."""
    manifests = write_phantom_mirrors(root, params)
    with serve_directory(root) as url:
        yield DataSource(
            folders={name: root / name for name in manifests},
            base_urls={name: f"{url}/{name}" for name in manifests},
            manifests=manifests,
        )


@contextlib.contextmanager
def open_data_source(root: Path, params: Mapping[str, Any]) -> Iterator[DataSource]:
    """The real mirrors when available (and not refused by $MEDFUSE_TEST_NO_MIRROR), else
    phantom mirrors written under `root`."""
    if real_mirrors_available():
        yield real_mirrors()
        return
    with phantom_mirrors(root, params) as source:
        yield source


def _listed_files(src: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored paths of the repository `src`."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=src,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    return [rel for rel in listed if rel]


def copy_tree(src: Path, dst: Path) -> Path:
    """The repository's files as a fresh clone has them (symbolic links stay links)."""
    for rel in _listed_files(src):
        source, target = src / rel, dst / rel
        if source.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dst


def copy_repo(src: Path, dst: Path) -> Path:
    """Tracked and untracked-but-not-ignored files only, committed in a new git repository."""
    copy_tree(src, dst)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"],
    ):
        subprocess.run(cmd, cwd=dst, check=True)
    return dst


def mirror_env(repo: Path, source: DataSource) -> dict[str, str]:
    """The environment of a run in the copy `repo` that downloads every dataset from `source`.

    A phantom source's manifests replace the copy's pinned ones, in place: Snakemake, DVC (which
    reads params.yaml alone) and `medfuse download` all read the manifest from there."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for name, manifest in source.manifests.items():
        shutil.copyfile(manifest, repo / params["data"]["datasets"][name]["manifest"])
    overlay = repo / "mirror.yaml"
    datasets = {name: {"base_url": url} for name, url in source.base_urls.items()}
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


@dataclass
class BackgroundRun:
    """A command started in a repository copy, its output going to a log file."""

    repo: Path
    env: dict[str, str]
    log: Path
    process: subprocess.Popen

    @classmethod
    def start(cls, cmd: list[str], repo: Path, env: dict[str, str]) -> BackgroundRun:
        log = repo.parent / f"{repo.name}-{cmd[0]}.log"
        with log.open("w") as sink:
            process = subprocess.Popen(
                cmd, cwd=repo, env=env, stdout=sink, stderr=subprocess.STDOUT
            )
        return cls(repo, env, log, process)

    def wait(self) -> str:
        code = self.process.wait()
        out = self.log.read_text()
        assert code == 0, f"{self.process.args} failed:\n{out[-5000:]}"
        return out

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

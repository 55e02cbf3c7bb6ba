"""DVC remotes, as a lab shares data, weights and results: a local directory, an SSH server
(Debian openssh-server on 127.0.0.1, dvc-ssh) and an S3 server (SeaweedFS, dvc-s3), the last two
started by the test (tests/services.py).

One copy of the repository runs the quick profile's W-DUALMINE chain on CT-MRI with `dvc repro`
(downloads, prepare, tracking stamp, training, fusion, evaluation) and pushes it to each remote;
a fresh `git clone` of that copy, with its credentials set outside git (`--local` config or the
environment), pulls it back byte for byte, after which `dvc repro` there runs nothing. That needs
every output in the DVC cache: a `cache: false` output is in neither git (results/ is ignored)
nor the remote, so a clone would lack it and rerun its stage and everything after it.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.services import S3Server, SshServer, run_tool, start_seaweedfs, start_sshd, tool_env
from tests.workspace import DataSource, copy_repo, mirror_env, set_param

pytestmark = pytest.mark.services

# The last stage of one chain that holds data (raw + prepared), weights and results.
TARGET = "evaluate@wdualmine-CT-MRI-full-paper"
COMMIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam"]


@pytest.fixture(scope="module")
def pipeline(
    tmp_path_factory: pytest.TempPathFactory, repo_root: Path, data_source: DataSource
) -> tuple[Path, dict[str, str]]:
    """A copy where `dvc repro TARGET` ran at the quick profile, its dvc.lock committed."""
    repo = copy_repo(repo_root, tmp_path_factory.mktemp("dvc-origin") / "repo")
    env = tool_env(mirror_env(repo, data_source))
    set_param(repo, ["profile"], "quick")
    run_tool(["dvc", "repro", TARGET], repo, env)
    run_tool([*COMMIT, "quick run"], repo, env)
    return repo, env


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    with start_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with start_seaweedfs(tmp_path_factory.mktemp("s3")) as server:
        yield server


def _tracked_files(repo: Path) -> list[Path]:
    """Every file of every output that dvc.lock records (the stages that ran)."""
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"].values()
    outs = [repo / out["path"] for stage in stages for out in stage.get("outs", [])]
    files = [f for out in outs for f in ([out] if out.is_file() else out.rglob("*"))]
    return sorted(f for f in files if f.is_file())


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _digests(repo: Path) -> dict[str, str | None]:
    """sha256 by relative path of every tracked output file (from the pusher's dvc.lock)."""
    return {str(path.relative_to(repo)): _sha256(path) for path in _tracked_files(repo)}


@dataclass
class Remote:
    """A DVC remote as a lab sets it up: `settings` in .dvc/config (committed), `secrets` in the
    pusher's .dvc/config.local and `clone_secrets` in the puller's (never in git);
    `clone_env` the puller's environment (e.g. credentials there instead)."""

    name: str
    url: str
    settings: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    clone_secrets: dict[str, str] = field(default_factory=dict)
    clone_env: dict[str, str] = field(default_factory=dict)


def _configure(repo: Path, env: dict[str, str], name: str, values: dict, local: bool) -> None:
    scope = ["--local"] if local else []
    for key, value in values.items():
        run_tool(["dvc", "remote", "modify", *scope, name, key, value], repo, env)


def _push(repo: Path, env: dict[str, str], remote: Remote) -> None:
    run_tool(["dvc", "remote", "add", remote.name, remote.url], repo, env)
    _configure(repo, env, remote.name, remote.settings, local=False)
    _configure(repo, env, remote.name, remote.secrets, local=True)
    run_tool([*COMMIT, f"remote {remote.name}"], repo, env)
    config = (repo / ".dvc" / "config").read_text()
    assert remote.name in config
    assert all(value not in config for value in remote.secrets.values()), "a secret is in git"
    run_tool(["dvc", "push", "-r", remote.name, "--with-deps", TARGET], repo, env)


def _clone_and_pull(repo: Path, clone: Path, env: dict[str, str], remote: Remote) -> None:
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    assert not (clone / ".dvc" / "config.local").exists()
    _configure(clone, env, remote.name, remote.clone_secrets, local=True)
    run_tool(["dvc", "pull", "-r", remote.name, "--with-deps", TARGET], clone, env)


def _round_trip(pipeline: tuple[Path, dict[str, str]], clone: Path, remote: Remote) -> None:
    """Push from the pipeline's copy, pull into a fresh clone: the same bytes, nothing to run."""
    repo, env = pipeline
    _push(repo, env, remote)
    clone_env = {**env, **remote.clone_env}
    _clone_and_pull(repo, clone, clone_env, remote)
    pushed = _digests(repo)
    pulled = {path: _sha256(clone / path) for path in pushed}
    assert pulled == pushed, [path for path in pushed if pulled[path] != pushed[path]][:10]
    assert any(path.endswith("model.pt") for path in pulled) and len(pulled) > 100
    out, _ = run_tool(["dvc", "repro", TARGET], clone, clone_env)
    assert "Running stage" not in out, out[-3000:]
    assert "Data and pipelines are up to date" in out, out[-3000:]


def test_local_directory_remote(pipeline, tmp_path: Path):
    _round_trip(pipeline, tmp_path / "clone", Remote("lab-dir", str(tmp_path / "lab-store")))


def test_ssh_remote(pipeline, tmp_path: Path, sshd: SshServer):
    pytest.importorskip("dvc_ssh", reason="pip install dvc-ssh")
    url = f"ssh://{sshd.user}@{sshd.host}:{sshd.port}{tmp_path / 'ssh-store'}"
    key = {"keyfile": str(sshd.key)}  # each user's own key, in their own --local config
    remote = Remote("lab-ssh", url, secrets=key, clone_secrets=key)
    _round_trip(pipeline, tmp_path / "clone", remote)


def test_s3_remote(pipeline, tmp_path: Path, s3: S3Server):
    pytest.importorskip("dvc_s3", reason="pip install dvc-s3")
    secrets = {"access_key_id": s3.access_key, "secret_access_key": s3.secret_key}
    remote = Remote(
        "lab-s3",
        f"s3://{s3.bucket}/medfuse",
        settings={"endpointurl": s3.endpoint},
        secrets=secrets,  # the pusher: --local config; the puller: the environment
        clone_env={"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key},
    )
    _round_trip(pipeline, tmp_path / "clone", remote)

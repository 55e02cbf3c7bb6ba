"""The Snakemake DAG and the DVC DAG run the same steps with the same inputs and outputs.

Snakemake names files (data/prepared/manifest.csv, .../model.pt) where DVC tracks their folders,
so a Snakemake path matches a DVC path when it is that path or lies inside it. Code and profile
files are DVC-only dependencies (Snakemake tracks parameters and commands instead).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.workspace import copy_repo, set_param

BLOCK = re.compile(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", re.M)


def snakemake_jobs(repo: Path, profile: str) -> list[tuple[str, set[str], set[str]]]:
    result = subprocess.run(
        ["snakemake", "all", "-n", "--forceall", "--config", f"profile={profile}"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    jobs = []
    for rule, body in BLOCK.findall(result.stdout + "\n"):
        fields = dict(re.findall(r"^    (\w+): (.*)$", body, re.M))
        if rule != "all":
            jobs.append((rule, _paths(fields, "input"), _paths(fields, "output")))
    return jobs


def _paths(fields: dict[str, str], key: str) -> set[str]:
    return {p for p in fields.get(key, "").split(", ") if p}


def dvc_stages(repo: Path) -> list[tuple[str, set[str], set[str]]]:
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        stages = []
        for stage in dvc_repo.index.stages:
            files = [d for d in stage.deps if not isinstance(d, ParamsDependency)]
            deps = {d.def_path for d in files if not _is_code(d.def_path)}
            outs = {o.def_path for o in stage.outs}
            stages.append((stage.addressing, deps, outs))
    return stages


def _is_code(path: str) -> bool:
    return path.startswith(("src/", "workflow/profiles/"))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _covered(snake: set[str], dvc: set[str]) -> bool:
    """Every Snakemake path lies in a DVC path and every DVC path holds a Snakemake path."""
    snake = {p for p in snake if not _is_code(p)}
    return all(any(_inside(s, d) for d in dvc) for s in snake) and all(
        any(_inside(s, d) for s in snake) for d in dvc
    )


@pytest.fixture(scope="module")
def peers_retrained_repo(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the repository with the opt-in switch on: the peers retrained here too."""
    repo = copy_repo(repo_root, tmp_path_factory.mktemp("retrained-peers"))
    set_param(repo, ["experiments", "retrained_peers"], ["asfe-fusion", "adafuse"])
    return repo


def _repo(form: str, repo_root: Path, request: pytest.FixtureRequest) -> Path:
    return (
        repo_root if form == "paper protocol" else request.getfixturevalue("peers_retrained_repo")
    )


@pytest.mark.parametrize("form", ["paper protocol", "peers retrained"])
@pytest.mark.parametrize("profile", ["paper", "quick"])
def test_snakemake_and_dvc_run_the_same_steps(
    repo_root: Path, profile: str, form: str, request: pytest.FixtureRequest
):
    repo = _repo(form, repo_root, request)
    snake = snakemake_jobs(repo, profile)
    dvc = dvc_stages(repo)
    assert len(snake) == len(dvc), (len(snake), len(dvc))
    unmatched = []
    for name, deps, outs in dvc:
        matches = [j for j in snake if _covered(j[2], outs)]
        if len(matches) != 1 or not _covered(matches[0][1], deps):
            unmatched.append((name, sorted(deps), sorted(outs), matches))
    assert not unmatched, unmatched[:3]


def _trained_methods(repo: Path) -> set[str]:
    jobs = snakemake_jobs(repo, "paper")
    return {next(iter(outs)).split("/")[2] for rule, _, outs in jobs if rule == "train"}


def test_the_paper_protocol_trains_only_w_dualmine_and_scores_the_published_peers(
    repo_root: Path,
):
    """The default `all` is what the paper ran: no 2000-epoch peer training is planned."""
    assert _trained_methods(repo_root) == {"wdualmine"}
    fused = {
        next(iter(outs)).split("/")[2]
        for rule, _, outs in snakemake_jobs(repo_root, "paper")
        if rule == "fuse"
    }
    assert {"published-asfe-fusion", "published-adafuse"} <= fused
    assert not fused & {"asfe-fusion", "adafuse"}


def test_retraining_the_peers_is_one_switch(peers_retrained_repo: Path):
    assert _trained_methods(peers_retrained_repo) == {"wdualmine", "asfe-fusion", "adafuse"}

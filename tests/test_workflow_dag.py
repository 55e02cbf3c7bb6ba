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


# The forms of the job list a user can switch to in params.yaml, beside the paper protocol.
FORMS = {
    "paper protocol": {},
    "peers retrained": {("experiments", "retrained_peers"): ["asfe-fusion", "adafuse"]},
    "two extra seeds": {("experiments", "extra_seeds"): [1, 2]},
}


@pytest.fixture(scope="module")
def form_repos(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The repository itself for the paper protocol, an edited copy for each other form."""
    repos = {}
    for form, edits in FORMS.items():
        if not edits:
            repos[form] = repo_root
            continue
        repos[form] = copy_repo(repo_root, tmp_path_factory.mktemp(form.replace(" ", "-")))
        for keys, value in edits.items():
            set_param(repos[form], list(keys), value)
    return repos


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("profile", ["paper", "quick"])
def test_snakemake_and_dvc_run_the_same_steps(form_repos: dict[str, Path], profile: str, form: str):
    repo = form_repos[form]
    snake = snakemake_jobs(repo, profile)
    dvc = dvc_stages(repo)
    assert len(snake) == len(dvc), (len(snake), len(dvc))
    unmatched = []
    for name, deps, outs in dvc:
        matches = [j for j in snake if _covered(j[2], outs)]
        if len(matches) != 1 or not _covered(matches[0][1], deps):
            unmatched.append((name, sorted(deps), sorted(outs), matches))
    assert not unmatched, unmatched[:3]


def _trained(repo: Path) -> set[tuple[str, str, str]]:
    """(method, pair, variant) of every planned training."""
    jobs = snakemake_jobs(repo, "paper")
    return {tuple(next(iter(outs)).split("/")[2:5]) for rule, _, outs in jobs if rule == "train"}


def _trained_methods(repo: Path) -> set[str]:
    return {method for method, _, _ in _trained(repo)}


def test_the_paper_protocol_retrains_no_peer_and_scores_the_published_peers(
    repo_root: Path,
):
    """The default `all` is what the paper ran (no 2000-epoch peer training is planned), plus
    the two other methods of the project's sources."""
    assert _trained_methods(repo_root) == {"wdualmine", "mmif-amin", "dm-fnet"}
    fused = {
        next(iter(outs)).split("/")[2]
        for rule, _, outs in snakemake_jobs(repo_root, "paper")
        if rule == "fuse"
    }
    assert {"published-asfe-fusion", "published-adafuse"} <= fused
    assert not fused & {"asfe-fusion", "adafuse"}


def test_retraining_the_peers_is_one_switch(form_repos: dict[str, Path]):
    trained = _trained_methods(form_repos["peers retrained"])
    assert trained == {"wdualmine", "mmif-amin", "dm-fnet", "asfe-fusion", "adafuse"}


def test_extra_seeds_expand_the_full_model_on_the_seed_pairs(form_repos: dict[str, Path]):
    added = _trained(form_repos["two extra seeds"]) - _trained(form_repos["paper protocol"])
    assert added == {
        (method, "CT-MRI", f"full_seed{seed}") for method in ("wdualmine",) for seed in (1, 2)
    }

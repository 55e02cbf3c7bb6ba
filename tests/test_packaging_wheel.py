"""A non-editable install works: the wheel built from a fresh copy of the repository, installed
on its own outside the repository, carries its package data (params defaults, the params schema,
the profiles' overlays, the paper's values) and runs the pipeline's commands from an empty
folder: fusing two images with no params.yaml at all, then download, prepare, fuse, evaluate and
report on a tiny phantom set with the packaged `quick` profile."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from medfuse.io import write_image
from medfuse.plan import Job
from tests.phantoms import phantom_pair, write_phantom_mirrors
from tests.workspace import copy_tree

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DATA = [
    "medfuse/report/paper_values.yaml",
    "medfuse/default_project/params.yaml",
    "medfuse/default_project/workflow/schemas/params.schema.yaml",
    *(f"medfuse/default_project/workflow/profiles/{p}/params.yaml" for p in ("paper", "quick")),
]
METHOD = "average"
PAIR = "CT-MRI"
# Only what a tiny set needs (each command costs seconds): one classical method on one pair.
TINY_EXPERIMENTS = {
    "pairs": [PAIR],
    "learned": [],
    "unified": [],
    "pretrained": [],
    "published": [],
    "classical": [METHOD],
    "ablation_pair": PAIR,
    "ablations": [],
}


def _check(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(the `medfuse` console script, its environment) of the wheel installed into a folder of
    its own; the project's venv provides the dependencies, not the package."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = copy_tree(REPO, tmp / "source")  # a build writes build/ and *.egg-info: not here
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # No build isolation: it would download setuptools; the venv's one builds the wheel.
    build = ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", "dist", str(source)]
    _check([*pip, *build], tmp)
    (wheel,) = (tmp / "dist").glob("medfuse-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not [f for f in PACKAGE_DATA if f not in names], sorted(names)
    site = tmp / "site"
    _check([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], tmp)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MEDFUSE_"))}
    env["PYTHONPATH"] = str(site)  # ahead of the editable install's path to src/
    where = _check([sys.executable, "-c", "import medfuse; print(medfuse.__file__)"], tmp, env)
    assert Path(where.strip()).is_relative_to(site), where
    return site / "bin" / "medfuse", env


def test_wheel_fuses_two_images_with_no_params_file(installed, tmp_path):
    medfuse, env = installed
    a, b = phantom_pair(PAIR, seed=(0,), size=64)
    write_image(tmp_path / "a.png", a)
    write_image(tmp_path / "b.png", b)
    _check(
        [str(medfuse), "fuse", "--method", "dwt", "a.png", "b.png", "-o", "f.png"], tmp_path, env
    )
    assert (tmp_path / "f.png").stat().st_size > 100


def test_wheel_runs_the_pipeline_on_a_tiny_set(installed, tmp_path, params):
    medfuse, env = installed
    mirror = tmp_path / "mirror"
    manifest = write_phantom_mirrors(mirror, params)["aanlib"]
    project = tmp_path / "project"  # a user's folder: params.yaml and nothing else
    tiny = yaml.safe_load((REPO / "params.yaml").read_text())
    tiny["data"]["datasets"]["aanlib"] = {
        "manifest": str(manifest),
        "base_url": str(mirror / "aanlib"),
    }
    tiny["data"]["prepare"]["pairs"] = [PAIR]
    tiny["experiments"] |= TINY_EXPERIMENTS
    tiny["evaluate"]["conventions"] = ["paper"]
    tiny["profile"] = "quick"  # no workflow/ here: the packaged profile
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False))

    def run(*args: str) -> str:
        return _check([str(medfuse), *args], project, env)

    run("download", "--dataset", "aanlib")
    run("prepare")
    run("fuse", "--method", METHOD, "--pair", PAIR)
    run("evaluate", "--pair", PAIR, "--fused", str(Job(METHOD, PAIR).fused_dir))
    run("report")
    report = (project / "results" / "report.md").read_text()
    assert "Profile `quick`" in report and f"| {METHOD} |" in report
    assert (project / "results" / "tables" / "table1.md").is_file()


def test_a_projects_own_profile_wins_over_the_packaged_one(tmp_path):
    """Profiles are project files: <project>/workflow/profiles/<name>/params.yaml first (the
    project is the folder of the params file), else the package's."""
    from medfuse.config import load_params

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    assert load_params(tmp_path / "params.yaml", profile="quick")["train"]["image_size"] == 64
    own = tmp_path / "workflow" / "profiles" / "quick" / "params.yaml"
    own.parent.mkdir(parents=True)
    own.write_text("train: {image_size: 32}\n")
    assert load_params(tmp_path / "params.yaml", profile="quick")["train"]["image_size"] == 32

"""The data source is not a result: files are pinned by sha256 in the manifest, so changing where
they come from (base_url, a mirror) or how (data.download) must rerun nothing, in either tool;
changing the manifest must rerun the download.

Each tool downloads the small published-asfe-fusion dataset (72 files; a few phantom images where
../shared is absent) from the local mirror in its own throw-away copy of the repository, then
plans again with another source and settings.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from medfuse.config import deep_merge
from medfuse.data.download import dataset_dir, download_dataset, read_manifest
from medfuse.data.prepare import prepare_from_params
from medfuse.data.prepared import PreparedData
from tests.phantoms import published_datasets, write_phantom_mirrors
from tests.workspace import DataSource, copy_repo, mirror_env, phantom_mirrors, set_param

DATASET = "published-asfe-fusion"
TARGET = f"data/raw/{DATASET}"
STAGE = f"download@{DATASET}"
MANIFEST = f"data/manifests/{DATASET}.tsv"
# Every data.download setting differs from params.yaml's.
OTHER_DOWNLOAD = {"workers": 1, "retries": 0, "backoff_s": 2.5, "timeout_s": 3}
ALL_TRIGGERS = ["--rerun-triggers", "code", "input", "mtime", "params", "software-env"]


def _run(cmd: list[str], repo: Path, env: dict[str, str]) -> str:
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=False)
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-4000:]}"
    return out


def _switch_source(repo: Path, env: dict[str, str], mirror: Path) -> dict[str, str]:
    """Another base_url (a file:// URL of the same mirror) and other download settings, both in
    a new overlay (what every `medfuse` command reads) and in params.yaml (what DVC reads)."""
    other = {"data": {"datasets": {DATASET: {"base_url": mirror.as_uri()}}}}
    other["data"]["download"] = OTHER_DOWNLOAD
    overlay = repo / "other-source.yaml"
    overlay.write_text(yaml.safe_dump(other))
    set_param(repo, ["data", "datasets", DATASET, "base_url"], mirror.as_uri())
    set_param(repo, ["data", "download"], OTHER_DOWNLOAD)
    return {**env, "MEDFUSE_PARAMS_OVERLAY": str(overlay)}


def _touch_manifest(repo: Path) -> None:
    """Change the manifest's content, not its files (a comment line), so both tools see it."""
    path = repo / MANIFEST
    path.write_text("# edited\n" + path.read_text())


def _planned_jobs(dry_run: str) -> dict[str, int]:
    """Rule -> job count from a `snakemake -n` job-stats table (empty when nothing is planned)."""
    if "Nothing to be done" in dry_run:
        return {}
    rows = re.findall(r"^(\w+)\s+(\d+)$", dry_run, flags=re.MULTILINE)
    return {rule: int(count) for rule, count in rows if rule != "total"}


def _dvc_changed(repo: Path, env: dict[str, str]) -> dict:
    return json.loads(_run(["dvc", "status", "--json", STAGE], repo, env).strip() or "{}")


@pytest.fixture
def workspace(tmp_path: Path, repo_root: Path, data_source: DataSource) -> tuple[Path, dict]:
    repo = copy_repo(repo_root, tmp_path / "repo")
    return repo, {**mirror_env(repo, data_source), "DVC_NO_ANALYTICS": "1"}


def _downloaded_all(repo: Path) -> bool:
    """Every file of the copy's manifest (72 real images, or the phantoms) is in place."""
    files = list((repo / TARGET).rglob("*.png"))
    return len(files) == len(read_manifest(repo / MANIFEST)) > 0


@pytest.mark.workflow
def test_snakemake_reruns_nothing_for_another_source(workspace, data_source: DataSource):
    repo, env = workspace
    _run(["snakemake", "--cores", "1", TARGET], repo, env)
    assert _downloaded_all(repo)

    env = _switch_source(repo, env, data_source.folders[DATASET])
    dry = ["snakemake", "-n", "--cores", "1", TARGET]
    for extra in ([], ALL_TRIGGERS):
        assert _planned_jobs(_run(dry + extra, repo, env)) == {}, extra

    _touch_manifest(repo)
    assert _planned_jobs(_run(dry, repo, env)) == {"download": 1}


@pytest.mark.workflow
def test_dvc_reruns_nothing_for_another_source(workspace, data_source: DataSource):
    repo, env = workspace
    _run(["dvc", "repro", STAGE], repo, env)
    assert _downloaded_all(repo)

    env = _switch_source(repo, env, data_source.folders[DATASET])
    assert _dvc_changed(repo, env) == {}
    assert "didn't change, skipping" in _run(["dvc", "repro", STAGE], repo, env)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][STAGE]
    assert "params" not in lock, "the download stage tracks params: a source change would rerun"

    _touch_manifest(repo)
    assert list(_dvc_changed(repo, env)) == [STAGE]


def _param_keys(entry: str | dict) -> list[str]:
    """dvc.yaml params entries are keys of params.yaml or {file: [keys]}."""
    if isinstance(entry, str):
        return [entry]
    return [key for keys in entry.values() for key in (keys or [])]


def test_no_dvc_stage_tracks_the_data_source(repo_root: Path):
    """Every stage, not only download: `data`, data.datasets (base_url) and data.download are
    never params (data.prepare defines the prepared files and may be)."""
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for entry in stage.get("do", stage).get("params", []):
            for key in _param_keys(entry):
                assert key != "data" and not key.startswith(("data.datasets", "data.download")), (
                    f"dvc.yaml: stage {name} tracks {key}"
                )


def test_phantom_mirrors_download_over_http_and_prepare(tmp_path, params, monkeypatch):
    """The source of the workflow tests where ../shared is absent: over HTTP, every phantom file
    passes the download's checks and `prepare`'s validation, each published peer has every test
    pair, and the same seed writes the same files."""
    monkeypatch.chdir(tmp_path)  # params.yaml's relative data paths land here
    with phantom_mirrors(tmp_path / "mirror", params) as source:
        for name, manifest in source.manifests.items():
            spec = {"manifest": str(manifest), "base_url": source.base_urls[name]}
            one = deep_merge(params, {"data": {"datasets": {name: spec}}})
            assert download_dataset(one, name, progress=False).fetched > 0
    prepare_from_params(params)
    prepared = PreparedData(params["data"]["prepare"]["out_dir"])
    for pair in params["data"]["prepare"]["pairs"]:
        for name in prepared.rows(pair, "test")["name"]:
            for dataset in published_datasets(params):
                assert (dataset_dir(params, dataset) / pair / f"{name}.png").is_file()
    again = write_phantom_mirrors(tmp_path / "again", params)
    assert {d: m.read_bytes() for d, m in again.items()} == {
        d: m.read_bytes() for d, m in source.manifests.items()
    }

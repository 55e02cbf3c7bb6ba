"""Shared fixtures: the read-only mirrors in ../shared (or phantom ones), a prepared copy of AANLIB,
tiny pairs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from tests.workspace import BackgroundRun, DataSource

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def params() -> dict:
    from tests.settings import project_params

    return project_params()


@pytest.fixture(scope="session")
def aanlib_mirror() -> Path:
    path = SHARED / "data" / "aanlib"
    if not path.is_dir():
        pytest.skip(f"AANLIB mirror not found at {path}")
    return path


@pytest.fixture(scope="session")
def published_fusions() -> Path:
    """The authors' published fusions: <peer>/<pair>/<id>.png for ASFE-Fusion and AdaFuse."""
    path = SHARED / "data" / "published-fusions"
    if not path.is_dir():
        pytest.skip(f"published-fusions mirror not found at {path}")
    return path


@pytest.fixture(scope="session")
def published_mirror(published_fusions: Path) -> Path:
    return published_fusions / "ASFE-Fusion"


@pytest.fixture(scope="session")
def data_source(tmp_path_factory: pytest.TempPathFactory, params: dict) -> Iterator[DataSource]:
    """What the workflow tests download every dataset from: the mirrors in ../shared, or, where
    they are absent (or MEDFUSE_TEST_NO_MIRROR=1), phantom mirrors served on 127.0.0.1."""
    from tests.workspace import open_data_source

    with open_data_source(tmp_path_factory.mktemp("phantom-mirrors"), params) as source:
        yield source


@pytest.fixture(scope="session")
def dvc_run(
    tmp_path_factory: pytest.TempPathFactory, repo_root: Path, data_source: DataSource
) -> Iterator[BackgroundRun]:
    """The whole quick DAG with `dvc repro` in a fresh copy, running in the background. DVC runs
    one stage at a time, the longest serial job of the suite: it starts with the session (see
    `_start_dvc_run_early`) so it fills the core the other tests leave idle."""
    from tests.workspace import BackgroundRun, copy_repo, mirror_env, set_param

    repo = copy_repo(repo_root, tmp_path_factory.mktemp("dvc"))
    env = mirror_env(repo, data_source)
    set_param(repo, ["profile"], "quick")
    run = BackgroundRun.start(["dvc", "repro"], repo, env)
    yield run
    run.stop()


@pytest.fixture(scope="session", autouse=True)
def _start_dvc_run_early(request: pytest.FixtureRequest) -> None:
    """Start `dvc_run` before the first test when a selected test needs it (none do under
    `-m "not workflow"`)."""
    if any("dvc_run" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("dvc_run")


@pytest.fixture(scope="session")
def prepared_root(
    tmp_path_factory: pytest.TempPathFactory, params: dict, aanlib_mirror: Path
) -> Path:
    """The real AANLIB pairs, downloaded from the mirror and prepared once per test session."""
    from medfuse.data.download import download_dataset
    from medfuse.data.prepare import prepare_from_params

    base = tmp_path_factory.mktemp("aanlib")
    raw = base / "raw"
    download_dataset(params, "aanlib", source=str(aanlib_mirror), out_dir=raw, progress=False)
    out = base / "prepared"
    prepare_from_params(params, raw_root=raw / "MyDatasets", out_dir=out)
    return out


def _blob_pair(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two different smooth 'anatomies' with edges, as uint8 grey images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    a = np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.05) * 200
    a += (rng.random((size, size)) > 0.97) * 40
    b = ((xx - 0.3) ** 2 + (yy - 0.6) ** 2 < 0.08) * 150 + yy * 60
    return np.clip(a, 0, 255).astype(np.uint8), np.clip(b, 0, 255).astype(np.uint8)


@pytest.fixture
def tiny_pair() -> tuple[np.ndarray, np.ndarray]:
    """A 32 x 32 synthetic registered pair (uint8 grey)."""
    return _blob_pair(32, 0)


@pytest.fixture
def make_pair():
    """Factory: make_pair(size, seed) -> (a, b) uint8 grey images."""
    return _blob_pair


@pytest.fixture
def tiny_prepared(tmp_path: Path, make_pair) -> Path:
    """A prepared tree (via `medfuse.data.prepare`) of synthetic 32 x 32 pairs: CT-MRI (grey)
    and PET-MRI (RGB functional), 3 train and 2 test pairs each."""
    from medfuse.data.prepare import prepare
    from medfuse.io import write_image

    raw = tmp_path / "raw"
    for pair, functional in (("CT-MRI", "CT"), ("PET-MRI", "PET")):
        for split, count in (("train", 3), ("test", 2)):
            for i in range(count):
                a, b = make_pair(32, 100 * len(pair) + 10 * len(split) + i)
                if functional == "PET":  # a pseudo-colour image made from A
                    a = np.stack([a, a // 2, (255 - a) // 4], axis=-1).astype(np.uint8)
                write_image(raw / pair / split / functional / f"{i + 1}.png", a)
                write_image(raw / pair / split / "MRI" / f"{i + 1}.png", b)
    out = tmp_path / "prepared"
    prepare(raw, out, pairs=["CT-MRI", "PET-MRI"])
    return out


@pytest.fixture(scope="session")
def _mlflow_db_template(tmp_path_factory: pytest.TempPathFactory, params: dict) -> Path:
    """An MLflow SQLite store created once per session (creating one costs seconds)."""
    from medfuse.tracking import init_store

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the environment's store wins else
        tracking = {"uri": f"sqlite:///{db}", "artifact_root": str(db.parent)}
        init_store({**params, "tracking": tracking})
    return db


@pytest.fixture
def tracking(tmp_path: Path, _mlflow_db_template: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A `tracking` params section: a fresh copy of an empty store, artifacts in tmp_path."""
    import shutil

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "mlflow.db"
    shutil.copyfile(_mlflow_db_template, db)
    return {"uri": f"sqlite:///{db}", "artifact_root": str(tmp_path / "mlartifacts")}


@pytest.fixture
def one_torch_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core machine two OpenMP threads
    that spin-wait for each other made the model tests over ten times slower (measured)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

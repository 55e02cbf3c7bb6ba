"""Shared fixtures: the read-only mirrors in ../shared, a prepared copy of AANLIB, tiny pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def params() -> dict:
    from medfuse.config import load_params

    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="session")
def aanlib_mirror() -> Path:
    path = SHARED / "data" / "aanlib"
    if not path.is_dir():
        pytest.skip(f"AANLIB mirror not found at {path}")
    return path


@pytest.fixture(scope="session")
def published_mirror() -> Path:
    path = SHARED / "data" / "published-fusions" / "ASFE-Fusion"
    if not path.is_dir():
        pytest.skip(f"published-fusions mirror not found at {path}")
    return path


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

"""prepare: the dataset's split and counts, colour handling, and every kind of bad pair."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfuse.data.colour import luma_uint8, recolour
from medfuse.data.prepare import UnpairedFileWarning, prepare
from medfuse.data.prepared import PreparedData
from medfuse.errors import DataError
from medfuse.io import sha256_file

EXPECTED = {
    ("CT-MRI", "train"): 160,
    ("CT-MRI", "test"): 24,
    ("PET-MRI", "train"): 245,
    ("PET-MRI", "test"): 24,
    ("SPECT-MRI", "train"): 333,
    ("SPECT-MRI", "test"): 24,
}


def test_real_dataset_counts_and_manifest(prepared_root: Path):
    data = PreparedData(prepared_root)
    counts = data.manifest.groupby(["pair", "split"]).size().to_dict()
    assert counts == EXPECTED
    row = data.rows("PET-MRI", "test").iloc[0]
    assert sha256_file(prepared_root / row["a"]) == row["a_sha256"]
    sample = data.load(row)
    assert sample.a.shape == sample.b.shape == (256, 256)
    assert sample.a_rgb is not None and sample.a_rgb.shape == (256, 256, 3)
    np.testing.assert_array_equal(sample.a, luma_uint8(sample.a_rgb))
    assert data.load(data.rows("CT-MRI", "test").iloc[0]).a_rgb is None


def test_train_and_test_never_share_a_pair(prepared_root: Path):
    manifest = PreparedData(prepared_root).manifest
    for _, group in manifest.groupby("pair"):
        train = set(group[group.split == "train"].name)
        assert not train & set(group[group.split == "test"].name)


def test_recolour_round_trip_keeps_the_functional_image(prepared_root: Path):
    data = PreparedData(prepared_root)
    sample = data.load(data.rows("SPECT-MRI", "test").iloc[3])
    back = recolour(sample.a, sample.a_rgb).astype(int)
    # Y rounded to 8 bits, then back to RGB: within a couple of grey levels per channel.
    assert np.abs(back - sample.a_rgb.astype(int)).max() <= 3


def _tiny_tree(root: Path, pair: str = "PET-MRI", n: int = 3, size: int = 16) -> Path:
    functional, mri = pair.split("-")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for i in range(n):
            rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            grey = rng.integers(0, 256, (size, size), dtype=np.uint8)
            for mod, arr in ((functional, rgb if functional != "CT" else grey), (mri, grey)):
                path = root / pair / split / mod / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(path)
    return root


def test_unpaired_file_warns_and_is_skipped(tmp_path):
    raw = _tiny_tree(tmp_path / "raw")
    shutil.copy(raw / "PET-MRI/test/MRI/0.png", raw / "PET-MRI/test/MRI/99.png")
    shutil.copy(raw / "PET-MRI/test/MRI/0.png", raw / "PET-MRI/test/stray.png")
    with pytest.warns(UnpairedFileWarning) as caught:
        manifest = prepare(raw, tmp_path / "out", ["PET-MRI"])
    messages = " ".join(str(w.message) for w in caught)
    assert "99.png: no partner" in messages and "stray.png: stray file" in messages
    assert len(manifest[manifest.split == "test"]) == 3


def test_truncated_png_is_an_error_naming_the_file(tmp_path):
    raw = _tiny_tree(tmp_path / "raw")
    target = raw / "PET-MRI/train/PET/1.png"
    target.write_bytes(target.read_bytes()[:60])
    with pytest.raises(DataError, match=r"PET/1\.png: cannot decode"):
        prepare(raw, tmp_path / "out", ["PET-MRI"])
    assert not (tmp_path / "out").exists(), "a failed prepare must not leave an output"


def test_size_mismatch_between_partners_is_an_error(tmp_path):
    raw = _tiny_tree(tmp_path / "raw", pair="CT-MRI")
    Image.fromarray(np.zeros((20, 16), np.uint8)).save(raw / "CT-MRI/test/MRI/2.png")
    with pytest.raises(
        DataError, match=r"CT/2\.png is 16x16 but its partner .*MRI/2\.png is 16x20"
    ):
        prepare(raw, tmp_path / "out", ["CT-MRI"])


def test_wrong_mode_is_an_error(tmp_path):
    raw = _tiny_tree(tmp_path / "raw")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(raw / "PET-MRI/test/PET/0.png")
    with pytest.raises(DataError, match=r"PET/0\.png: expected an RGB image"):
        prepare(raw, tmp_path / "out", ["PET-MRI"])


def test_failed_rerun_keeps_the_previous_output(tmp_path):
    raw = _tiny_tree(tmp_path / "raw")
    out = tmp_path / "out"
    prepare(raw, out, ["PET-MRI"])
    before = (out / "manifest.csv").read_text()
    (raw / "PET-MRI/test/MRI/0.png").write_bytes(b"not a png")
    with pytest.raises(DataError):
        prepare(raw, out, ["PET-MRI"])
    assert (out / "manifest.csv").read_text() == before


def test_resize_and_limit_for_small_profiles(tmp_path):
    raw = _tiny_tree(tmp_path / "raw", n=4, size=32)
    manifest = prepare(raw, tmp_path / "out", ["PET-MRI"], image_size=16, max_pairs=2)
    assert manifest.groupby("split").size().to_dict() == {"test": 2, "train": 2}
    assert set(manifest.height) == {16}


def test_seeded_resplit_is_reproducible_and_disjoint(tmp_path):
    raw = _tiny_tree(tmp_path / "raw", n=5)
    first = prepare(raw, tmp_path / "a", ["PET-MRI"], split="seeded", test_size=3, seed=7)
    second = prepare(raw, tmp_path / "b", ["PET-MRI"], split="seeded", test_size=3, seed=7)
    assert first[["name", "split"]].equals(second[["name", "split"]])
    assert (first.split == "test").sum() == 3


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    import os

    from medfuse.io import write_text_atomic

    write_text_atomic(tmp_path / "x.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o666 & ~umask

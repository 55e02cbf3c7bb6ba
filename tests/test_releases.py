"""Which of a release's own test ids fall in this dataset's split (the report's section)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from medfuse.config import deep_merge
from medfuse.data.prepared import PreparedData
from medfuse.report.releases import overlap_markdown, released_test_ids, split_of_ids
from tests.workspace import MIRRORS


def test_split_of_ids_names_the_split_of_each_id() -> None:
    manifest = pd.DataFrame(
        {
            "pair": ["SPECT-MRI", "SPECT-MRI", "CT-MRI"],
            "name": ["1", "2", "3"],
            "split": ["train", "test", "train"],
        }
    )
    assert split_of_ids(manifest, "SPECT-MRI", ["1", "2", "3"]) == {
        "train": ["1"],
        "test": ["2"],
        "absent": ["3"],
    }


def test_17_of_the_20_mmif_amin_test_ids_are_in_the_train_split(
    params: dict, prepared_root: Path, tmp_path: Path
) -> None:
    release = MIRRORS["pretrained-mmif-amin"]
    if not release.is_dir():
        pytest.skip(f"MMIF-AMIN release mirror not found at {release}")
    (tmp_path / "pretrained-mmif-amin").symlink_to(release)
    local = deep_merge(params, {"data": {"raw_dir": str(tmp_path)}})
    ids = released_test_ids(local, "pretrained-mmif-amin")["SPECT-MRI"]
    manifest = PreparedData(prepared_root).manifest
    splits = split_of_ids(manifest, "SPECT-MRI", ids)
    assert len(ids) == 20 and len(splits["train"]) == 17
    assert splits["test"] == ["15009", "35007", "40031"]  # as the mirror's SOURCE.md says
    text = overlap_markdown(local, manifest)
    assert (
        "of its authors' 20 test ids, 3 in this dataset's test split (15009, 35007, 40031)" in text
    )

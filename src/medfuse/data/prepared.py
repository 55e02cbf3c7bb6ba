"""Read access to `data/prepared/`, the one format every later step consumes.

Layout written by `medfuse prepare`:
    <root>/manifest.csv                      one row per pair (see COLUMNS)
    <root>/<pair>/<split>/A/<name>.png       grey functional/CT image (Y of YCbCr for PET/SPECT)
    <root>/<pair>/<split>/B/<name>.png       grey MRI
    <root>/<pair>/<split>/A_rgb/<name>.png   the original RGB functional image (PET/SPECT only),
                                             kept for recolouring (its Cb/Cr) and colour metrics
Paths in the manifest are relative to <root>.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medfuse.errors import DataError
from medfuse.io import read_image

MANIFEST_NAME = "manifest.csv"
COLUMNS = [
    "pair_id",
    "pair",
    "split",
    "name",
    "a",
    "b",
    "a_rgb",
    "a_sha256",
    "b_sha256",
    "height",
    "width",
]


@dataclass(frozen=True)
class Sample:
    """One registered pair loaded as uint8 arrays."""

    name: str
    a: np.ndarray  # (H, W) uint8, CT or functional luma
    b: np.ndarray  # (H, W) uint8, MRI
    a_rgb: np.ndarray | None  # (H, W, 3) uint8 for PET/SPECT, else None


class PreparedData:
    def __init__(self, root: str | Path = "data/prepared") -> None:
        self.root = Path(root)
        manifest = self.root / MANIFEST_NAME
        if not manifest.is_file():
            raise DataError(f"{manifest}: no split manifest; run `medfuse prepare` first")
        self.manifest = pd.read_csv(manifest, dtype={"name": str}, keep_default_na=False)

    def rows(self, pair: str, split: str) -> pd.DataFrame:
        rows = self.manifest[(self.manifest["pair"] == pair) & (self.manifest["split"] == split)]
        if rows.empty:
            raise DataError(f"{self.root / MANIFEST_NAME}: no {split} pairs for {pair}")
        return rows.sort_values("name").reset_index(drop=True)

    def load(self, row: pd.Series) -> Sample:
        a_rgb = read_image(self.root / row["a_rgb"], mode="RGB") if row["a_rgb"] else None
        return Sample(
            name=str(row["name"]),
            a=read_image(self.root / row["a"], mode="L"),
            b=read_image(self.root / row["b"], mode="L"),
            a_rgb=a_rgb,
        )

    def samples(self, pair: str, split: str) -> list[Sample]:
        return [self.load(row) for _, row in self.rows(pair, split).iterrows()]

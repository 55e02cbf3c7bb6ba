"""Pair, validate and convert the raw AANLIB tree into `data/prepared/` (see prepared.py).

Pairs are matched by file name inside `<pair>/<split>/<MODALITY>/`. Every image is fully
decoded and checked (8-bit, expected mode, same size as its partner); a corrupt or mismatched
pair is an error naming the file, while a file without a partner is reported as a warning (the
upstream tree has one such stray file) and skipped. PET/SPECT RGB images are fused through
their BT.601 luma; the original RGB is kept for recolouring and colour-aware metrics.
The whole output is built in a temporary folder and renamed into place at the end.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from skimage.transform import resize

from medfuse.data.colour import luma_uint8
from medfuse.data.prepared import COLUMNS, MANIFEST_NAME
from medfuse.errors import DataError
from medfuse.io import read_image, sha256_file, write_image

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
# Stored mode of each modality's images in the dataset.
MODALITY_MODE = {"CT": "L", "MRI": "L", "PET": "RGB", "SPECT": "RGB"}


class UnpairedFileWarning(UserWarning):
    """A raw file has no partner; it is skipped."""


@dataclass(frozen=True)
class RawPair:
    pair: str
    split: str
    name: str
    functional: Path
    mri: Path


def modalities(pair: str) -> tuple[str, str]:
    functional, mri = pair.split("-")
    return functional, mri


def _images_in(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {
        p.stem: p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    }


def find_pairs(raw_root: Path, pair: str, split: str) -> list[RawPair]:
    """Match files by name between the two modality folders; warn about the unmatched ones."""
    functional, mri = modalities(pair)
    split_dir = raw_root / pair / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: folder not found (did `medfuse download` run?)")
    left, right = _images_in(split_dir / functional), _images_in(split_dir / mri)
    for name in sorted(set(left) ^ set(right)):
        orphan = left.get(name) or right[name]
        warnings.warn(f"{orphan}: no partner image, skipped", UnpairedFileWarning, stacklevel=2)
    for stray in sorted(_images_in(split_dir).values()):
        warnings.warn(
            f"{stray}: stray file outside the modality folders, skipped",
            UnpairedFileWarning,
            stacklevel=2,
        )
    names = sorted(set(left) & set(right))
    if not names:
        raise DataError(f"{split_dir}: no {functional}/{mri} pairs found")
    return [RawPair(pair, split, n, left[n], right[n]) for n in names]


def resize_square(image: np.ndarray, size: int | None) -> np.ndarray:
    """Resize to size x size as `prepare` does (None keeps the image as it is)."""
    if size is None or image.shape[:2] == (size, size):
        return image
    out = resize(image, (size, size), order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def load_raw_pair(
    raw: RawPair, image_size: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validated (A grey, B grey, A RGB or None) for one raw pair."""
    functional, mri = modalities(raw.pair)
    a = read_image(raw.functional, mode=MODALITY_MODE[functional])
    b = read_image(raw.mri, mode=MODALITY_MODE[mri])
    if a.shape[:2] != b.shape[:2]:
        raise DataError(
            f"{raw.functional} is {a.shape[1]}x{a.shape[0]} but its partner {raw.mri} is "
            f"{b.shape[1]}x{b.shape[0]}: a registered pair must have one size"
        )
    a, b = resize_square(a, image_size), resize_square(b, image_size)
    if a.ndim == 3:
        return luma_uint8(a), b, a
    return a, b, None


def _assign_splits(pairs: list[RawPair], mode: str, test_size: int, seed: int) -> list[RawPair]:
    """Keep the dataset's own split, or pool both folders and re-split them with a seed."""
    if mode == "dataset":
        return pairs
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pairs))
    test = set(order[:test_size].tolist())
    return [
        RawPair(p.pair, "test" if i in test else "train", p.name, p.functional, p.mri)
        for i, p in enumerate(pairs)
    ]


def _write_pair(out: Path, raw: RawPair, image_size: int | None) -> dict[str, Any]:
    a, b, a_rgb = load_raw_pair(raw, image_size)
    base = Path(raw.pair) / raw.split
    rel_a, rel_b = base / "A" / f"{raw.name}.png", base / "B" / f"{raw.name}.png"
    write_image(out / rel_a, a)
    write_image(out / rel_b, b)
    rel_rgb = ""
    if a_rgb is not None:
        rel_rgb = str(base / "A_rgb" / f"{raw.name}.png")
        write_image(out / rel_rgb, a_rgb)
    return {
        "pair_id": f"{raw.pair}/{raw.split}/{raw.name}",
        "pair": raw.pair,
        "split": raw.split,
        "name": raw.name,
        "a": str(rel_a),
        "b": str(rel_b),
        "a_rgb": rel_rgb,
        "a_sha256": sha256_file(out / rel_a),
        "b_sha256": sha256_file(out / rel_b),
        "height": a.shape[0],
        "width": a.shape[1],
    }


def _limit(pairs: list[RawPair], max_pairs: int | None) -> list[RawPair]:
    if max_pairs is None:
        return pairs
    kept: dict[str, int] = {}
    out = []
    for p in pairs:
        if kept.get(p.split, 0) < max_pairs:
            kept[p.split] = kept.get(p.split, 0) + 1
            out.append(p)
    return out


def prepare(
    raw_root: str | Path,
    out_dir: str | Path,
    pairs: list[str],
    split: str = "dataset",
    test_size: int = 24,
    seed: int = 0,
    image_size: int | None = None,
    max_pairs: int | None = None,
) -> pd.DataFrame:
    """Build the prepared tree and its manifest; replace `out_dir` only once all is written."""
    raw_root, out_dir = Path(raw_root), Path(out_dir)
    rows = []
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for pair in pairs:
            found = [p for s in SPLITS for p in find_pairs(raw_root, pair, s)]
            chosen = _limit(_assign_splits(found, split, test_size, seed), max_pairs)
            rows += [_write_pair(staging, raw, image_size) for raw in chosen]
        manifest = pd.DataFrame(rows, columns=COLUMNS)
        manifest.to_csv(staging / MANIFEST_NAME, index=False)
        _swap_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def summarise(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest.groupby(["pair", "split"]).size().unstack(fill_value=0)


def prepare_from_params(
    params: Mapping[str, Any], raw_root: str | Path | None = None, out_dir: str | Path | None = None
) -> pd.DataFrame:
    """`medfuse prepare`: settings from params.yaml, paths overridable."""
    cfg = params["data"]["prepare"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnpairedFileWarning)
        manifest = prepare(
            raw_root or cfg["raw_root"],
            out_dir or cfg["out_dir"],
            pairs=list(cfg["pairs"]),
            split=cfg["split"],
            test_size=cfg["test_size"],
            seed=params["seed"],
            image_size=cfg["image_size"],
            max_pairs=cfg["max_pairs"],
        )
    for w in caught:
        log.warning("%s", w.message)
        if not issubclass(w.category, UnpairedFileWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    print(summarise(manifest).to_string())
    return manifest

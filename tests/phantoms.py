"""Registered phantom pairs in the download mirrors' layout, for machines without ../shared.

`write_phantom_mirrors(root, params)` writes one folder per dataset of params.yaml, laid out as
its mirror, and a manifest (path, size, sha256) for each: root/<dataset>/ and
root/<dataset>.tsv. AANLIB gets <raw_root>/<pair>/<split>/<modality>/<id>.png (CT and MRI grey,
PET and SPECT pseudo-colour RGB, as `prepare` validates); each published peer gets
<pair>/<id>.png fused images of the test ids; each pretrained method's release gets the weights
file it names, its network at a seeded initialisation. Seeded, so every run writes the same files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfuse.data.download import dataset_dir
from medfuse.data.prepare import MODALITY_MODE, SPLITS, modalities
from medfuse.io import sha256_file, write_image

AANLIB = "aanlib"
# Per pair and split: one more than the quick profile keeps (data.prepare.max_pairs: 4).
PAIRS_PER_SPLIT = 5
SIZE = 128  # half the dataset's 256 (PNG encoding is most of the time); quick resizes to 64


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) * 2.0 - 1.0
    return yy, xx


def _ellipse(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float
) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Smooth 'gyri' in -1..1: a few random plane waves (structure for the gradient metrics)."""
    waves = [
        np.sin(rng.uniform(4, 14) * (np.cos(t) * xx + np.sin(t) * yy) + rng.uniform(0, 6.3))
        for t in rng.uniform(0, np.pi, size=4)
    ]
    return np.mean(waves, axis=0)


def _anatomy(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """Masks and maps of one head, shared by both modalities so that the pair is registered."""
    yy, xx = _grid(size)
    cy, cx = rng.uniform(-0.05, 0.05, size=2)
    ry, rx = rng.uniform(0.8, 0.92), rng.uniform(0.68, 0.8)
    head = _ellipse(yy, xx, cy, cx, ry, rx)
    brain = _ellipse(yy, xx, cy, cx, ry - 0.08, rx - 0.08)
    ventricles = _ellipse(yy, xx, cy - 0.05, cx - 0.12, 0.22, 0.07) | _ellipse(
        yy, xx, cy - 0.05, cx + 0.12, 0.22, 0.07
    )
    ly, lx = rng.uniform(-0.4, 0.4, size=2)
    lesion = np.exp(-((yy - cy - ly) ** 2 + (xx - cx - lx) ** 2) / rng.uniform(0.005, 0.02))
    return {
        "skull": head & ~brain,
        "brain": brain & ~ventricles,
        "ventricles": ventricles,
        "lesion": lesion * brain,
        "texture": _texture(rng, yy, xx) * brain,
    }


# Grey level of each tissue, and the amplitude of the brain's texture, per grey modality.
TISSUE_LEVELS = {
    "MRI": ({"brain": 110, "ventricles": 200, "skull": 40, "lesion": 60}, 35),
    "CT": ({"brain": 55, "ventricles": 20, "skull": 235, "lesion": 50}, 8),
}


def _grey(a: Mapping[str, np.ndarray], modality: str, rng: np.random.Generator) -> np.ndarray:
    levels, texture = TISSUE_LEVELS[modality]
    image = sum(level * a[tissue] for tissue, level in levels.items()) + texture * a["texture"]
    noisy = image + rng.normal(scale=3.0, size=image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _pseudo_colour(activity: np.ndarray) -> np.ndarray:
    """A jet-like colour map of activity in 0..1, as PET and SPECT images are published."""
    channels = [np.clip(1.5 - np.abs(4 * activity - k), 0, 1) for k in (3, 2, 1)]
    return np.clip(np.rint(np.stack(channels, axis=-1) * 255), 0, 255).astype(np.uint8)


def _functional(a: Mapping[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    activity = a["brain"] * (0.35 + 0.1 * a["texture"]) + 0.6 * a["lesion"]
    inside = activity > 0
    activity = activity + rng.normal(scale=0.01, size=activity.shape) * inside
    return _pseudo_colour(np.clip(activity, 0, 1)) * inside[..., None]  # black outside


def phantom_pair(pair: str, seed: Sequence[int], size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(functional, MRI) of one registered phantom: CT grey, PET/SPECT RGB; MRI grey."""
    rng = np.random.default_rng(seed)
    anatomy = _anatomy(rng, size)
    functional = modalities(pair)[0]
    if MODALITY_MODE[functional] == "L":
        a = _grey(anatomy, functional, rng)
    else:
        a = _functional(anatomy, rng)
    return a, _grey(anatomy, "MRI", rng)


def _published_fusion(a: np.ndarray, b: np.ndarray, rule: str) -> np.ndarray:
    """A peer's 'released' fusion: the average or maximum, in colour when A is colour."""
    b = np.repeat(b[..., None], 3, axis=-1) if a.ndim == 3 else b
    stacked = np.stack([a, b]).astype(np.float64)
    fused = stacked.mean(axis=0) if rule == "average" else stacked.max(axis=0)
    return np.rint(fused).astype(np.uint8)


def _write_manifest(folder: Path, path: Path) -> Path:
    lines = [
        f"{f.relative_to(folder).as_posix()}\t{f.stat().st_size}\t{sha256_file(f)}"
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def published_datasets(params: Mapping[str, Any]) -> list[str]:
    """The datasets holding the published peers' fused images (methods of kind `published`)."""
    return [m["dataset"] for m in params["methods"].values() if m["kind"] == "published"]


def _write_phantom_releases(root: Path, params: Mapping[str, Any]) -> list[str]:
    """Each pretrained method's released weights, as its network initialised with a fixed seed
    (the same file format and loading path as the authors' checkpoint)."""
    import torch

    from medfuse.config import method_config
    from medfuse.methods.registry import build_method

    datasets = []
    for section in params["methods"].values():
        if section["kind"] != "pretrained":
            continue
        torch.manual_seed(0)
        net = build_method(section["method"], method_config(params, section["method"]))
        path = root / section["dataset"] / section["weights"]
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), path)
        datasets.append(section["dataset"])
    return datasets


def write_phantom_mirrors(
    root: Path, params: Mapping[str, Any], per_split: int = PAIRS_PER_SPLIT, size: int = SIZE
) -> dict[str, Path]:
    """Write every dataset's phantom mirror under `root`; return dataset -> its manifest."""
    prepare = params["data"]["prepare"]
    # The tree inside the AANLIB download that `prepare` reads (MyDatasets/ in the real one).
    inner = Path(prepare["raw_root"]).relative_to(dataset_dir(params, AANLIB))
    published = published_datasets(params)
    for p, pair in enumerate(prepare["pairs"]):
        functional, mri = modalities(pair)
        for s, split in enumerate(SPLITS):
            for i in range(per_split):
                name = f"{p + 1}{s}{i:03d}"
                a, b = phantom_pair(pair, seed=(p, s, i), size=size)
                split_dir = root / AANLIB / inner / pair / split
                write_image(split_dir / functional / f"{name}.png", a)
                write_image(split_dir / mri / f"{name}.png", b)
                if split != "test":
                    continue
                for k, dataset in enumerate(published):  # two peers, two different fusions
                    fused = _published_fusion(a, b, ("average", "max")[k % 2])
                    write_image(root / dataset / pair / f"{name}.png", fused)
    released = _write_phantom_releases(root, params)
    datasets = [AANLIB, *published, *released]
    return {d: _write_manifest(root / d, root / f"{d}.tsv") for d in datasets}

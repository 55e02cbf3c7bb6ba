"""Training pairs as tensors, with the same random crop, flips and 90-degree turns for both images.

Each item's augmentation is drawn from a generator seeded by (seed, epoch, index), not from a
global stream: the result does not depend on worker processes or on where a run was resumed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medfuse.config import config_from_mapping
from medfuse.data.prepared import Sample


@dataclass(frozen=True)
class Augment:
    hflip: bool
    vflip: bool
    rot90: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | bool) -> Augment:
        """`train.augment`: true or false for every transform, or one boolean each."""
        if isinstance(config, bool):
            return cls(config, config, config)
        return config_from_mapping(cls, "train.augment", config)


def augment_pair(
    a: np.ndarray, b: np.ndarray, rng: np.random.Generator, augment: Augment, crop: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """One random crop / flip / rotation, applied identically to both (H, W) images."""
    h, w = a.shape
    if crop is not None and crop < min(h, w):
        top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        a, b = a[top : top + crop, left : left + crop], b[top : top + crop, left : left + crop]
    # Draw every number even when a step is off, so switching one off keeps the others' draws.
    flip_h, flip_v, turns = rng.random() < 0.5, rng.random() < 0.5, int(rng.integers(0, 4))
    if augment.hflip and flip_h:
        a, b = a[:, ::-1], b[:, ::-1]
    if augment.vflip and flip_v:
        a, b = a[::-1, :], b[::-1, :]
    if augment.rot90 and turns:
        a, b = np.rot90(a, turns), np.rot90(b, turns)
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


class PairDataset(Dataset):
    """(a, b) float32 (1, H, W) tensors in [0, 1]; call `set_epoch` at the start of each epoch."""

    def __init__(
        self,
        samples: Sequence[Sample],
        seed: int,
        augment: Augment | None = None,
        crop: int | None = None,
    ) -> None:
        if not samples:
            raise ValueError("PairDataset needs at least one sample")
        self.a = [s.a for s in samples]
        self.b = [s.b for s in samples]
        self.names = [s.name for s in samples]
        self.seed = int(seed)
        self.augment = augment or Augment(False, False, False)
        self.crop = crop
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        a, b = augment_pair(self.a[index], self.b[index], rng, self.augment, self.crop)
        return _to_tensor(a), _to_tensor(b)


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.astype(np.float32) / 255.0).unsqueeze(0)

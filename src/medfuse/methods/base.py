"""The two interfaces every method implements, so the CLI and the workflow treat all alike.

- `Fuser.fuse(a, b)`: two registered grey images as float64 arrays in [0, 1] (A is CT/PET/SPECT
  luma, B is MRI) -> the fused grey image, float64 in [0, 1], same shape. Used by `medfuse fuse`.
- `FusionNet` (learned methods only): an `nn.Module` whose `forward(a, b)` maps (N, 1, H, W)
  tensors in [0, 1] to the fused (N, 1, H, W) tensor in [0, 1], and whose
  `training_loss(a, b)` returns the scalar loss to minimise plus a dict of its named terms
  (floats, for logging). The one training loop in `medfuse.train` needs nothing else.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn


@runtime_checkable
class Fuser(Protocol):
    name: str

    def fuse(self, a: np.ndarray, b: np.ndarray) -> np.ndarray: ...


class FusionNet(nn.Module):
    """Base class of learned fusion networks (see the module docstring for the contract)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def training_loss(
        self, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:  # pragma: no cover
        raise NotImplementedError


def check_pair(a: np.ndarray, b: np.ndarray) -> None:
    """Both sources must be 2-D and the same size (registered pairs)."""
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"expected two grey 2-D images, got shapes {a.shape} and {b.shape}")
    if a.shape != b.shape:
        raise ValueError(f"source images differ in size: {a.shape} vs {b.shape}")

"""The interface every method implements, so the CLI and the workflow treat all alike, and the
check of its inputs. Free of torch, so classical fusion starts without it.

- `Fuser.fuse(a, b)`: two registered grey images as float64 arrays in [0, 1] (A is CT/PET/SPECT
  luma, B is MRI) -> the fused grey image, float64 in [0, 1], same shape. Used by `medfuse fuse`.
- Learned methods also implement `medfuse.methods.net.FusionNet`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Fuser(Protocol):
    name: str

    def fuse(self, a: np.ndarray, b: np.ndarray) -> np.ndarray: ...


def check_pair(a: np.ndarray, b: np.ndarray) -> None:
    """Both sources must be 2-D and the same size (registered pairs)."""
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"expected two grey 2-D images, got shapes {a.shape} and {b.shape}")
    if a.shape != b.shape:
        raise ValueError(f"source images differ in size: {a.shape} vs {b.shape}")

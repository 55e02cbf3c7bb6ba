"""Classical fusion rules with no training: the floor any learned method has to clear.

Each class is a `Fuser` (see `medfuse.methods.base`): `fuse(a, b)` takes two registered grey
images as floats in [0, 1] and returns the fused image, float64 in [0, 1], same shape. The
constructor's keyword arguments are the method's keys in params.yaml (`methods.<name>`).
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pywt
from skimage.transform import pyramid_gaussian, resize

from medfuse.methods.base import check_pair


def _as_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    check_pair(a, b)
    return a, b


def _finish(fused: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Crop transform padding back to the source size and clip to the valid range."""
    return np.clip(fused[: shape[0], : shape[1]], 0.0, 1.0)


def _pick_larger_magnitude(da: np.ndarray, db: np.ndarray) -> np.ndarray:
    """Per coefficient, the one with the larger absolute value (ties keep A's)."""
    return np.where(np.abs(da) >= np.abs(db), da, db)


class AverageFusion:
    """Pixel-wise mean of the two sources."""

    name = "average"

    def fuse(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = _as_pair(a, b)
        return _finish((a + b) / 2.0, a.shape)


class MaxFusion:
    """Pixel-wise maximum of the two sources."""

    name = "max"

    def fuse(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = _as_pair(a, b)
        return _finish(np.maximum(a, b), a.shape)


class DWTFusion:
    """Multi-level 2-D DWT (PyWavelets): approximation averaged, details by larger magnitude."""

    name = "dwt"

    def __init__(self, wavelet: str, levels: int, mode: str) -> None:
        if levels < 1:
            raise ValueError(f"dwt: levels must be >= 1, got {levels}")
        self.wavelet = pywt.Wavelet(wavelet)  # fails at once on an unknown wavelet name
        self.levels = int(levels)
        self.mode = mode

    def fuse(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = _as_pair(a, b)
        ca = pywt.wavedec2(a, self.wavelet, mode=self.mode, level=self.levels)
        cb = pywt.wavedec2(b, self.wavelet, mode=self.mode, level=self.levels)
        fused = [(ca[0] + cb[0]) / 2.0]
        for bands_a, bands_b in zip(ca[1:], cb[1:], strict=True):
            fused.append(
                tuple(_pick_larger_magnitude(x, y) for x, y in zip(bands_a, bands_b, strict=True))
            )
        return _finish(pywt.waverec2(fused, self.wavelet, mode=self.mode), a.shape)


class LaplacianFusion:
    """Laplacian pyramid (Burt-Adelson): detail layers by larger magnitude, base averaged.

    scikit-image's `pyramid_laplacian` yields difference-of-Gaussian bands without the low-pass
    residual, so it cannot be inverted; the pyramid here is built from `pyramid_gaussian` as
    L_i = G_i - expand(G_{i+1}) with `resize` as expand, which reconstructs exactly.
    """

    name = "laplacian"

    def __init__(self, levels: int, sigma: float | None) -> None:
        if levels < 1:
            raise ValueError(f"laplacian: levels must be >= 1, got {levels}")
        self.levels = int(levels)
        self.sigma = sigma  # None: scikit-image's default 2 * downscale / 6

    @staticmethod
    def _expand(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return resize(image, shape, order=1, mode="reflect", anti_aliasing=False)

    def _decompose(self, image: np.ndarray) -> list[np.ndarray]:
        """Detail layers, finest first, then the coarsest Gaussian layer (the base)."""
        gaussians = list(
            pyramid_gaussian(image, max_layer=self.levels, sigma=self.sigma, preserve_range=True)
        )
        details = [fine - self._expand(coarse, fine.shape) for fine, coarse in pairwise(gaussians)]
        return [*details, gaussians[-1]]

    def _reconstruct(self, layers: list[np.ndarray]) -> np.ndarray:
        image = layers[-1]
        for detail in reversed(layers[:-1]):
            image = detail + self._expand(image, detail.shape)
        return image

    def fuse(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = _as_pair(a, b)
        la, lb = self._decompose(a), self._decompose(b)
        fused = [_pick_larger_magnitude(x, y) for x, y in zip(la[:-1], lb[:-1], strict=True)]
        fused.append((la[-1] + lb[-1]) / 2.0)
        return _finish(self._reconstruct(fused), a.shape)

"""Colour conversions used by the field for PET/SPECT pseudo-colour images.

The functional image is fused through its luma: RGB -> YCbCr (ITU-R BT.601, full range, the
JPEG/OpenCV convention used by fusion papers), Y is fused with the MRI, and the fused Y is put
back with the original Cb/Cr. Written here rather than taken from scikit-image because
`skimage.color.rgb2ycbcr` uses the studio range (Y in 16..235), which is not the field's.
"""

from __future__ import annotations

import numpy as np

# Rows give Y, Cb, Cr from R, G, B (BT.601 full range, offset 128 on chroma).
_RGB_TO_YCBCR = np.array(
    [
        [0.299, 0.587, 0.114],
        [-0.168736, -0.331264, 0.5],
        [0.5, -0.418688, -0.081312],
    ]
)
_YCBCR_TO_RGB = np.linalg.inv(_RGB_TO_YCBCR)
_CHROMA_OFFSET = np.array([0.0, 128.0, 128.0])


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """uint8/float RGB (H, W, 3) in 0..255 -> float64 YCbCr (H, W, 3) in 0..255."""
    return np.asarray(rgb, dtype=np.float64) @ _RGB_TO_YCBCR.T + _CHROMA_OFFSET


def ycbcr_to_rgb(ycbcr: np.ndarray) -> np.ndarray:
    """float YCbCr (H, W, 3) in 0..255 -> uint8 RGB, rounded and clipped."""
    rgb = (np.asarray(ycbcr, dtype=np.float64) - _CHROMA_OFFSET) @ _YCBCR_TO_RGB.T
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def luma_uint8(rgb: np.ndarray) -> np.ndarray:
    """The Y channel the model fuses, rounded to 8 bits."""
    return np.clip(np.rint(rgb_to_ycbcr(rgb)[..., 0]), 0, 255).astype(np.uint8)


def recolour(fused_y: np.ndarray, functional_rgb: np.ndarray) -> np.ndarray:
    """Put a fused luma (uint8 or float 0..255) back with the functional image's Cb/Cr."""
    ycbcr = rgb_to_ycbcr(functional_rgb)
    ycbcr[..., 0] = np.asarray(fused_y, dtype=np.float64)
    return ycbcr_to_rgb(ycbcr)


def rgb2gray_matlab(rgb: np.ndarray) -> np.ndarray:
    """MATLAB's rgb2gray on uint8: round(0.2989 R + 0.5870 G + 0.1140 B). Grey input passes."""
    array = np.asarray(rgb)
    if array.ndim == 2:
        return array.astype(np.uint8)
    weights = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])
    return np.clip(np.rint(array[..., :3].astype(np.float64) @ weights), 0, 255).astype(np.uint8)

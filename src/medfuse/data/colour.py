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


def luma_pil(rgb: np.ndarray) -> np.ndarray:
    """PIL's `Image.convert("L")` of an 8-bit RGB image: BT.601 weights in 16-bit fixed point,
    (19595 R + 38470 G + 7471 B + 2^15) >> 16. MMIF-AMIN's authors read their functional
    images this way; it differs from `luma_uint8` by one level on a few pixels."""
    array = np.asarray(rgb)
    if array.ndim == 2:
        return array.astype(np.uint8)
    r, g, b = (array[..., i].astype(np.int64) for i in range(3))
    return ((19595 * r + 38470 * g + 7471 * b + (1 << 15)) >> 16).astype(np.uint8)


# OpenCV's 8-bit BGR <-> YUV (cv2.COLOR_BGR2YUV / COLOR_YUV2BGR), restated in numpy because
# OpenCV is a large dependency for two integer formulas. It is analogue YUV (U = 0.492 (B - Y),
# V = 0.877 (R - Y)), not YCbCr, in 14-bit fixed point, each step rounded half up
# (x + 2^13) >> 14 and saturated to 0..255 (OpenCV's CV_DESCALE and saturate_cast).
_CV_SHIFT = 14
_CV_Y = (4899, 9617, 1868)  # 0.299, 0.587, 0.114 of R, G, B
_CV_U, _CV_V = 8061, 14369  # 0.492, 0.877
_CV_U2B, _CV_U2G, _CV_V2G, _CV_V2R = 33292, -6472, -9519, 18678  # 2.032, -0.395, -0.581, 1.140


def _descale(x: np.ndarray) -> np.ndarray:
    return (x + (1 << (_CV_SHIFT - 1))) >> _CV_SHIFT


def rgb_to_yuv_opencv(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> uint8 Y, U, V (H, W, 3), as OpenCV's BGR2YUV of the same pixels."""
    r, g, b = (np.asarray(rgb)[..., i].astype(np.int64) for i in range(3))
    y = _descale(_CV_Y[0] * r + _CV_Y[1] * g + _CV_Y[2] * b)
    half = 128 << _CV_SHIFT
    u = _descale((b - y) * _CV_U + half)
    v = _descale((r - y) * _CV_V + half)
    return np.clip(np.stack([y, u, v], axis=-1), 0, 255).astype(np.uint8)


def yuv_to_rgb_opencv(yuv: np.ndarray) -> np.ndarray:
    """uint8 Y, U, V (H, W, 3) -> uint8 RGB, as OpenCV's YUV2BGR (channels reordered)."""
    y, u, v = (np.asarray(yuv)[..., i].astype(np.int64) for i in range(3))
    u, v = u - 128, v - 128
    r = y + _descale(v * _CV_V2R)
    g = y + _descale(u * _CV_U2G + v * _CV_V2G)
    b = y + _descale(u * _CV_U2B)
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


def recolour_opencv_yuv(fused_y: np.ndarray, functional_rgb: np.ndarray) -> np.ndarray:
    """Put a uint8 fused luma into the Y of the functional image's OpenCV YUV and convert back
    (MMIF-AMIN's authors' recolouring)."""
    yuv = rgb_to_yuv_opencv(functional_rgb)
    yuv[..., 0] = np.asarray(fused_y, dtype=np.uint8)
    return yuv_to_rgb_opencv(yuv)

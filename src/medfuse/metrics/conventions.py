"""Named convention sets: the choices that make one paper's numbers differ from another's.

A convention is data — a frozen table of choices read by the one metric code in
medfuse.metrics.core — never a second copy of a metric. See docs/metrics.md.

- ``standard``: the project's own table (metrics.md): BT.601 luma for colour, bits, PSNR peak
  255 on 0..255 values, SSIM data range 255.
- ``paper``: the W-DUALMINE paper's toolbox, pinned by reproducing its AdaFuse and ASFE-Fusion
  rows from those authors' published images: a colour fused image and the functional source
  both enter as their rounded BT.601 luma (the fused image through MATLAB ``rgb2gray`` instead
  misses five of the 48 printed AdaFuse values in the 4th decimal; OpenCV's grey misses one ASFE
  value; docs/metrics.md); PSNR_paper on the stored images (RGB fused vs RGB functional and grey
  MRI).
- ``cddfuse``: the widely copied Python evaluator of CDDFuse (Zhao et al., CVPR 2023): grey by
  OpenCV's float BGR->GRAY then ``np.round``; MI in nats; PSNR with the fused image's maximum
  as peak; SSIM with scikit-image's old float data range of 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medfuse.data.colour import luma_uint8, rgb2gray_matlab

GREY_RULES = ("bt601", "matlab", "opencv")


@dataclass(frozen=True)
class Convention:
    """One set of metric conventions (every field is a choice some paper makes)."""

    name: str
    fused_grey: str  # how an RGB fused image becomes grey: one of GREY_RULES
    source_grey: str  # how an RGB functional source becomes grey
    log_base: float  # EN and MI: 2 = bits, e = nats
    psnr_peak: str  # "255" or "fused_max" (PSNR column)
    psnr_paper_stored: bool  # PSNR_paper on the stored (RGB) images rather than grey
    ssim_data_range: float
    # sum or mean over the two sources, per two-source metric (FMI is always the mean).
    combine: tuple[tuple[str, str], ...] = (
        ("MI", "sum"),
        ("CC", "mean"),
        ("SSIM", "sum"),
        ("VIF", "sum"),
    )
    std_ddof: int = 0  # summary std over test pairs: population (reproduces the paper's ±)
    description: str = ""

    def combine_rule(self, metric: str) -> str:
        return dict(self.combine)[metric]


CONVENTIONS: dict[str, Convention] = {
    c.name: c
    for c in (
        Convention(
            name="standard",
            fused_grey="bt601",
            source_grey="bt601",
            log_base=2.0,
            psnr_peak="255",
            psnr_paper_stored=False,
            ssim_data_range=255.0,
            description="metrics.md table: BT.601 luma, bits, PSNR peak 255, SSIM range 255",
        ),
        Convention(
            name="paper",
            fused_grey="bt601",
            source_grey="bt601",
            log_base=2.0,
            psnr_peak="255",
            psnr_paper_stored=True,
            ssim_data_range=255.0,
            description="W-DUALMINE paper's toolbox (reproduces its published peer rows)",
        ),
        Convention(
            name="cddfuse",
            fused_grey="opencv",
            source_grey="opencv",
            log_base=math.e,
            psnr_peak="fused_max",
            psnr_paper_stored=False,
            ssim_data_range=2.0,
            description="CDDFuse evaluator: OpenCV grey, nats, PSNR peak max(F), SSIM range 2",
        ),
    )
}


def get_convention(name: str | Convention) -> Convention:
    if isinstance(name, Convention):
        return name
    try:
        return CONVENTIONS[name]
    except KeyError:
        known = ", ".join(CONVENTIONS)
        raise ValueError(f"unknown metric convention {name!r}; known: {known}") from None


def _opencv_grey(rgb: np.ndarray) -> np.ndarray:
    # cv2.cvtColor(float32 BGR, BGR2GRAY) then np.round (half to even), as CDDFuse reads images.
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    grey = rgb[..., :3].astype(np.float32) @ weights
    return np.clip(np.round(grey), 0, 255).astype(np.uint8)


def to_grey(image: np.ndarray, rule: str) -> np.ndarray:
    """uint8 grey (H, W) from a uint8 grey or RGB image by the named rule; grey passes as is."""
    array = np.asarray(image)
    if array.ndim == 2:
        return array
    if rule == "bt601":
        return luma_uint8(array[..., :3])
    if rule == "matlab":
        return rgb2gray_matlab(array)
    if rule == "opencv":
        return _opencv_grey(array)
    raise ValueError(f"unknown grey rule {rule!r}; expected one of {GREY_RULES}")

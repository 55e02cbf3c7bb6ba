"""Fusion quality metrics on 8-bit grey images (see docs/metrics.md for every convention).

Every function takes the fused image ``f`` first, then the sources ``a`` (CT, or the functional
image) and ``b`` (MRI), as float64 arrays on the 0..255 scale, all the same shape. Metrics that
need integer grey levels (EN, MI) take uint8. Conventions that differ between papers (log base,
PSNR peak, SSIM data range, how the two sides are combined) are arguments, filled in from a
named convention set (medfuse.metrics.conventions); the defaults are the `standard` set.

Undefined values are NaN with a `MetricWarning`, never a silent 0: a correlation with a
constant image (CC, SCD), FMI with a constant image, VIF against a constant reference, Qabf
when neither source has an edge. PSNR of identical images is ``inf``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.ndimage import correlate1d, sobel
from skimage.metrics import structural_similarity

from medfuse.metrics.fmi import fmi as _fmi

COMBINE = ("sum", "mean")


class MetricWarning(UserWarning):
    """A metric is undefined for these images (it returns NaN)."""


def _undefined(metric: str, why: str) -> float:
    warnings.warn(f"{metric}: {why}; returning NaN", MetricWarning, stacklevel=3)
    return math.nan


def _combine(x: float, y: float, how: str) -> float:
    if how == "sum":
        return x + y
    if how == "mean":
        return (x + y) / 2.0
    raise ValueError(f"unknown combination {how!r}; expected one of {COMBINE}")


def is_constant(x: np.ndarray) -> bool:
    return bool(np.ptp(x) == 0)


# ----------------------------------------------------------------------------- information
def _histogram(levels: np.ndarray) -> np.ndarray:
    return np.bincount(levels.ravel(), minlength=256).astype(np.float64) / levels.size


def entropy(f: np.ndarray, base: float = 2.0) -> float:
    """EN: Shannon entropy of the 256-bin grey-level histogram of ``f`` (uint8), in bits for
    base 2. Shannon (1948); as a fusion metric e.g. Roberts, van Aardt & Ahmed, J. Appl.
    Remote Sens. 2(1), 2008."""
    p = _histogram(f)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / math.log(base))


def _mutual_information(x: np.ndarray, y: np.ndarray, base: float) -> float:
    joint = np.bincount(x.ravel().astype(np.int64) * 256 + y.ravel(), minlength=65536)
    joint = joint.reshape(256, 256).astype(np.float64) / x.size
    px, py = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    ratio = joint[nz] / np.outer(px, py)[nz]
    return float((joint[nz] * np.log(ratio)).sum() / math.log(base))


def mutual_information(
    f: np.ndarray, a: np.ndarray, b: np.ndarray, base: float = 2.0, combine: str = "sum"
) -> float:
    """MI: ``MI(F,A) + MI(F,B)`` (``combine='sum'``), each from the 256 x 256 joint histogram
    of uint8 grey levels; bits for base 2, nats for base e. Qu, Zhang & Yan, "Information
    measure for performance of image fusion", Electronics Letters 38(7), 2002."""
    return _combine(_mutual_information(f, a, base), _mutual_information(f, b, base), combine)


# ----------------------------------------------------------------------------- correlation
def _dot(x: np.ndarray, y: np.ndarray) -> float:
    # einsum rather than `@`: BLAS's ddot may start threads, which on a busy machine stalled
    # for milliseconds per call (CC took 12-48 ms a pair instead of under 1 ms).
    return float(np.einsum("i,i->", x, y))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r over all pixels; NaN (the caller warns) when either image is constant."""
    xc = x.ravel() - x.mean()
    yc = y.ravel() - y.mean()
    den = math.sqrt(_dot(xc, xc) * _dot(yc, yc))
    return math.nan if den == 0 else _dot(xc, yc) / den


def correlation(f: np.ndarray, a: np.ndarray, b: np.ndarray, combine: str = "mean") -> float:
    """CC: ``(r(F,A) + r(F,B)) / 2`` with Pearson's r over all pixels. Undefined (NaN) when an
    image is constant. Used as a fusion metric since e.g. Zhu & Bamler, IEEE TGRS 51(5), 2013;
    convention as in Ma, Ma & Li, "Infrared and visible image fusion methods and applications:
    a survey", Information Fusion 45, 2019."""
    if is_constant(f) or is_constant(a) or is_constant(b):
        return _undefined("CC", "a constant image has no correlation")
    return _combine(pearson(f, a), pearson(f, b), combine)


def scd(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """SCD: sum of the correlations of differences ``r(F-B, A) + r(F-A, B)``. Aslantas &
    Bendes, "A new image quality metric for image fusion: the sum of the correlations of
    differences", AEU Int. J. Electron. Commun. 69(12), 2015. NaN if a term is undefined."""
    d_fb, d_fa = f - b, f - a
    if any(is_constant(x) for x in (d_fb, a, d_fa, b)):
        return _undefined("SCD", "a constant image or difference has no correlation")
    return pearson(d_fb, a) + pearson(d_fa, b)


# ----------------------------------------------------------------------------- fidelity
def _mse(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((x - y) ** 2))


def _psnr(peak: float, mse: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def psnr(f: np.ndarray, a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR: ``10 log10(peak² / MSE)``, ``MSE = (MSE(F,A) + MSE(F,B)) / 2`` on 0..255 values;
    ``inf`` when F equals both sources. Standard peak 255 (Jagalingam & Hegde, "A review of
    quality metrics for fused image", Aquatic Procedia 4, 2015); the CDDFuse evaluator uses
    ``peak = max(F)``."""
    return _psnr(peak, (_mse(f, a) + _mse(f, b)) / 2.0)


def psnr_paper(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """PSNR_paper: ``10 log10(255² / MSE01)`` with ``MSE01`` the mean of ``MSE(F,A)`` and
    ``MSE(F,B)`` on images scaled to [0, 1] — the convention behind the ~64 dB values of the
    W-DUALMINE paper (Tables 1–3). Arrays broadcast: an RGB ``f`` against a grey ``b`` is the
    MATLAB toolbox's 3-D minus 2-D subtraction."""
    mse = (_mse(f / 255.0, a / 255.0) + _mse(f / 255.0, b / 255.0)) / 2.0
    return _psnr(255.0, mse)


def ssim(
    f: np.ndarray, a: np.ndarray, b: np.ndarray, data_range: float = 255.0, combine: str = "sum"
) -> float:
    """SSIM: ``SSIM(F,A) + SSIM(F,B)`` with scikit-image's ``structural_similarity``
    (7 x 7 uniform window, K1 = 0.01, K2 = 0.03) and the given data range (255 standard; 2 is
    scikit-image's old float default that the CDDFuse evaluator relied on). Wang, Bovik, Sheikh
    & Simoncelli, IEEE TIP 13(4), 2004."""
    side_a = structural_similarity(f, a, data_range=data_range)
    side_b = structural_similarity(f, b, data_range=data_range)
    return _combine(float(side_a), float(side_b), combine)


# ----------------------------------------------------------------------------- edges
_QABF = {"g": (0.9994, -15.0, 0.5), "alpha": (0.9879, -22.0, 0.8)}


def _sobel_strength_angle(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Zero padding, as MATLAB's conv2(..., 'same') in the reference implementations.
    sx = sobel(x, axis=1, mode="constant")
    sy = sobel(x, axis=0, mode="constant")
    strength = np.hypot(sx, sy)
    with np.errstate(divide="ignore", invalid="ignore"):
        angle = np.where(sx == 0, math.pi / 2, np.arctan(sy / np.where(sx == 0, 1.0, sx)))
    return strength, angle


def _sigmoid(x: np.ndarray, gamma: float, kappa: float, sigma: float) -> np.ndarray:
    return gamma / (1.0 + np.exp(kappa * (x - sigma)))


def _edge_preservation(g_s, a_s, g_f, a_f) -> np.ndarray:
    lo, hi = np.minimum(g_s, g_f), np.maximum(g_s, g_f)
    with np.errstate(divide="ignore", invalid="ignore"):
        g_ratio = np.where(hi == 0, 0.0, lo / np.where(hi == 0, 1.0, hi))
    orientation = 1.0 - np.abs(a_s - a_f) / (math.pi / 2)
    return _sigmoid(g_ratio, *_QABF["g"]) * _sigmoid(orientation, *_QABF["alpha"])


def qabf(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Qabf (Q^{AB/F}): edge information transferred from the sources to F, weighted by source
    edge strength ``g^L`` with L = 1; Sobel gradients; Γg=0.9994, κg=-15, σg=0.5, Γα=0.9879,
    κα=-22, σα=0.8. Xydeas & Petrović, "Objective image fusion performance measure",
    Electronics Letters 36(4), 2000. The strength ratio is min/max (1 for equal gradients).
    NaN when neither source has any gradient."""
    g_a, a_a = _sobel_strength_angle(a)
    g_b, a_b = _sobel_strength_angle(b)
    g_f, a_f = _sobel_strength_angle(f)
    weight = g_a.sum() + g_b.sum()
    if weight == 0:
        return _undefined("Qabf", "neither source has an edge")
    q_af = _edge_preservation(g_a, a_a, g_f, a_f)
    q_bf = _edge_preservation(g_b, a_b, g_f, a_f)
    return float((q_af * g_a + q_bf * g_b).sum() / weight)


# ----------------------------------------------------------------------------- VIF
def _gaussian_window_1d(n: int) -> np.ndarray:
    # MATLAB fspecial('gaussian', n, n/5) is separable: the outer product of this 1-D kernel.
    x = np.arange(n) - (n - 1) / 2.0
    g = np.exp(-(x**2) / (2.0 * (n / 5.0) ** 2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D 'valid' filtering with a separable symmetric kernel (MATLAB filter2(..., 'valid'))."""
    out = correlate1d(
        correlate1d(x, kernel, axis=0, mode="constant"), kernel, axis=1, mode="constant"
    )
    h = len(kernel) // 2
    return out[h : x.shape[0] - h, h : x.shape[1] - h]


def _vif_one(ref: np.ndarray, dist: np.ndarray, sigma_nsq: float = 2.0) -> float:
    eps = 1e-10
    num = den = 0.0
    for scale in range(1, 5):
        kernel = _gaussian_window_1d(2 ** (4 - scale + 1) + 1)
        if scale > 1:
            ref = _filter_valid(ref, kernel)[::2, ::2]
            dist = _filter_valid(dist, kernel)[::2, ::2]
        mu1, mu2 = _filter_valid(ref, kernel), _filter_valid(dist, kernel)
        s1 = np.maximum(_filter_valid(ref * ref, kernel) - mu1 * mu1, 0.0)
        s2 = np.maximum(_filter_valid(dist * dist, kernel) - mu2 * mu2, 0.0)
        s12 = _filter_valid(ref * dist, kernel) - mu1 * mu2
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        flat_ref, flat_dist = s1 < eps, s2 < eps
        g[flat_ref] = 0.0
        sv[flat_ref] = s2[flat_ref]
        s1 = np.where(flat_ref, 0.0, s1)
        g[flat_dist] = 0.0
        sv[flat_dist] = 0.0
        negative = g < 0
        sv[negative] = s2[negative]
        g[negative] = 0.0
        sv = np.maximum(sv, eps)
        num += float(np.sum(np.log10(1.0 + g * g * s1 / (sv + sigma_nsq))))
        den += float(np.sum(np.log10(1.0 + s1 / sigma_nsq)))
    return math.nan if den == 0 else num / den


def vif(f: np.ndarray, a: np.ndarray, b: np.ndarray, combine: str = "sum") -> float:
    """VIF: ``VIF(A,F) + VIF(B,F)``, pixel-domain VIF (vifp: 4 scales, Gaussian windows of
    17/9/5/3 pixels with σ = N/5, σ_n² = 2). Sheikh & Bovik, "Image information and visual
    quality", IEEE TIP 15(2), 2006. NaN when a source is constant (no reference information).
    Below 41 px a side, the coarsest scales have no 'valid' pixels and add nothing (as in the
    reference implementations)."""
    if is_constant(a) or is_constant(b):
        return _undefined("VIF", "a constant reference carries no information")
    side_a, side_b = _vif_one(a, f), _vif_one(b, f)
    if math.isnan(side_a) or math.isnan(side_b):
        return _undefined("VIF", "no reference variance at any scale")
    return _combine(side_a, side_b, combine)


# ----------------------------------------------------------------------------- single image
def sd(f: np.ndarray) -> float:
    """SD: population standard deviation of F (contrast). Ma, Ma & Li, Information Fusion 45,
    2019 (survey)."""
    return float(np.std(f))


def sf(f: np.ndarray) -> float:
    """SF: spatial frequency ``sqrt(RF² + CF²)``; RF² the mean squared horizontal first
    difference over the H x (W-1) array, CF² the vertical one over (H-1) x W. Eskicioglu &
    Fisher, "Image quality measures and their performance", IEEE Trans. Commun. 43(12), 1995."""
    rf2 = float(np.mean(np.diff(f, axis=1) ** 2))
    cf2 = float(np.mean(np.diff(f, axis=0) ** 2))
    return math.sqrt(rf2 + cf2)


def ag(f: np.ndarray) -> float:
    """AG: average gradient, the mean of ``sqrt((Gx² + Gy²) / 2)`` with ``numpy.gradient``
    (central differences inside, one-sided at the borders). Cui et al., "Detail preserved
    fusion of visible and infrared images using regional saliency extraction and multi-scale
    image decomposition", Optics Communications 341, 2015."""
    gy, gx = np.gradient(f)
    return float(np.mean(np.sqrt((gx * gx + gy * gy) / 2.0)))


# ----------------------------------------------------------------------------- FMI
def fmi(
    f: np.ndarray, a: np.ndarray, b: np.ndarray, feature: str = "dct", window: int = 3
) -> float:
    """FMI: ``(FMI(F,A) + FMI(F,B)) / 2`` per 3 x 3 window, averaged over windows, on the given
    feature (pixel, gradient, edge, dct, wavelet) of the whole image — fast-FMI as in the
    authors' MATLAB code (medfuse.metrics.fmi). Haghighat, Aghagolzadeh & Seyedarabi, Computers
    & Electrical Engineering 37(5), 2011; Haghighat & Razian, AICT 2014. NaN for a constant
    image (the normalised windows are then undefined)."""
    if is_constant(f) or is_constant(a) or is_constant(b):
        return _undefined(f"FMI_{feature}", "a constant image has no feature information")
    return _fmi(f, a, b, feature=feature, window=window)

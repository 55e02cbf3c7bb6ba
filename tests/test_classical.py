"""Classical fusion rules against small hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from medfuse.methods.base import Fuser
from medfuse.methods.classical import AverageFusion, DWTFusion, LaplacianFusion, MaxFusion

MULTISCALE = [DWTFusion(wavelet="db2", levels=3, mode="symmetric"), LaplacianFusion(4, None)]
ALL = [AverageFusion(), MaxFusion(), *MULTISCALE]


def _textured(size: int = 64) -> np.ndarray:
    """A ramp (low-pass content) plus a checkerboard (finest-scale detail), inside (0, 1)."""
    yy, xx = np.mgrid[0:size, 0:size]
    return 0.3 + 0.3 * xx / (size - 1) + 0.15 * ((xx + yy) % 2 * 2 - 1)


def _highpass(x: np.ndarray) -> np.ndarray:
    return x - gaussian_filter(x, 1.0)


def test_every_method_is_a_fuser() -> None:
    for method in ALL:
        assert isinstance(method, Fuser)


def test_average_of_constants() -> None:
    fused = AverageFusion().fuse(np.full((8, 8), 0.2), np.full((8, 8), 0.6))
    np.testing.assert_allclose(fused, 0.4)


def test_max_picks_the_larger_value() -> None:
    a = np.array([[0.1, 0.9], [0.5, 0.0]])
    b = np.array([[0.7, 0.2], [0.5, 1.0]])
    np.testing.assert_array_equal(MaxFusion().fuse(a, b), [[0.7, 0.9], [0.5, 1.0]])


@pytest.mark.parametrize("method", MULTISCALE, ids=lambda m: m.name)
def test_identical_sources_give_the_source_back(method: Fuser) -> None:
    image = np.random.default_rng(0).random((37, 50))  # odd sizes: transform padding is cropped
    np.testing.assert_allclose(method.fuse(image, image), image, atol=1e-10)


@pytest.mark.parametrize("method", MULTISCALE, ids=lambda m: m.name)
def test_constant_partner_keeps_the_other_sources_detail(method: Fuser) -> None:
    a = _textured()
    constant = np.full_like(a, 0.7)
    fused = method.fuse(a, constant)
    # Detail selection by magnitude takes A's (B has none): full amplitude, not halved.
    kept = np.std(_highpass(fused)) / np.std(_highpass(a))
    assert kept > 0.95
    averaged = np.std(_highpass(AverageFusion().fuse(a, constant))) / np.std(_highpass(a))
    assert averaged == pytest.approx(0.5)
    # The low-pass content is the average of the two sources.
    smooth_gap = gaussian_filter(fused, 3) - gaussian_filter((a + constant) / 2, 3)
    assert np.abs(smooth_gap).max() < 0.05


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
def test_output_shape_dtype_and_range(method: Fuser) -> None:
    rng = np.random.default_rng(1)
    # Hard 0/1 edges make wavelet/pyramid reconstructions overshoot: the output must be clipped.
    a = (rng.random((45, 33)) > 0.5).astype(np.float64)
    b = rng.random((45, 33))
    fused = method.fuse(a, b)
    assert fused.shape == a.shape
    assert fused.dtype == np.float64
    assert fused.min() >= 0.0 and fused.max() <= 1.0


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
def test_size_mismatch_and_colour_input_are_errors(method: Fuser) -> None:
    with pytest.raises(ValueError, match="differ in size"):
        method.fuse(np.zeros((16, 16)), np.zeros((16, 17)))
    with pytest.raises(ValueError, match="2-D"):
        method.fuse(np.zeros((16, 16, 3)), np.zeros((16, 16, 3)))


def test_bad_settings_fail_at_construction() -> None:
    with pytest.raises(ValueError):
        DWTFusion(wavelet="no-such-wavelet", levels=3, mode="symmetric")
    with pytest.raises(ValueError, match="levels"):
        DWTFusion(wavelet="db2", levels=0, mode="symmetric")
    with pytest.raises(ValueError, match="levels"):
        LaplacianFusion(levels=0, sigma=None)

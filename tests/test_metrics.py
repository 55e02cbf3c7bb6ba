"""Metric functions: analytic values, symmetry, edge cases, conventions, and fast-FMI against a
line-by-line (scalar, loop) port of the authors' MATLAB window code."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medfuse.errors import DataError
from medfuse.metrics import MetricWarning, core, evaluate_images, evaluate_pair, fmi
from medfuse.metrics.conventions import CONVENTIONS, get_convention, to_grey
from medfuse.metrics.evaluate import METRIC_NAMES


@pytest.fixture
def triple(make_pair) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sources a, b and a fused image (their rounded average plus a little noise), 48 x 48."""
    a, b = make_pair(48, 1)
    rng = np.random.default_rng(7)
    fused = (a.astype(float) + b) / 2 + rng.normal(0, 3, a.shape)
    return a, b, np.clip(np.rint(fused), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- analytic values
def test_entropy_of_a_uniform_256_level_image_is_8_bits():
    image = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert core.entropy(image) == pytest.approx(8.0, abs=1e-12)
    assert core.entropy(np.zeros((8, 8), np.uint8)) == 0.0


def test_mi_of_an_image_with_itself_is_twice_its_entropy(tiny_pair):
    a, _ = tiny_pair
    assert core.mutual_information(a, a, a) == pytest.approx(2 * core.entropy(a), abs=1e-12)


def test_cc_ssim_vif_of_identical_images(tiny_pair, make_pair):
    a, _ = tiny_pair
    x = a.astype(float)
    assert core.correlation(x, x, x) == pytest.approx(1.0, abs=1e-12)
    assert core.ssim(x, x, x, combine="mean") == pytest.approx(1.0, abs=1e-12)
    assert core.ssim(x, x, x) == pytest.approx(2.0, abs=1e-12)  # the sum: 1 per side
    big = make_pair(48, 3)[0].astype(float)
    assert core.vif(big, big, big) == pytest.approx(2.0, abs=1e-9)


def test_psnr_of_identical_images_is_infinite(tiny_pair):
    a = tiny_pair[0].astype(float)
    assert core.psnr(a, a, a) == math.inf
    assert core.psnr_paper(a, a, a) == math.inf


def test_psnr_values_against_the_formula():
    f, a, b = np.full((4, 4), 10.0), np.full((4, 4), 12.0), np.full((4, 4), 6.0)
    mse = (4.0 + 16.0) / 2
    assert core.psnr(f, a, b) == pytest.approx(10 * math.log10(255**2 / mse))
    # PSNR_paper: MSE on [0, 1] images with a 255² numerator (the paper's ~64 dB scale).
    assert core.psnr_paper(f, a, b) == pytest.approx(10 * math.log10(255**2 / (mse / 255**2)))


def test_single_image_metrics_of_constant_and_ramp_images():
    constant = np.full((16, 16), 77.0)
    assert core.sf(constant) == 0.0
    assert core.ag(constant) == 0.0
    assert core.sd(constant) == 0.0
    ramp = np.tile(np.arange(16.0), (16, 1))  # +1 per column
    assert core.sf(ramp) == pytest.approx(1.0)
    assert core.ag(ramp) == pytest.approx(math.sqrt(0.5))
    assert core.sd(ramp) == pytest.approx(np.arange(16.0).std())


def test_qabf_of_perfect_transfer_is_the_product_of_the_two_sigmoid_maxima(tiny_pair):
    a = tiny_pair[0].astype(float)
    best = 0.9994 / (1 + math.exp(-15 * 0.5)) * 0.9879 / (1 + math.exp(-22 * 0.2))
    assert core.qabf(a, a, a) == pytest.approx(best, rel=1e-12)


def test_qabf_without_any_source_edge_is_nan_with_a_warning(tiny_pair):
    fused = tiny_pair[0].astype(float)
    black = np.zeros_like(fused)  # zero padding: a flat non-zero image has border edges
    with pytest.warns(MetricWarning, match="Qabf: neither source has an edge"):
        assert math.isnan(core.qabf(fused, black, black))


def test_scd_of_the_sum_of_sources_is_two(tiny_pair):
    a, b = (x.astype(float) for x in tiny_pair)
    assert core.scd(a + b, a, b) == pytest.approx(2.0, abs=1e-12)


# ----------------------------------------------------------------------------- symmetry, API
def test_every_metric_is_symmetric_in_the_two_sources(triple):
    a, b, fused = triple
    forward, swapped = evaluate_pair(a, b, fused), evaluate_pair(b, a, fused)
    assert list(forward) == list(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert swapped[name] == pytest.approx(forward[name], rel=1e-10, abs=1e-12), name


def test_evaluate_pair_accepts_float_values_on_0_255(triple):
    a, b, fused = triple
    as_uint8 = evaluate_pair(a, b, fused)
    as_float = evaluate_pair(a.astype(np.float32), b.astype(float), fused.astype(float))
    for name in METRIC_NAMES:
        assert as_float[name] == pytest.approx(as_uint8[name], rel=1e-12), name


def test_evaluate_pair_of_identical_images(triple):
    a = triple[0]
    with pytest.warns(MetricWarning, match="SCD"):  # F - A is constant (zero)
        scores = evaluate_pair(a, a, a)
    assert math.isnan(scores["SCD"])
    assert scores["PSNR"] == math.inf and scores["PSNR_paper"] == math.inf
    assert scores["MI"] == pytest.approx(2 * scores["EN"])
    assert scores["CC"] == pytest.approx(1.0)
    for name in ("FMI_pixel", "FMI_gradient", "FMI_edge", "FMI_dct", "FMI_w"):
        assert scores[name] == 1.0  # every window equals the fused one


# ----------------------------------------------------------------------------- edge cases
def test_constant_fused_image_gives_nan_with_a_warning(triple):
    a, b, _ = triple
    with pytest.warns(MetricWarning) as caught:
        scores = evaluate_pair(a, b, np.full(a.shape, 90, np.uint8))
    for name in ("CC", "FMI_pixel", "FMI_gradient", "FMI_edge", "FMI_dct", "FMI_w"):
        assert math.isnan(scores[name]), name
    messages = " ".join(str(w.message) for w in caught)
    assert "CC:" in messages and "FMI_dct:" in messages
    # SCD stays defined: r(c - B, A) + r(c - A, B) = -2 r(A, B).
    r_ab = core.pearson(a.astype(float), b.astype(float))
    assert scores["SCD"] == pytest.approx(-2 * r_ab)
    assert scores["SF"] == 0.0 and scores["AG"] == 0.0 and scores["EN"] == 0.0


def test_constant_source_gives_nan_for_the_undefined_metrics_only(triple):
    _, b, fused = triple
    with pytest.warns(MetricWarning):
        scores = evaluate_pair(np.zeros_like(b), b, fused)
    for name in ("CC", "SCD", "VIF", "FMI_dct"):
        assert math.isnan(scores[name]), name
    assert math.isfinite(scores["MI"]) and math.isfinite(scores["PSNR"])


def test_size_mismatch_names_both_images(triple):
    a, b, fused = triple
    with pytest.raises(DataError, match=r"A is 48 x 48.*B is 47 x 48"):
        evaluate_pair(a, b[:-1], fused)
    with pytest.raises(DataError, match=r"ct\.png is 48 x 48.*mri\.png is 48 x 47"):
        evaluate_images(fused, a, b[:, :-1], labels=("fused.png", "ct.png", "mri.png"))


def test_values_outside_0_255_or_colour_grey_inputs_are_rejected(triple):
    a, b, fused = triple
    with pytest.raises(DataError, match=r"A: values must lie in \[0, 255\]"):
        evaluate_pair(a.astype(float) / 255 - 0.5, b, fused)
    with pytest.raises(DataError, match="fused: expected a 2-D grey image"):
        evaluate_pair(a, b, np.dstack([fused] * 3))


# ----------------------------------------------------------------------------- conventions
def test_grey_rules_differ_where_their_rounding_does():
    pixel = np.array([[[207, 7, 250], [162, 188, 129]]], np.uint8)
    assert to_grey(pixel, "bt601").tolist() == [[95, 173]]  # 94.502, 173.49999...
    assert to_grey(pixel, "matlab").tolist() == [[94, 174]]  # 94.494, 173.5003
    assert to_grey(pixel, "opencv").tolist() == [[95, 174]]  # float32 173.5, half to even
    grey = np.array([[3, 200]], np.uint8)
    assert all(to_grey(grey, rule) is grey for rule in ("bt601", "matlab", "opencv"))


def test_conventions_are_data_and_unknown_names_fail():
    assert set(CONVENTIONS) == {"standard", "paper", "cddfuse"}
    with pytest.raises(ValueError, match="unknown metric convention 'nope'"):
        get_convention("nope")
    with pytest.raises(AttributeError):
        CONVENTIONS["paper"].log_base = 10.0  # frozen


def test_cddfuse_convention_changes_only_what_it_names(triple):
    a, b, fused = triple
    names = ("EN", "MI", "PSNR", "SSIM", "CC")
    standard = evaluate_images(fused, a, b, "standard", names=names)
    cdd = evaluate_images(fused, a, b, "cddfuse", names=names)
    assert cdd["MI"] == pytest.approx(standard["MI"] * math.log(2))  # nats
    assert cdd["EN"] == pytest.approx(standard["EN"] * math.log(2))
    peak = float(fused.max())
    assert cdd["PSNR"] - standard["PSNR"] == pytest.approx(20 * math.log10(peak / 255))
    x = [v.astype(float) for v in (fused, a, b)]
    assert cdd["SSIM"] == pytest.approx(core.ssim(*x, data_range=2.0))
    assert cdd["SSIM"] != pytest.approx(standard["SSIM"])
    assert cdd["CC"] == standard["CC"]


def test_paper_psnr_compares_the_stored_rgb_images(make_pair):
    rgb_source = np.dstack((*make_pair(16, 4), make_pair(16, 5)[0]))
    mri = make_pair(16, 6)[1]
    fused = rgb_source.copy()  # equal to the functional image: only the MRI term is left
    paper = evaluate_images(fused, rgb_source, mri, "paper", names=("PSNR_paper",))
    mse_mri = np.mean((fused / 255.0 - mri[..., None] / 255.0) ** 2)
    assert paper["PSNR_paper"] == pytest.approx(10 * math.log10(255**2 / (mse_mri / 2)))
    standard = evaluate_images(fused, rgb_source, mri, "standard", names=("PSNR_paper",))
    luma = to_grey(fused, "bt601") / 255.0  # standard: grey images, F and A share a luma
    mse_grey = np.mean((luma - mri / 255.0) ** 2)
    assert standard["PSNR_paper"] == pytest.approx(10 * math.log10(255**2 / (mse_grey / 2)))


def test_paper_convention_uses_the_luma_for_fused_and_source():
    fused = np.full((8, 8, 3), (207, 7, 250), np.uint8)
    fused[0, 0] = (0, 0, 0)
    conv = get_convention("paper")
    assert conv.fused_grey == "bt601" and conv.source_grey == "bt601"
    scores = evaluate_images(fused, fused, np.zeros((8, 8), np.uint8), conv, names=("SD",))
    grey = to_grey(fused, "bt601").astype(float)
    assert scores["SD"] == pytest.approx(grey.std())


# ----------------------------------------------------------------------------- fast-FMI
def _seq(values) -> float:
    total = 0.0
    for v in values:
        total += v
    return total


def _ref_normalise(win: np.ndarray) -> np.ndarray:
    hi, lo = win.max(), win.min()
    return np.ones_like(win) if hi == lo else (win - lo) / (hi - lo)


def _ref_pdf(win: np.ndarray) -> list[float]:
    flat = win.flatten(order="F").tolist()  # MATLAB's W(:)
    total = _seq(_seq(win[:, c].tolist()) for c in range(win.shape[1]))  # sum(sum(W))
    return [x / total for x in flat]


def _ref_side(s: np.ndarray, f: np.ndarray) -> tuple[float, np.ndarray]:
    """One side of the toolbox's window loop, scalar by scalar; returns (fmi, fSub after it)."""
    if np.array_equal(s, f):
        return 1.0, f
    f = _ref_normalise(f)
    sp, fp = _ref_pdf(_ref_normalise(s)), _ref_pdf(f)
    n = len(sp)
    sc, fc = np.cumsum(sp).tolist(), np.cumsum(fp).tolist()
    s_mean, f_mean = _seq(sp) / n, _seq(fp) / n
    st, ft = [x - s_mean for x in sp], [x - f_mean for x in fp]
    cross = _seq(x * y for x, y in zip(st, ft, strict=True))
    c = 0.0 if cross == 0 else cross / math.sqrt(_seq(x * x for x in st) * _seq(y * y for y in ft))

    def sd(p):
        e = _seq((i + 1) * p[i] for i in range(n))
        return math.sqrt(max(_seq((i + 1) ** 2 * p[i] for i in range(n)) - e * e, 0.0))

    s_sd, f_sd = sd(sp), sd(fp)
    if c >= 0:
        bound = lambda x, y: 0.5 * (x + y - abs(x - y))  # noqa: E731
        degenerate = c == 0 or s_sd == 0 or f_sd == 0
    else:
        bound = lambda x, y: 0.5 * (x + y - 1 + abs(x + y - 1))  # noqa: E731
        degenerate = s_sd == 0 or f_sd == 0
    weight = 0.0
    if not degenerate:
        cov = _seq(bound(fc[i], sc[j]) - fc[i] * sc[j] for i in range(n) for j in range(n))
        weight = c / (cov / (f_sd * s_sd))

    def h(i, j):
        return bound(fc[i], sc[j]) if i >= 0 and j >= 0 else 0.0

    joint = 0.0
    for i in range(n):
        for j in range(n):
            mass = ((h(i, j) - h(i - 1, j)) - h(i, j - 1)) + h(i - 1, j - 1)
            p = weight * mass + (1 - weight) * fp[i] * sp[j]
            if p != 0:
                joint += -p * math.log2(abs(p))
    s_ent = _seq(-x * math.log2(x) for x in sp if x != 0)
    f_ent = _seq(-x * math.log2(x) for x in fp if x != 0)
    mi = s_ent + f_ent - joint
    return (0.0 if mi == 0 else 2 * mi / (s_ent + f_ent)), f


def _reference_fmi(fa: np.ndarray, fb: np.ndarray, ff: np.ndarray, w: int = 3) -> float:
    scores = []
    for p in range(ff.shape[0] - w + 1):
        for q in range(ff.shape[1] - w + 1):
            win = np.s_[p : p + w, q : q + w]
            side_a, f_after = _ref_side(fa[win], ff[win])
            side_b, _ = _ref_side(fb[win], f_after)  # B meets the fSub that A normalised
            scores.append((side_a + side_b) / 2)
    return float(np.mean(scores))


@pytest.mark.parametrize(
    "kind",
    ["continuous", "few_levels_with_flat_windows", "binary_edges", "negative_correlation"],
)
def test_fast_fmi_equals_a_line_by_line_port_of_the_toolbox(kind):
    rng = np.random.default_rng(11)
    if kind == "continuous":
        fa, fb, ff = (rng.normal(size=(9, 10)) for _ in range(3))
    elif kind == "few_levels_with_flat_windows":
        fa, fb, ff = (rng.integers(0, 3, (9, 10)).astype(float) for _ in range(3))
        fa[:4, :4] = fb[:4, :4] = 0.0  # flat background in both sources
        ff[:3, 5:] = fa[:3, 5:]  # windows where fused equals A
    elif kind == "binary_edges":
        fa, fb, ff = ((rng.random((9, 10)) > 0.8).astype(float) for _ in range(3))
    else:
        fa = rng.random((9, 10))
        fb = rng.random((9, 10))
        ff = 1.0 - fa + 0.05 * rng.random((9, 10))
    fast = fmi.fmi_of_features(fa, fb, ff)
    assert fast == pytest.approx(_reference_fmi(fa, fb, ff), abs=1e-12)


def test_fast_fmi_with_5_x_5_windows_and_window_checks():
    rng = np.random.default_rng(5)
    fa, fb, ff = (rng.integers(0, 4, (8, 9)).astype(float) for _ in range(3))
    fast = fmi.fmi_of_features(fa, fb, ff, window=5)
    assert fast == pytest.approx(_reference_fmi(fa, fb, ff, w=5), abs=1e-12)
    with pytest.raises(ValueError, match="window must be odd"):
        fmi.fmi_of_features(fa, fb, ff, window=4)


def test_matlab_sums_in_sequence_so_a_flat_window_keeps_a_tiny_centred_pdf():
    ninths = np.full((1, 9), 1 / 9)
    assert fmi._seq_sum(ninths)[0] == 1 + 2**-52  # NumPy's pairwise sum gives exactly 1
    # Flat A and B windows under a flat, different fused window: the rounding leaves
    # correlation +-1 between two uniform PDFs, so each side scores 1 (not 0).
    flat, brighter = np.zeros((3, 3)), np.full((3, 3), 5.0)
    assert fmi.fmi_of_features(flat, flat, brighter) == pytest.approx(1.0)
    assert _reference_fmi(flat, flat, brighter) == pytest.approx(1.0)


def test_fmi_feature_maps():
    step = np.zeros((12, 12))
    step[:, 6:] = 200.0
    edges = fmi.feature_map(step, "edge")
    assert set(np.unique(edges)) == {0.0, 1.0}
    assert edges.any(axis=0).sum() == 1  # thinned to one column at the step
    assert np.array_equal(fmi.feature_map(step, "gradient")[:, 5], np.full(12, 100.0))
    dct = fmi.feature_map(step, "dct")
    assert np.sum(dct**2) == pytest.approx(np.sum(step**2))  # orthonormal
    wavelet = fmi.feature_map(step, "wavelet")
    assert wavelet.min() == 0.0 and wavelet.max() == 1.0
    with pytest.raises(ValueError, match="unknown FMI feature"):
        fmi.feature_map(step, "sift")


def _scene_with_skipped_and_special_windows() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Few-level maps with every kind of window the fast path treats specially: black
    background in all three (both sides equal: dropped before scoring), F equal to A only,
    B equal to F only after F was normalised (values 0/1 against F's 0/2), flat F windows,
    and an anti-correlated patch (Fréchet lower bound)."""
    rng = np.random.default_rng(23)
    fa, fb, ff = (rng.integers(0, 4, (13, 14)).astype(float) for _ in range(3))
    fa[:5, :5] = fb[:5, :5] = ff[:5, :5] = 0.0  # black in all three
    ff[5:9, :6] = fa[5:9, :6]  # F equals A here
    ff[:5, 8:] = 2.0 * rng.integers(0, 2, (5, 6))  # F in {0, 2} ...
    fb[:5, 8:] = ff[:5, 8:] / 2.0  # ... and B is F normalised
    ff[9:, 9:] = 3.0  # flat F
    fa[8:, :5] = rng.random((5, 5))
    ff[8:, :5] = 1.0 - fa[8:, :5]  # anti-correlated with A
    return fa, fb, ff


@pytest.mark.parametrize("compact_share", [0.0, 1.0])
def test_fast_fmi_in_small_blocks_with_skipped_windows_equals_the_toolbox_loop(
    monkeypatch, compact_share
):
    fa, fb, ff = _scene_with_skipped_and_special_windows()
    # Blocks of 17 windows (the last one partial); equal windows either dropped or masked.
    monkeypatch.setattr(fmi, "_CHUNK", 17)
    monkeypatch.setattr(fmi, "_COMPACT_SHARE", compact_share)
    fast = fmi.fmi_of_features(fa, fb, ff)
    assert fast == pytest.approx(_reference_fmi(fa, fb, ff), abs=1e-12)


def test_window_blocks_hold_matlab_column_major_windows():
    x = np.arange(5 * 7, dtype=float).reshape(5, 7)
    for w in (3, 5):
        block = np.take(x.ravel(), fmi._top_left(x.shape, w) + fmi._window_offsets(x.shape, w))
        windows = [x[p : p + w, q : q + w] for p in range(6 - w) for q in range(8 - w)]
        expected = np.stack([win.flatten(order="F") for win in windows], axis=1)
        assert np.array_equal(block, expected)


def test_fast_fmi_of_random_continuous_maps_in_blocks_equals_the_toolbox_loop(monkeypatch):
    rng = np.random.default_rng(31)
    fa, fb = rng.normal(size=(12, 13)), rng.normal(size=(12, 13))
    ff = 0.5 * (fa - fb) + 0.3 * rng.normal(size=(12, 13))  # both bounds occur
    monkeypatch.setattr(fmi, "_CHUNK", 40)
    assert fmi.fmi_of_features(fa, fb, ff) == pytest.approx(_reference_fmi(fa, fb, ff), abs=1e-12)

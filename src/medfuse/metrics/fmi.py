"""Feature mutual information (FMI), the fast sliding-window version, vectorised.

Sources: M. B. A. Haghighat, A. Aghagolzadeh, H. Seyedarabi, "A non-reference image fusion
metric based on mutual information of image features", Computers & Electrical Engineering
37(5):744-756, 2011 (FMI); M. Haghighat, M. A. Razian, "Fast-FMI: non-reference image fusion
metric", AICT 2014 (the windowed, fast version).

What is computed (the behaviour of the authors' MATLAB `fmi.m`, which the W-DUALMINE paper's
toolbox uses; see docs/metrics.md):

1. A feature map of each *whole* image (A, B, fused F): ``pixel`` (the grey values), ``gradient``
   (MATLAB ``gradient(x)`` with one output: the horizontal central difference), ``edge`` (MATLAB
   ``edge(x)``: Sobel, automatic threshold, thinning), ``dct`` (orthonormal 2-D DCT of the full
   image, MATLAB ``dct2``), ``wavelet`` (one-level discrete Meyer DWT, sub-bands tiled as
   ``[cA cH; cV cD]`` and rescaled to [0, 1]).
2. For every ``w x w`` window (3 x 3 by default) and each source S in {A, B}: both windows are
   min-max normalised (a constant window becomes all ones) and divided by their sum, giving
   two "PDFs" over the w² window positions (column-major order, as MATLAB's ``x(:)``). Their
   joint distribution is Nelsen's simplified construction: the mix, weighted by the ratio of
   their Pearson correlation to the largest (Fréchet upper bound) or smallest (lower bound)
   correlation reachable with those marginals, of that Fréchet bound and of independence.
   ``FMI(F,S) = 2 I / (H_S + H_F)`` for that joint; a window equal to the fused one scores 1.
3. The window value is ``(FMI(F,A) + FMI(F,B)) / 2``; the result is the mean over windows.

Bit-level fidelity where it changes results. The 9-term sums that decide whether a correlation
is exactly zero are evaluated in MATLAB/Octave's sequential order: for a constant window,
nine copies of 1/9 added in sequence give 1 + 2^-52, so the "centred PDF" is a tiny non-zero
constant and the correlation is a real number rather than exactly 0. This decides the value of
flat (background) windows in the pixel and edge variants. Like the MATLAB code, the fused
window is compared with B after it was normalised for A.

Speed. The MATLAB code builds the w² x w² joint explicitly, window by window. Here the
Fréchet bound's mass is used directly: it lies on at most 2w² - 1 cells (a "staircase" found by
merging the two CDFs, which are already sorted, so the merge is a count of comparisons, not a
sort), so the joint entropy is the closed-form entropy of the independent part plus a
correction on those cells, and the bound's covariance is a sum over the same cells. Windows are
processed a few thousand at a time as (w², m) arrays, one column per window, so that every step
is one NumPy operation over all of them and the 9-term sums keep MATLAB's order. The result
equals a line-by-line port of the toolbox loop up to floating-point rounding (~1e-15).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pywt
from numpy.lib.stride_tricks import sliding_window_view
from scipy.fft import dctn
from scipy.ndimage import correlate

from medfuse.memory import keep_freed_memory

FEATURES = ("pixel", "gradient", "edge", "dct", "wavelet")


# ----------------------------------------------------------------------------- features
def _edge_matlab(image: np.ndarray) -> np.ndarray:
    """MATLAB ``edge(I)`` default: Sobel / 8, replicate border, cutoff 4 * mean(|grad|²),
    non-maximum thinning along the dominant gradient axis (interior pixels only).
    Hand-written because scikit-image's Sobel edge has no MATLAB threshold or thinning rule."""
    sobel_y = np.array([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]) / 8.0
    bx = np.abs(correlate(image, sobel_y.T, mode="nearest"))
    by = np.abs(correlate(image, sobel_y, mode="nearest"))
    mag = bx * bx + by * by
    cutoff = 4.0 * mag.mean()
    tol = 100 * np.finfo(float).eps
    c, up, down = mag[1:-1, 1:-1], mag[:-2, 1:-1], mag[2:, 1:-1]
    left, right = mag[1:-1, :-2], mag[1:-1, 2:]
    bxi, byi = bx[1:-1, 1:-1], by[1:-1, 1:-1]
    horizontal = (bxi >= byi - tol) & (left <= c) & (c > right)
    vertical = (byi >= bxi - tol) & (up <= c) & (c > down)
    edges = np.zeros(image.shape)
    edges[1:-1, 1:-1] = (c > cutoff) & (horizontal | vertical)
    return edges


def _rerange(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(), x.max()
    return np.ones_like(x) if hi == lo else (x - lo) / (hi - lo)


def _wavelet_tiles(image: np.ndarray) -> np.ndarray:
    # PyWavelets' 'dmey' with half-point symmetric extension (MATLAB dwtmode 'sym'). MATLAB's
    # FIR dmey is a longer filter, so sub-band sizes at the border differ: not calibrated.
    ca, (ch, cv, cd) = pywt.dwt2(image, "dmey", mode="symmetric")
    return _rerange(np.block([[ca, ch], [cv, cd]]))


def feature_map(image: np.ndarray, feature: str) -> np.ndarray:
    """The whole-image feature the toolbox windows over (float64)."""
    x = np.asarray(image, dtype=np.float64)
    if feature == "pixel":
        return x
    if feature == "gradient":
        return np.gradient(x, axis=1)
    if feature == "edge":
        return _edge_matlab(x)
    if feature == "dct":
        return dctn(x, type=2, norm="ortho")
    if feature == "wavelet":
        return _wavelet_tiles(x)
    raise ValueError(f"unknown FMI feature {feature!r}; expected one of {', '.join(FEATURES)}")


# ----------------------------------------------------------------------------- windows
# Layout: a block of m windows is an (l, m) array, l = w² window positions in MATLAB's
# column-major order (row k = r + c*w), one column per window. Every per-position step is then
# one contiguous NumPy operation over all the windows of the block, and sums over the positions
# are added row by row in MATLAB's order.


def _sum_rows(x: np.ndarray) -> np.ndarray:
    """Sum over axis 0 added row by row, in order, as MATLAB/Octave's ``sum`` does (NumPy's
    own ``sum`` may add pairwise, which rounds differently: nine 1/9 give 1, not 1 + 2^-52)."""
    acc = x[0] + x[1] if len(x) > 1 else x[0].copy()
    for row in x[2:]:
        acc += row
    return acc


def _seq_sum(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Sums along `axis` added in sequence (MATLAB's order)."""
    return _sum_rows(np.moveaxis(x, axis, 0))


def _cumsum(x: np.ndarray) -> np.ndarray:
    """Running sums down axis 0, row by row (np.cumsum along a non-contiguous axis is slow)."""
    out = np.empty_like(x)
    out[0] = x[0]
    for k in range(1, len(x)):
        np.add(out[k - 1], x[k], out=out[k])
    return out


def _matlab_sum2(win: np.ndarray, w: int) -> np.ndarray:
    """``sum(sum(W))`` of each window of an (l, m) block: each column of W in order, then the
    column sums in order."""
    by_col = win.reshape(w, w, -1)  # [c, r, window]
    return _sum_rows(_sum_rows(by_col.transpose(1, 0, 2)))


def _windows_equal(x: np.ndarray, y: np.ndarray, w: int) -> np.ndarray:
    """Per window (row-major order of the top-left corners): are the w x w windows equal?"""
    same = sliding_window_view(x == y, (w, w))
    return same.all(axis=(2, 3)).ravel()


def _window_offsets(shape: tuple[int, int], w: int) -> np.ndarray:
    """Flat offsets, from a window's top-left pixel, of its w² pixels in column-major order
    (row k = r + c*w of the block), as an (l, 1) column."""
    r, c = np.arange(w), np.arange(w)[:, None]
    return (r * shape[1] + c).reshape(-1, 1)  # [c, r] raveled: k = c*w + r


def _top_left(shape: tuple[int, int], w: int) -> np.ndarray:
    """Flat index of the top-left pixel of every window, in row-major window order."""
    h, v = shape[0] - w + 1, shape[1] - w + 1
    return (np.arange(h)[:, None] * shape[1] + np.arange(v)).ravel()


def _minmax(win: np.ndarray) -> np.ndarray:
    """Min-max normalisation of each window (column); a flat window becomes all ones."""
    hi, lo = win.max(axis=0), win.min(axis=0)
    span = hi - lo
    flat = span == 0
    out = win - lo
    if flat.any():
        span[flat] = 1.0
        out /= span
        out[:, flat] = 1.0
    else:
        out /= span
    return out


_TINY = np.finfo(np.float64).tiny


def _log_abs(p: np.ndarray) -> np.ndarray:
    """``ln |p|``, finite for p = 0 (ln of the smallest normal float), so ``p * _log_abs(p)``
    is 0 there: MATLAB skips zero cells. A tiny negative p from rounding gives a complex log in
    MATLAB whose real part is ``ln |p|``. Natural logs: FMI = 2 I / (H_S + H_F) does not depend
    on the base, and NumPy's ``log`` is several times faster than ``log2``."""
    out = np.abs(p)
    np.maximum(out, _TINY, out=out)
    return np.log(out, out=out)


def _neg_xlogx(p: np.ndarray) -> np.ndarray:
    """``-p ln |p|``, 0 for p = 0."""
    out = _log_abs(p)
    out *= p
    return np.negative(out, out=out)


@dataclass(frozen=True)
class _Marginal:
    """One side's window PDFs and CDFs, (l + 1, m) tables for the staircase's look-ups, and the
    per-window statistics (m,) the joint needs."""

    pdf_ext: np.ndarray  # the PDF, then its last row again (the cell past the end)
    cdf_ext: np.ndarray  # 0, then the CDF (the point before each cell)
    cdf_sum: np.ndarray  # sum of the CDF values
    centred: np.ndarray  # pdf minus its mean
    centred_ss: np.ndarray  # sum of squares of `centred`
    sd: np.ndarray  # population sd of the window position index under `pdf`
    entropy: np.ndarray  # nats
    total: np.ndarray  # sum of pdf (1 up to rounding)

    @property
    def pdf(self) -> np.ndarray:
        return self.pdf_ext[:-1]

    @property
    def cdf(self) -> np.ndarray:
        return self.cdf_ext[1:]


def _marginal(normalised: np.ndarray, w: int) -> _Marginal:
    size, m = normalised.shape
    pdf_ext = np.empty((size + 1, m))
    pdf = np.divide(normalised, _matlab_sum2(normalised, w), out=pdf_ext[:-1])
    pdf_ext[-1] = pdf[-1]
    total = _sum_rows(pdf)
    centred = pdf - total / size
    index = np.arange(1, size + 1, dtype=np.float64)[:, None]
    weighted = index * pdf
    mean = _sum_rows(weighted)
    weighted *= index
    # Clipped at 0: only a one-point PDF has zero spread, and there both moments are exact.
    sd = np.sqrt(np.maximum(_sum_rows(weighted) - mean * mean, 0.0))
    cdf_ext = np.empty((size + 1, m))
    cdf_ext[0] = 0.0
    cdf_ext[1:] = _cumsum(pdf)
    return _Marginal(
        pdf_ext=pdf_ext,
        cdf_ext=cdf_ext,
        cdf_sum=cdf_ext.sum(axis=0),
        centred=centred,
        centred_ss=_sum_rows(centred * centred),
        sd=sd,
        entropy=_sum_rows(_neg_xlogx(pdf)),
        total=total,
    )


def _columns(x: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Columns `cols` of x as a C-ordered array (``x[:, cols]`` comes out column-major, which
    makes every later row operation strided and several times slower)."""
    return np.take(x, cols, axis=-1)


def _take(m: _Marginal, cols: np.ndarray) -> _Marginal:
    return _Marginal(*(_columns(getattr(m, f), cols) for f in _Marginal.__dataclass_fields__))


def _gather(table: np.ndarray, flat_index: np.ndarray) -> np.ndarray:
    # A flat take is several times faster than take_along_axis on these small blocks.
    return np.take(table.ravel(), flat_index)


@dataclass(frozen=True)
class _Staircase:
    """The cells carrying a Fréchet bound's mass, one per point of the merged CDFs, in two
    halves of l rows: the segments ending at a point of F, and those ending at a break B_t."""

    len_f: np.ndarray  # mass of the segment ending at F_i ...
    s_at_f: np.ndarray  # ... and the source PDF of its cell (the fused one is pdf_F[i])
    len_b: np.ndarray  # mass of the segment ending at B_t ...
    f_at_b: np.ndarray  # ... and the fused PDF of its cell
    s_at_b: np.ndarray  # source PDF of the cell of B_t (the source PDF in merge order)
    bound_sum: np.ndarray  # sum over all l² cells of the bound's CDF, C(F_i, S_j)


def _staircase(f: _Marginal, s: _Marginal, upper: np.ndarray) -> _Staircase:
    """Merge the fused CDF F with the source CDF S (windows where `upper`: the bound U = V) or
    with its mirror image 1 - S (lower bound: V = 1 - U). Between two consecutive merged
    points both CDFs stay in one cell, so each segment is the bound's mass on one cell.

    The merge is a count rather than a sort (both lists are already sorted): in the stable
    merge of [F; B], F_i comes after the c_i = #{t: B_t < F_i} breaks below it and B_t after
    the d_t = #{i: F_i <= B_t} points of F, and the point before each one is the larger of
    its predecessor in its own list and the last point of the other list before it."""
    cells, m = f.cdf.shape
    # Tables indexed by a count 0..l, as in _Marginal: the break before (0, then the breaks),
    # and the source cell in merge order (its last cell repeated past the end).
    b_ext = np.empty((cells + 1, m))
    np.subtract(1.0, s.cdf[-2::-1], out=b_ext[1:-1])  # upper ends of the mirrored cells
    b_ext[0], b_ext[-1] = 0.0, 1.0
    s_ext = np.empty((cells + 1, m))
    s_ext[:-1], s_ext[-1] = s.pdf[::-1], s.pdf[0]
    np.copyto(b_ext, s.cdf_ext, where=upper)
    np.copyto(s_ext, s.pdf_ext, where=upper)
    breaks = b_ext[1:]
    below = (breaks[None, :, :] < f.cdf[:, None, :]).view(np.uint8)  # [i, t]: B_t < F_i
    c = np.add.reduce(below, axis=1, dtype=np.uint8)  # 0..l
    d = cells - np.add.reduce(below, axis=0, dtype=np.uint8)
    column = np.arange(m)
    at_c, at_d = c.astype(np.intp), d.astype(np.intp)  # to flat indices into the tables
    at_c *= m
    at_c += column
    at_d *= m
    at_d += column
    # Segment ending at F_i: fused cell i, merge-order source cell c_i. Past a list's end
    # (both CDFs at 1, length ~1e-16) the tables repeat the last cell.
    len_f = f.cdf - np.maximum(f.cdf_ext[:-1], _gather(b_ext, at_c))
    # Segment ending at B_t: fused cell d_t, merge-order source cell t.
    len_b = breaks - np.maximum(b_ext[:-1], _gather(f.cdf_ext, at_d))
    # Sum of C over all cells: each segment's mass times #{F_i' >= u} * #{S_j' >= v}; in source
    # order the second count is l - j_merge for the upper bound, 1 + j_merge for the lower.
    position = np.arange(cells, dtype=np.float64)[:, None]
    j_f = np.minimum(c, cells - 1).astype(np.float64)
    above_f = np.where(upper, cells - j_f, 1.0 + j_f)
    above_f *= cells - position
    above_b = np.where(upper, cells - position, 1.0 + position)
    above_b *= (cells - np.minimum(d, cells - 1)).astype(np.float64)
    above_f *= len_f
    above_b *= len_b
    bound_sum = np.sum(above_f, axis=0) + np.sum(above_b, axis=0)
    return _Staircase(
        len_f=len_f,
        s_at_f=_gather(s_ext, at_c),
        len_b=len_b,
        f_at_b=_gather(f.pdf_ext, at_d),
        s_at_b=s_ext[:-1],
        bound_sum=bound_sum,
    )


def _mixed_correction(
    weight: np.ndarray,
    rest: np.ndarray,
    length: np.ndarray,
    f_pdf: np.ndarray,
    s_pdf: np.ndarray,
) -> np.ndarray:
    """Sum over cells of ``-p ln|p| + q ln|q|``, p = weight * length + q, q = rest * f * s:
    how much the bound's mass on these cells changes the independent part's entropy."""
    q = rest * f_pdf
    q *= s_pdf
    p = weight * length
    p += q
    return np.sum(_neg_xlogx(p), axis=0) - np.sum(_neg_xlogx(q), axis=0)


def _joint_entropy(f: _Marginal, s: _Marginal, corr: np.ndarray) -> np.ndarray:
    """Entropy (nats) of Nelsen's joint: w * Fréchet bound + (1 - w) * independence, with
    w = corr / (correlation of the bound), the upper bound for corr >= 0, else the lower."""
    upper = corr >= 0
    st = _staircase(f, s, upper)
    cov = st.bound_sum - f.cdf_sum * s.cdf_sum
    degenerate = (f.sd == 0) | (s.sd == 0) | (upper & (corr == 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = np.where(degenerate, 0.0, corr / (cov / (f.sd * s.sd)))
    rest = 1.0 - weight
    log_rest = _log_abs(rest)  # finite at rest = 0, where every term it enters is 0
    # Entropy of the independent part summed over all l² cells, in closed form ...
    independent = rest * (s.total * f.entropy + f.total * s.entropy - log_rest * f.total * s.total)
    # ... corrected on the cells where the bound puts mass.
    return (
        independent
        + _mixed_correction(weight, rest, st.len_f, f.pdf, st.s_at_f)
        + _mixed_correction(weight, rest, st.len_b, st.f_at_b, st.s_at_b)
    )


def _side_fmi(f: _Marginal, s: _Marginal) -> np.ndarray:
    """Normalised MI between the fused and one source's window PDFs, per window."""
    cross = _sum_rows(s.centred * f.centred)
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = np.where(cross == 0, 0.0, cross / np.sqrt(s.centred_ss * f.centred_ss))
    mi = s.entropy + f.entropy - _joint_entropy(f, s, corr)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mi == 0, 0.0, 2.0 * mi / (s.entropy + f.entropy))


# Above this share of windows equal to the fused one, a side drops them before scoring.
_COMPACT_SHARE = 0.05
# Windows scored per block (for 3 x 3 windows; scaled down for larger ones): 4,500 to 10,000
# ran equally fast here, 3,000 was 10-15 % slower (more NumPy calls per window); larger blocks
# only hold more memory.
_CHUNK = 6000


def _side_sum(f: _Marginal, src: np.ndarray, equal: np.ndarray, w: int) -> float:
    """Sum over a block of windows of FMI(F, S) for one source S, leaving out the windows
    equal to the fused one (the toolbox gives those 1; the caller counts them)."""
    if not equal.any():
        return float(np.sum(_side_fmi(f, _marginal(_minmax(src), w))))
    if equal.mean() <= _COMPACT_SHARE:
        scores = _side_fmi(f, _marginal(_minmax(src), w))
        return float(np.sum(scores, where=~equal))
    cols = np.flatnonzero(~equal)
    if not cols.size:
        return 0.0
    return float(np.sum(_side_fmi(_take(f, cols), _marginal(_minmax(_columns(src, cols)), w))))


def _block_sum(maps: tuple[np.ndarray, ...], top_left: np.ndarray, w: int) -> tuple[float, int]:
    """For the windows with these top-left pixels: the sum of FMI(F,A) + FMI(F,B) over the
    sides not equal to the fused window, and the number of sides that are (they score 1)."""
    index = top_left + _window_offsets(maps[2].shape, w)
    a, b, f = (np.take(x.ravel(), index) for x in maps)
    equal_a = np.all(a == f, axis=0)
    f_norm = _minmax(f)
    # MATLAB normalises fSub in place on the A side, so B is compared with the normalised one.
    equal_b = np.all(b == np.where(equal_a, f, f_norm), axis=0)
    f_marg = _marginal(f_norm, w)
    total = _side_sum(f_marg, a, equal_a, w) + _side_sum(f_marg, b, equal_b, w)
    return total, int(np.count_nonzero(equal_a) + np.count_nonzero(equal_b))


def fmi_of_features(fa: np.ndarray, fb: np.ndarray, ff: np.ndarray, window: int = 3) -> float:
    """Fast-FMI of three precomputed feature maps: the mean over windows of
    ``(FMI(F,A) + FMI(F,B)) / 2``, computed as (sum of the A sides + sum of the B sides) / 2n."""
    if window < 3 or window % 2 == 0 or window > 99:
        raise ValueError(f"FMI window must be odd, from 3 to 99 (the toolbox's 2w+1), got {window}")
    if min(ff.shape) < window:
        raise ValueError(f"FMI: image {ff.shape} smaller than the {window} x {window} window")
    keep_freed_memory()  # per-block temporaries stay mapped: about 2x faster here
    maps = tuple(np.ascontiguousarray(x, dtype=np.float64) for x in (fa, fb, ff))
    top_left = _top_left(ff.shape, window)
    n = len(top_left)
    # Windows where A and B both equal F score 1 + 1 and need no further work (e.g. the blank
    # parts of edge maps). Where A equals F, MATLAB leaves fSub as it is, so B meets raw F.
    both_equal = _windows_equal(maps[0], maps[2], window) & _windows_equal(maps[1], maps[2], window)
    total, ones = 0.0, 2 * int(np.count_nonzero(both_equal))
    if ones:
        top_left = top_left[~both_equal]
    step = max(1, _CHUNK * 9 // window**2)
    for start in range(0, len(top_left), step):
        block_total, block_ones = _block_sum(maps, top_left[start : start + step], window)
        total += block_total
        ones += block_ones
    return (total + ones) / (2 * n)


def fmi(
    fused: np.ndarray, a: np.ndarray, b: np.ndarray, feature: str = "dct", window: int = 3
) -> float:
    """FMI of a fused image against sources A and B: mean over windows of
    ``(FMI(F,A) + FMI(F,B)) / 2`` on the chosen feature (Haghighat et al. 2011; fast version,
    Haghighat & Razian 2014). Inputs are grey images on 0..255; no constant-image check here
    (the caller, medfuse.metrics.core, returns NaN for those)."""
    maps = [feature_map(x, feature) for x in (a, b, fused)]
    return fmi_of_features(*maps, window=window)

"""Score fused images: one pair in memory (`evaluate_pair`), or a folder against a test split.

`evaluate_images` is the convention-aware entry point: it takes the images in their stored form
(fused grey or RGB, functional grey or RGB, MRI grey) and lets the named convention decide how
colour becomes grey and which images PSNR_paper compares. `evaluate_pair` is the stable,
convention-free entry point for grey arrays (the `standard` set).

`medfuse evaluate` (evaluate_from_args) scores every fused image of a folder against the
prepared test sources and writes, atomically:
    <prefix>.csv          one row per test pair (column `name`, then one column per metric)
    <prefix>.summary.csv  mean and std per metric over the test pairs
    <prefix>.json         flat {metric: mean, metric_std: std}, for `dvc metrics show`
The std is the population one (ddof 0): it reproduces the paper's ± values; ddof 1 does not.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medfuse.data.prepared import PreparedData
from medfuse.errors import DataError
from medfuse.io import read_image, write_text_atomic
from medfuse.metrics import core
from medfuse.metrics.conventions import Convention, get_convention, to_grey
from medfuse.plan import job_of_fused_dir

log = logging.getLogger(__name__)

FMI_COLUMNS = {
    "pixel": "FMI_pixel",
    "gradient": "FMI_gradient",
    "edge": "FMI_edge",
    "dct": "FMI_dct",
    "wavelet": "FMI_w",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class PairImages:
    """One fused image and its two sources, ready for every metric (all the same H x W)."""

    f: np.ndarray  # grey, float64 on 0..255
    a: np.ndarray
    b: np.ndarray
    f_levels: np.ndarray  # the same as uint8 grey levels (EN, MI)
    a_levels: np.ndarray
    b_levels: np.ndarray
    f_stored: np.ndarray  # the images PSNR_paper compares (RGB where the convention says so)
    a_stored: np.ndarray
    b_stored: np.ndarray


def _psnr(x: PairImages, c: Convention) -> float:
    peak = float(x.f.max()) if c.psnr_peak == "fused_max" else 255.0
    return core.psnr(x.f, x.a, x.b, peak=peak)


def _fmi(feature: str) -> Callable[[PairImages, Convention], float]:
    return lambda x, c: core.fmi(x.f, x.a, x.b, feature=feature)


# The one table from metric name to code; a convention only fills in the arguments.
METRICS: dict[str, Callable[[PairImages, Convention], float]] = {
    "EN": lambda x, c: core.entropy(x.f_levels, base=c.log_base),
    "MI": lambda x, c: core.mutual_information(
        x.f_levels, x.a_levels, x.b_levels, base=c.log_base, combine=c.combine_rule("MI")
    ),
    "CC": lambda x, c: core.correlation(x.f, x.a, x.b, combine=c.combine_rule("CC")),
    "PSNR_paper": lambda x, c: core.psnr_paper(x.f_stored, x.a_stored, x.b_stored),
    "PSNR": _psnr,
    **{column: _fmi(feature) for feature, column in FMI_COLUMNS.items()},
    "SSIM": lambda x, c: core.ssim(
        x.f, x.a, x.b, data_range=c.ssim_data_range, combine=c.combine_rule("SSIM")
    ),
    "Qabf": lambda x, c: core.qabf(x.f, x.a, x.b),
    "VIF": lambda x, c: core.vif(x.f, x.a, x.b, combine=c.combine_rule("VIF")),
    "SD": lambda x, c: core.sd(x.f),
    "SF": lambda x, c: core.sf(x.f),
    "AG": lambda x, c: core.ag(x.f),
    "SCD": lambda x, c: core.scd(x.f, x.a, x.b),
}
METRIC_NAMES = tuple(METRICS)


# ----------------------------------------------------------------------------- inputs
def _as_8bit_values(image: np.ndarray, label: str) -> np.ndarray:
    """A uint8 image, or a float one on 0..255, as float64; anything else is a DataError."""
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array.astype(np.float64)
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise DataError(f"{label}: expected 8-bit values (uint8 or float), got {array.dtype}")
    values = array.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise DataError(f"{label}: contains NaN or infinite values")
    if values.size and (values.min() < 0 or values.max() > 255):
        lo, hi = values.min(), values.max()
        raise DataError(f"{label}: values must lie in [0, 255], got [{lo:g}, {hi:g}]")
    return values


def _levels(values: np.ndarray) -> np.ndarray:
    # Histogram metrics need integer grey levels: float input is rounded to the nearest level.
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _check_same_size(images: Mapping[str, np.ndarray]) -> None:
    sizes = {label: np.asarray(x).shape[:2] for label, x in images.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{label} is {h} x {w}" for label, (h, w) in sizes.items())
        raise DataError(f"size mismatch: {listed}")


def _check_grey(image: np.ndarray, label: str) -> None:
    if np.asarray(image).ndim != 2:
        raise DataError(f"{label}: expected a 2-D grey image, got shape {np.shape(image)}")


def _check_stored(image: np.ndarray, label: str) -> None:
    shape = np.shape(image)
    if not (len(shape) == 2 or (len(shape) == 3 and shape[2] in (3, 4))):
        raise DataError(f"{label}: expected a grey (H, W) or RGB (H, W, 3) image, got {shape}")


def pair_images(
    fused: np.ndarray,
    functional: np.ndarray,
    mri: np.ndarray,
    convention: Convention,
    labels: tuple[str, str, str] = ("fused", "functional", "MRI"),
) -> PairImages:
    """Validate the stored-form images and derive what each metric reads under `convention`."""
    for image, label in zip((fused, functional, mri), labels, strict=True):
        _check_stored(image, label)
    _check_same_size(dict(zip(labels, (fused, functional, mri), strict=True)))
    stored = [
        _as_8bit_values(x, label)[..., :3] if np.ndim(x) == 3 else _as_8bit_values(x, label)
        for x, label in zip((fused, functional, mri), labels, strict=True)
    ]
    rules = (convention.fused_grey, convention.source_grey, convention.source_grey)
    f, a, b = (_grey(x, rule) for x, rule in zip(stored, rules, strict=True))
    if convention.psnr_paper_stored:
        f_stored, a_stored, b_stored = _broadcastable(stored)
    else:
        f_stored, a_stored, b_stored = f, a, b
    return PairImages(
        f=f,
        a=a,
        b=b,
        f_levels=_levels(f),
        a_levels=_levels(a),
        b_levels=_levels(b),
        f_stored=f_stored,
        a_stored=a_stored,
        b_stored=b_stored,
    )


def _grey(values: np.ndarray, rule: str) -> np.ndarray:
    if values.ndim == 2:
        return values
    return to_grey(_levels(values), rule).astype(np.float64)


def _broadcastable(images: list[np.ndarray]) -> list[np.ndarray]:
    """Grey images as (H, W, 1) beside colour ones, so F - B broadcasts over the channels
    (MATLAB subtracts the 2-D MRI from each plane of the 3-D fused image)."""
    if all(x.ndim == 2 for x in images):
        return images
    return [x[..., None] if x.ndim == 2 else x for x in images]


# ----------------------------------------------------------------------------- one pair
def metric_values(
    images: PairImages, convention: Convention, names: Iterable[str] = METRIC_NAMES
) -> dict[str, float]:
    return {name: float(METRICS[name](images, convention)) for name in names}


def evaluate_images(
    fused: np.ndarray,
    functional: np.ndarray,
    mri: np.ndarray,
    convention: str | Convention = "standard",
    labels: tuple[str, str, str] = ("fused", "functional", "MRI"),
    names: Iterable[str] = METRIC_NAMES,
) -> dict[str, float]:
    """All metrics of one fused image, from images in their stored form (grey or RGB uint8,
    or float on 0..255), under a named convention (standard, paper, cddfuse)."""
    conv = get_convention(convention)
    return metric_values(pair_images(fused, functional, mri, conv, labels), conv, names)


def evaluate_pair(a: np.ndarray, b: np.ndarray, fused: np.ndarray) -> dict[str, float]:
    """All metrics of `fused` against sources `a` (CT / functional luma) and `b` (MRI): 2-D grey
    arrays of 8-bit values (uint8, or float on 0..255), `standard` convention. Keys: EN, MI,
    CC, PSNR_paper, PSNR, FMI_pixel, FMI_gradient, FMI_edge, FMI_dct, FMI_w, SSIM, Qabf, VIF,
    SD, SF, AG, SCD (docs/metrics.md)."""
    for image, label in ((a, "A"), (b, "B"), (fused, "fused")):
        _check_grey(image, label)
    return evaluate_images(fused, a, b, "standard", labels=("fused", "A", "B"))


# ----------------------------------------------------------------------------- a folder
def fused_files(folder: Path, kind: str = "fused") -> dict[str, Path]:
    """Images directly in `folder` by name (sub-folders such as y/ are not read); `kind` names
    them in errors (fused, source)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: {kind}-image folder not found")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    by_name: dict[str, Path] = {}
    for path in sorted(files):
        if path.stem in by_name:
            other = by_name[path.stem].name
            raise DataError(f"{path}: two {kind} images named {path.stem!r} ({other})")
        by_name[path.stem] = path
    return by_name


def match_test_names(folder: Path, test_names: list[str]) -> dict[str, Path]:
    """The fused image of every test pair; a missing or an extra image is a DataError."""
    files = fused_files(folder)
    missing = [n for n in test_names if n not in files]
    extra = sorted(set(files) - set(test_names))
    if missing:
        shown = ", ".join(f"{n}.png" for n in missing[:10])
        count = len(missing)
        raise DataError(f"{folder}: missing fused image(s) for {count} test pair(s): {shown}")
    if extra:
        shown = ", ".join(files[n].name for n in extra[:10])
        raise DataError(f"{folder}: {len(extra)} fused image(s) match no test pair: {shown}")
    return {n: files[n] for n in test_names}


def evaluate_many(
    triples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    convention: str | Convention = "standard",
    names: Iterable[str] = METRIC_NAMES,
    labels: Sequence[tuple[str, str, str]] | None = None,
    jobs: int = 1,
) -> list[dict[str, float]]:
    """`evaluate_images` of many (fused, functional, MRI) triples, in order; `jobs` > 1 scores
    them in that many worker processes (the same numbers)."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    conv, names = get_convention(convention), list(names)
    labels = labels or [("fused", "functional", "MRI")] * len(triples)
    tasks = [(*images, conv, label, names) for images, label in zip(triples, labels, strict=True)]
    if jobs == 1 or len(tasks) < 2:
        return [_score(task) for task in tasks]
    # Workers fork from a server process that imported the metrics once: no import cost per
    # worker, and no fork of this (possibly multi-threaded) process.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context) as pool:
        return list(pool.map(_score, tasks))


def _score(task: tuple[Any, ...]) -> dict[str, float]:
    return evaluate_images(*task)


def evaluate_folder(
    fused_dir: Path,
    prepared: PreparedData,
    pair: str,
    convention: str | Convention,
    names: Iterable[str] = METRIC_NAMES,
    jobs: int = 1,
) -> pd.DataFrame:
    """Per-test-pair metrics of every fused image in `fused_dir` (one row per test pair).
    Every image is read and checked before any is scored."""
    rows = prepared.rows(pair, "test")
    paths = match_test_names(Path(fused_dir), [str(n) for n in rows["name"]])
    names = list(names)
    read = [_read_test_pair(prepared, row, paths) for _, row in rows.iterrows()]
    return _score_table(read, list(rows["name"]), convention, names, jobs)


def _score_table(
    read: list[tuple[tuple[np.ndarray, np.ndarray, np.ndarray], tuple[str, str, str]]],
    row_names: list[str],
    convention: str | Convention,
    names: list[str],
    jobs: int,
) -> pd.DataFrame:
    """One row per read (images, labels) pair: `name`, then one column per metric."""
    triples, labels = [images for images, _ in read], [label for _, label in read]
    scores = evaluate_many(triples, convention, names, labels, jobs)
    records = [{"name": name, **values} for name, values in zip(row_names, scores, strict=True)]
    return pd.DataFrame.from_records(records, columns=["name", *names])


def _read_test_pair(
    prepared: PreparedData, row: pd.Series, paths: Mapping[str, Path]
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], tuple[str, str, str]]:
    """(fused, functional, MRI) of one test pair in their stored form, and their file names."""
    sample = prepared.load(row)
    functional = sample.a_rgb if sample.a_rgb is not None else sample.a
    source = prepared.root / (row["a_rgb"] or row["a"])
    return _with_fused(paths[sample.name], functional, sample.b, source, prepared.root / row["b"])


def _with_fused(
    fused_path: Path, functional: np.ndarray, mri: np.ndarray, a_path: Path, b_path: Path
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], tuple[str, str, str]]:
    """The fused image read beside its sources; a size mismatch names the files."""
    fused = read_image(fused_path)
    height, width = mri.shape[:2]
    if functional.shape[:2] != mri.shape[:2]:
        h, w = functional.shape[:2]
        raise DataError(f"{a_path}: size {w} x {h} differs from {b_path} ({width} x {height})")
    if fused.shape[:2] != mri.shape[:2]:
        h, w = fused.shape[:2]
        raise DataError(
            f"{fused_path}: size {w} x {h} differs from its sources "
            f"{a_path} and {b_path} ({width} x {height})"
        )
    return (fused, functional, mri), (str(fused_path), str(a_path), str(b_path))


# ----------------------------------------------------------------------------- own sources
def match_own_sources(fused_dir: Path, a_dir: Path, b_dir: Path) -> list[tuple[Path, Path, Path]]:
    """(fused, A, B) paths matched by file name stem: every fused image needs both sources
    (a missing one is a DataError naming it); sources without a fused image are not scored."""
    fused = fused_files(Path(fused_dir))
    if not fused:
        raise DataError(f"{fused_dir}: no fused images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    a_files, b_files = (fused_files(Path(d), "source") for d in (a_dir, b_dir))
    triples, missing = [], []
    for name, path in fused.items():
        found = [files.get(name) for files in (a_files, b_files)]
        missing += [f"{d}/{name}.*" for d, f in zip((a_dir, b_dir), found, strict=True) if not f]
        if all(found):
            triples.append((path, *found))
    if missing:
        shown = ", ".join(missing[:10])
        raise DataError(f"{fused_dir}: {len(missing)} source image(s) missing: {shown}")
    return triples


def evaluate_own_folder(
    fused_dir: Path,
    a_dir: Path,
    b_dir: Path,
    convention: str | Convention,
    names: Iterable[str] = METRIC_NAMES,
    jobs: int = 1,
) -> pd.DataFrame:
    """Per-image metrics of the fused images in `fused_dir` against the same-named sources in
    `a_dir` (CT, or the functional image, grey or RGB) and `b_dir` (MRI, grey)."""
    matched = match_own_sources(fused_dir, a_dir, b_dir)
    read = [_with_fused(f, read_image(a), read_image(b, mode="L"), a, b) for f, a, b in matched]
    return _score_table(read, [f.stem for f, _, _ in matched], convention, list(names), jobs)


def mean_std(values: pd.Series, ddof: int = 0) -> tuple[float, float]:
    """Mean and std over test pairs (population by default, as the paper's tables): the one
    summary of the evaluation files and the report. A pair whose score is undefined (NaN) makes
    both NaN: a mean over the other pairs would silently score a different test set."""
    values = values.astype(float)
    with np.errstate(invalid="ignore"):  # inf - inf inside the std of an infinite column
        return float(values.mean(skipna=False)), float(values.std(ddof=ddof, skipna=False))


def summarise(per_pair: pd.DataFrame, ddof: int = 0) -> pd.DataFrame:
    """`mean_std` of every metric column."""
    values = per_pair.drop(columns=["name"])
    rows = {metric: mean_std(values[metric], ddof) for metric in values.columns}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["mean", "std"])
    table.index.name = "metric"
    return table


def summary_json(summary: pd.DataFrame) -> dict[str, float]:
    flat: dict[str, float] = {}
    for metric, row in summary.iterrows():
        flat[str(metric)] = float(row["mean"])
        flat[f"{metric}_std"] = float(row["std"])
    return flat


def write_results(prefix: Path, per_pair: pd.DataFrame, summary: pd.DataFrame) -> list[Path]:
    """<prefix>.csv, <prefix>.summary.csv and <prefix>.json, each written atomically.
    Non-finite values are written as inf / NaN (JSON: Infinity / NaN, which DVC reads)."""
    prefix = Path(prefix)
    paths = [
        prefix.with_name(prefix.name + ".csv"),
        prefix.with_name(prefix.name + ".summary.csv"),
        prefix.with_name(prefix.name + ".json"),
    ]
    write_text_atomic(paths[0], per_pair.to_csv(index=False, float_format="%.10g"))
    write_text_atomic(paths[1], summary.to_csv(float_format="%.10g"))
    write_text_atomic(paths[2], json.dumps(summary_json(summary), indent=2) + "\n")
    return paths


def format_summary(summary: pd.DataFrame, title: str) -> str:
    lines = [title, f"{'metric':<14}{'mean':>12}   {'std':<10}"]
    for metric, row in summary.iterrows():
        lines.append(f"{metric!s:<14}{row['mean']:>12.4f} ± {row['std']:<10.4f}")
    return "\n".join(lines)


def log_to_active_run(summary: pd.DataFrame, convention: str) -> bool:
    """Log the summary to the active MLflow run, if the calling process started one.
    MLflow is only consulted when already imported: nothing here starts a run."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None or mlflow.active_run() is None:
        return False
    mlflow.log_metrics({f"{convention}/{k}": v for k, v in summary_json(summary).items()})
    return True


def log_evaluation_run(
    params: Mapping[str, Any],
    fused_dir: Path,
    pair: str,
    convention: str,
    summary: pd.DataFrame,
    paths: list[Path],
) -> None:
    """One MLflow run per evaluation, tagged like the training and fusion runs it scores."""
    from medfuse.tracking import start_run

    parts = fused_dir.parts
    in_layout = len(parts) >= 4 and parts[-4] == "fused"
    method, variant = (parts[-3], parts[-1]) if in_layout else (str(fused_dir), "-")
    values = {f"{convention}/{k}": v for k, v in summary_json(summary).items() if math.isfinite(v)}
    with start_run(
        params,
        step="evaluate",
        method=method,
        pair=pair,
        variant=variant,
        log_all_params=False,
        tags={"convention": convention},
    ) as run:
        run.set_tags({"fused_dir": str(fused_dir)})
        run.log_params({"convention": convention})
        run.log_metrics(values, step=0)
        for path in paths:
            run.log_artifact(path, "metrics")


def default_prefix(fused_dir: Path, pair: str, convention: str) -> Path:
    """results/fused/<method>/<pair>/<variant> ->
    results/metrics/<convention>/<method>/<pair>/<variant> (medfuse.plan.Job.metrics_stem)."""
    job = job_of_fused_dir(fused_dir)
    if job.pair != pair:
        raise DataError(f"{fused_dir}: folder is for {job.pair}, but --pair is {pair}")
    return job.metrics_stem(convention)


OWN_SOURCES = "own-sources"  # the MLflow experiment of evaluations against --sources


def evaluate_from_args(params: Mapping[str, Any], args: Any) -> pd.DataFrame:
    """`medfuse evaluate (--pair PAIR | --sources A_DIR B_DIR) --fused DIR [--convention NAME]
    [--out PREFIX] [--jobs N]`."""
    convention = args.convention or params["evaluate"]["convention"]
    try:
        conv = get_convention(convention)
    except ValueError as exc:
        raise DataError(f"--convention: {exc}") from exc
    fused_dir = Path(args.fused)
    if args.sources:
        a_dir, b_dir = (Path(x) for x in args.sources)
        beside = fused_dir.resolve()  # `--fused .` has no name of its own
        prefix = Path(args.out) if args.out else beside.with_name(f"{beside.name}-{conv.name}")
        per_pair = evaluate_own_folder(fused_dir, a_dir, b_dir, conv, jobs=args.jobs)
        pair, about = OWN_SOURCES, f"images against {a_dir} and {b_dir}"
    else:
        prepared = PreparedData(params["data"]["prepare"]["out_dir"])
        prefix = Path(args.out) if args.out else default_prefix(fused_dir, args.pair, conv.name)
        per_pair = evaluate_folder(fused_dir, prepared, args.pair, conv, jobs=args.jobs)
        pair, about = args.pair, "test pairs"
    summary = summarise(per_pair, ddof=conv.std_ddof)
    paths = write_results(prefix, per_pair, summary)
    title = f"{pair}: {len(per_pair)} {about}, {fused_dir}, convention {conv.name}"
    print(format_summary(summary, title))
    if log_to_active_run(summary, conv.name):
        log.info("logged the summary to the active MLflow run")
    else:
        log_evaluation_run(params, fused_dir, pair, conv.name, summary, paths)
    log.info("wrote %s", ", ".join(str(p) for p in paths))
    _warn_undefined(summary)
    return per_pair


def _warn_undefined(summary: pd.DataFrame) -> None:
    undefined = [str(m) for m, v in summary["mean"].items() if math.isnan(v)]
    if undefined:
        log.warning("undefined (NaN) for some pairs: %s", ", ".join(undefined))

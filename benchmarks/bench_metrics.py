"""Benchmark: every metric on the 24 CT-MRI test pairs; seconds per pair per metric, total,
and peak memory. A script that prints figures, not a timed test.

    python benchmarks/bench_metrics.py [--prepared data/prepared] [--fused DIR] [--jobs 2]
                                       [--repeat 3]

Sources come from the prepared test split (or, if it is missing, straight from the AANLIB
mirror in ../shared); the fused images are DIR/<name>.png (e.g. the published ASFE-Fusion
images), else the rounded average of the two sources. `--repeat N` keeps the fastest of N
passes per metric. The whole set is also timed through `evaluate_many` in one process and in
`--jobs N` (default 2) worker processes, as `medfuse evaluate --jobs N` scores a folder.
The machine load is printed beside the figures.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
import tracemalloc
from pathlib import Path

import numpy as np

from medfuse.data.prepared import PreparedData
from medfuse.io import read_image
from medfuse.metrics.conventions import get_convention
from medfuse.metrics.evaluate import (
    FMI_COLUMNS,
    METRICS,
    PairImages,
    evaluate_many,
    pair_images,
)
from medfuse.metrics.fmi import feature_map

PAIR = "CT-MRI"
MIRROR = Path(__file__).resolve().parents[2] / "shared" / "data" / "aanlib"


def load_sources(prepared: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    if (prepared / "manifest.csv").is_file():
        return [(s.name, s.a, s.b) for s in PreparedData(prepared).samples(PAIR, "test")]
    test = MIRROR / "MyDatasets" / PAIR / "test"
    print(f"(no {prepared}/manifest.csv: reading the sources from {test})")
    return [
        (p.stem, read_image(p, mode="L"), read_image(test / "MRI" / p.name, mode="L"))
        for p in sorted((test / "CT").glob("*.png"))
    ]


def load_pairs(prepared: Path, fused_dir: Path | None) -> list[PairImages]:
    convention = get_convention("standard")
    pairs = []
    for name, a, b in load_sources(prepared):
        if fused_dir is None:
            fused = np.rint((a.astype(float) + b) / 2).astype(np.uint8)
        else:
            fused = read_image(fused_dir / f"{name}.png")
        pairs.append(pair_images(fused, a, b, convention))
    return pairs


def time_per_metric(pairs: list[PairImages], repeat: int = 1) -> dict[str, float]:
    """Seconds per metric for all pairs; with `repeat` > 1 the fastest of that many passes
    (the machine is shared: the minimum is the least disturbed figure)."""
    convention = get_convention("standard")
    seconds = {}
    for name, metric in METRICS.items():
        passes = []
        for _ in range(repeat):
            start = time.perf_counter()
            for images in pairs:
                metric(images, convention)
            passes.append(time.perf_counter() - start)
        seconds[name] = min(passes)
    return seconds


def peak_traced_bytes(images: PairImages) -> dict[str, int]:
    """Peak bytes allocated while one metric runs on one pair (tracemalloc sees NumPy's)."""
    convention = get_convention("standard")
    peaks = {}
    for name, metric in METRICS.items():
        tracemalloc.start()
        metric(images, convention)
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peaks


def time_evaluate_many(pairs: list[PairImages], jobs: int) -> float:
    """Wall seconds of the product's path (`evaluate_many`, as `medfuse evaluate --jobs N`),
    worker start-up included."""
    triples = [(p.f_stored, p.a_stored, p.b_stored) for p in pairs]
    start = time.perf_counter()
    evaluate_many(triples, "standard", jobs=jobs)
    return time.perf_counter() - start


def fmi_windows(pairs: list[PairImages]) -> dict[str, int]:
    """3 x 3 windows per FMI variant over all pairs (the wavelet tiles are larger than the
    image)."""
    counts = {}
    for feature, column in FMI_COLUMNS.items():
        shapes = [feature_map(p.f, feature).shape for p in pairs]
        counts[column] = sum((h - 2) * (w - 2) for h, w in shapes)
    return counts


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--fused", type=Path, default=None, help="folder of fused <name>.png")
    parser.add_argument("--jobs", type=int, default=2, help="also time N worker processes")
    parser.add_argument("--repeat", type=int, default=1, help="fastest of N passes per metric")
    args = parser.parse_args()

    pairs = load_pairs(args.prepared, args.fused)
    n = len(pairs)
    fused_from = args.fused or "average of the sources"
    print(
        f"{n} {PAIR} test pairs, {pairs[0].f.shape[0]} x {pairs[0].f.shape[1]}; fused: {fused_from}"
    )
    print(f"load average before: {_load()}; cpus {os.cpu_count()}")

    seconds = time_per_metric(pairs, args.repeat)
    peaks = peak_traced_bytes(pairs[0])
    total = sum(seconds.values())
    print(f"\n{'metric':<14}{'s / pair':>10}{'s (all pairs)':>15}{'peak MiB':>10}")
    for name, s in seconds.items():
        print(f"{name:<14}{s / n:>10.4f}{s:>15.3f}{peaks[name] / 2**20:>10.1f}")
    print(
        f"{'all metrics':<14}{total / n:>10.4f}{total:>15.3f}{max(peaks.values()) / 2**20:>10.1f}"
    )
    fmi = sum(s for name, s in seconds.items() if name.startswith("FMI"))
    print(f"of which FMI (5 variants): {fmi:.3f} s; everything else: {total - fmi:.3f} s")
    windows = fmi_windows(pairs)
    per_window = ", ".join(f"{k[4:]} {seconds[k] / n_w * 1e9:.0f}" for k, n_w in windows.items())
    print(f"FMI, ns per 3 x 3 window: {per_window} ({sum(windows.values()):,} windows)")
    for jobs in sorted({1, args.jobs}):
        wall = time_evaluate_many(pairs, jobs)
        print(f"evaluate_many, all metrics, all pairs, {jobs} process(es): {wall:.3f} s wall")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {rss:.0f} MiB (includes the interpreter and libraries)")
    print(f"load average after: {_load()}")


if __name__ == "__main__":
    main()

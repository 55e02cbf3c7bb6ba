"""Process-wide memory settings for the numeric hot paths (training, fusion, metrics)."""

from __future__ import annotations

import functools
import sys


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the system.

    A training step allocates activations of 30-70 MB (batch 8 at 256 x 256). glibc serves
    blocks above 32 MB with a fresh mmap and unmaps them when freed, so every step page-faults
    all of its memory in again. On the 2-core CPU W-DUALMINE's step went from 2.9 s to 2.1 s
    with this setting (4.4 s to 1.9 s with spinning OpenMP threads) and inference from 95 to
    83 ms per pair. Resident memory then stays at its peak.
    The fast-FMI metric gains the same way (its per-block temporaries stay mapped).
    Returns whether the setting was applied (glibc only; elsewhere it is a no-op). Applied
    once per process.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**30))
    except (OSError, AttributeError):
        return False

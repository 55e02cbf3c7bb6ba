"""Fusion quality metrics: the metric functions, named convention sets, and evaluation.

Stable entry point: `evaluate_pair(a, b, fused) -> dict[str, float]` (grey 8-bit arrays,
`standard` convention). `evaluate_images` takes stored-form images and a convention name.
See docs/metrics.md for every definition, convention and the reproduced published numbers.
"""

from medfuse.metrics.conventions import CONVENTIONS, Convention, get_convention
from medfuse.metrics.core import MetricWarning
from medfuse.metrics.evaluate import METRIC_NAMES, evaluate_images, evaluate_pair

__all__ = [
    "CONVENTIONS",
    "METRIC_NAMES",
    "Convention",
    "MetricWarning",
    "evaluate_images",
    "evaluate_pair",
    "get_convention",
]

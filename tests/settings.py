"""Method settings for tests: params.yaml's own (the one place their values live; the code holds
no defaults), with a test's overrides deep-merged in."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from medfuse.config import deep_merge, load_params, method_config

REPO = Path(__file__).resolve().parents[1]
# `experiments` cut to one pair, W-DUALMINE and plain averaging: the smallest job list that
# still has a trained and a classical method.
ONE_PAIR_EXPERIMENTS = {
    "pairs": ["CT-MRI"],
    "learned": ["wdualmine"],
    "unified": [],
    "pretrained": [],
    "published": [],
    "classical": ["average"],
    "ablations": [],
}


@cache
def project_params() -> dict[str, Any]:
    """The repository's params.yaml, loaded once per test session (the `params` fixture)."""
    return load_params(REPO / "params.yaml")


def section(method: str, variant: str = "full", **overrides: Any) -> dict[str, Any]:
    """`methods.<method>` (with `variant`) from params.yaml, `overrides` merged per key."""
    return deep_merge(method_config(project_params(), method, variant), overrides)

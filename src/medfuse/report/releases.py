"""Where a released model's own test images fall in this dataset's split.

Released weights were trained on their authors' split, not this one. Their own test images,
when the release ships them (`methods.<pretrained>.test_ids`: per pair, a folder of the
release whose file stems are AANLIB ids), show how the two splits overlap: an id of their test
set that lies in this dataset's train split is an image the re-implementation trained on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from medfuse.config import canonical_method
from medfuse.data.download import dataset_dir


def released_test_ids(params: Mapping[str, Any], method: str) -> dict[str, list[str]]:
    """pair -> the sorted ids of the release's own test images (empty when not shipped)."""
    section = params["methods"][canonical_method(method)]
    root = dataset_dir(params, section["dataset"])
    return {
        pair: sorted(p.stem for p in (root / folder).glob("*.png"))
        for pair, folder in section.get("test_ids", {}).items()
    }


def split_of_ids(manifest: pd.DataFrame, pair: str, ids: list[str]) -> dict[str, list[str]]:
    """split -> the ids of `ids` in that split of `pair` ("absent" for ids not prepared)."""
    rows = manifest[manifest["pair"] == pair].set_index("name")["split"]
    found: dict[str, list[str]] = {}
    for name in ids:
        found.setdefault(str(rows.get(name, "absent")), []).append(name)
    return found


def overlap_markdown(params: Mapping[str, Any], manifest: pd.DataFrame) -> str | None:
    """A report section for every pretrained method the workflow ran; None when there is none."""
    lines = []
    for method in params["experiments"]["pretrained"]:
        for pair, ids in released_test_ids(params, method).items():
            if not ids:
                lines.append(f"- `{method}`, {pair}: the release's test images were not found.")
                continue
            splits = split_of_ids(manifest, pair, ids)
            parts = [
                f"{len(names)} in this dataset's {split} split ({', '.join(names)})"
                for split, names in sorted(splits.items())
            ]
            lines.append(
                f"- `{method}`, {pair}: of its authors' {len(ids)} test ids, "
                + "; ".join(parts)
                + "."
            )
    if not lines:
        return None
    return "\n".join(
        [
            "## Released weights and this dataset's split",
            "",
            "Released weights were trained on their authors' own split. Their test ids that lie in "
            "this dataset's train split were training images of the models trained here; whether "
            "this dataset's test images were among the authors' training images is not published, "
            "so a released model's scores here may be optimistic.",
            "",
            *lines,
            "",
        ]
    )

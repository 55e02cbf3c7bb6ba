"""`medfuse snapshot`: copy a run's small evidence into a folder to commit (e.g. docs/reference/).

What a reader needs to check a run without its weights or images: the report with its tables
and PNG figures, every evaluation summary, every trained model's settings (`model.json`) and
per-epoch history, the parameters the run used (as given and as merged), `dvc.lock` when DVC
made the run, and the machine. The jobs come from the plan, so a file left in results/ by an
earlier run with other params is not picked up. The folder is built beside the destination and
swapped in whole; a hand-written README.md already there is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from medfuse.config import DEFAULT_PARAMS, parameter_files
from medfuse.errors import DataError
from medfuse.plan import HISTORY, META, RESULTS, fusion_jobs, model_folders

log = logging.getLogger(__name__)

KEPT = "README.md"  # the destination's hand-written description, carried over
REPORT_PARTS = ("report.md", "tables/*.csv", "tables/*.md", "figures/*.png")
MODEL_PARTS = (META, HISTORY)
# The CPU features that set training speed and the precision `auto` picks (medfuse.precision).
SPEED_FLAGS = {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
REPORT_OUT = "results/report.md"  # as dvc.yaml's report stage names it


def _copy(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, dest)


def _report_files(results: Path) -> list[Path]:
    if not (results / "report.md").is_file():
        raise DataError(f"{results / 'report.md'}: no report; run `medfuse report` first")
    return sorted(p for pattern in REPORT_PARTS for p in results.glob(pattern))


def _metric_files(params: Mapping[str, Any], results: Path) -> list[Path]:
    jobs = fusion_jobs(params, results)
    stems = [j.metrics_stem(c) for j in jobs for c in params["evaluate"]["conventions"]]
    missing = [s.with_suffix(".json") for s in stems if not s.with_suffix(".json").is_file()]
    if missing:
        raise DataError(f"{missing[0]}: missing evaluation summary ({len(missing)} missing)")
    return [s.with_suffix(".json") for s in stems]


def _model_files(params: Mapping[str, Any], results: Path) -> list[Path]:
    """model.json and history.csv of every model the plan trains (those that exist yet)."""
    folders = [folder for _, _, folder in model_folders(params, results)]
    return [f / name for f in folders for name in MODEL_PARTS if (f / name).is_file()]


def machine_facts(params: Mapping[str, Any]) -> dict[str, Any]:
    """The machine and software the snapshot was taken on (the run's own precision and torch
    version are in each model.json)."""
    import torch

    from medfuse.precision import cpu_has_fast_bf16
    from medfuse.tracking import git_commit

    return {
        "taken": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "medfuse_commit": git_commit(),
        "profile": params["profile"],
        "train_precision_setting": params["train"]["precision"],
        "platform": platform.platform(),
        "cpu": _cpu_info("model name"),
        "cpu_flags": sorted(set(_cpu_info("flags").split()) & SPEED_FLAGS),
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "cpu_fast_bf16_amx": cpu_has_fast_bf16(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }


def _cpu_info(field: str) -> str:
    """A field of the first CPU in /proc/cpuinfo ("" where there is none, e.g. not Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    values = [
        line.split(":", 1)[1].strip() for line in lines if line.split(":")[0].strip() == field
    ]
    return values[0] if values else ""


def _parameter_files(
    params_path: Path, overlays: list[Path], profile: str, results: Path
) -> dict[str, Path]:
    """The parameter files the run merged, by the name they get in the snapshot."""
    profile_file, *others = parameter_files(params_path, overlays, profile)
    files = {"params.yaml": params_path, "profile.yaml": profile_file}
    files |= {f"overlay{i}.yaml": p for i, p in enumerate(others, start=1)}
    lock = params_path.parent / "dvc.lock"
    if _lock_made(lock, results):
        files["dvc.lock"] = lock
    return files


def _lock_made(lock: Path, results: Path) -> bool:
    """Whether `lock` records this report (DVC made the run): a committed or older dvc.lock,
    or one beside a Snakemake run, describes other outputs and is left out."""
    if not lock.is_file():
        return False
    report = results / "report.md"
    digest = hashlib.md5(report.read_bytes()).hexdigest()
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    outs = [out for stage in stages.values() for out in stage.get("outs", [])]
    return any(o.get("path") == REPORT_OUT and o.get("md5") == digest for o in outs)


def _fill(
    tmp: Path, params: Mapping[str, Any], results: Path, params_path: Path, overlays: list[Path]
) -> int:
    files = _report_files(results) + _metric_files(params, results) + _model_files(params, results)
    for source in files:
        _copy(source, tmp / source.relative_to(results))
    for name, source in _parameter_files(params_path, overlays, params["profile"], results).items():
        _copy(source, tmp / name)
    (tmp / "params.resolved.yaml").write_text(yaml.safe_dump(dict(params), sort_keys=False))
    (tmp / "machine.json").write_text(json.dumps(machine_facts(params), indent=2) + "\n")
    return len(files)


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp`, keeping out/README.md; `out` is never half-written."""
    if (out / KEPT).is_file():
        shutil.copy2(out / KEPT, tmp / KEPT)
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def snapshot(
    params: Mapping[str, Any],
    out: str | Path,
    results: str | Path = RESULTS,
    params_path: str | Path = DEFAULT_PARAMS,
    overlays: Iterable[str | Path] = (),
) -> Path:
    """Copy the run's evidence from `results` into `out` (replaced whole, README.md kept)."""
    out, results = Path(out), Path(results)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted snapshot
    tmp.mkdir()
    try:
        count = _fill(tmp, params, results, Path(params_path), [Path(p) for p in overlays])
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("snapshot of %s written to %s (%d files from results)", results, out, count)
    return out

"""Fetch a dataset = a manifest (path, size, sha256 per line) + a base URL.

The base URL is an `http(s)://` address (the public pinned-commit default, or a mirror served on
127.0.0.1), a `file://` URL or a local directory. Files are fetched by a small thread pool with
retries and exponential back-off; files already present with the right size and hash are kept
(so an interrupted download resumes); each file is written to a temporary name, verified and
only then renamed, so a failed or corrupt fetch never leaves a file that looks complete.
"""

from __future__ import annotations

import logging
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medfuse.errors import ConfigError, DataError, DownloadError
from medfuse.io import atomic_path, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class DownloadSettings:
    workers: int = 4
    retries: int = 4
    backoff_s: float = 0.5
    timeout_s: float = 30.0


@dataclass(frozen=True)
class DownloadSummary:
    fetched: int
    skipped: int

    @property
    def total(self) -> int:
        return self.fetched + self.skipped


class ChecksumError(DownloadError):
    """A fetched file's size or sha256 differs from the manifest."""


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    entries = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 3 or not fields[1].isdigit() or len(fields[2]) != 64:
            raise DataError(f"{path}:{lineno}: expected 'path<TAB>size<TAB>sha256', got {line!r}")
        if fields[0].startswith("/") or ".." in Path(fields[0]).parts:
            raise DataError(f"{path}:{lineno}: unsafe path {fields[0]!r}")
        entries.append(ManifestEntry(fields[0], int(fields[1]), fields[2].lower()))
    if not entries:
        raise DataError(f"{path}: manifest lists no files")
    return entries


def is_complete(target: Path, entry: ManifestEntry) -> bool:
    return (
        target.is_file()
        and target.stat().st_size == entry.size
        and sha256_file(target) == entry.sha256
    )


def _source_kind(base: str) -> str:
    scheme = urllib.parse.urlparse(base).scheme
    if scheme in ("http", "https"):
        return "http"
    if scheme == "file":
        return "file"
    if scheme == "" or len(scheme) == 1:  # plain path (or a Windows drive letter)
        return "dir"
    raise ConfigError(f"unsupported base URL {base!r}: use http(s)://, file:// or a directory")


def _copy_from(base: str, entry: ManifestEntry, tmp: Path, timeout_s: float) -> None:
    kind = _source_kind(base)
    if kind == "http":
        url = f"{base.rstrip('/')}/{urllib.parse.quote(entry.path)}"
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out)
        return
    root = Path(urllib.parse.urlparse(base).path) if kind == "file" else Path(base)
    source = root / entry.path
    if not source.is_file():
        raise FileNotFoundError(f"{source}: not found in mirror")
    shutil.copyfile(source, tmp)


def _verify(tmp: Path, entry: ManifestEntry) -> None:
    size = tmp.stat().st_size
    if size != entry.size:
        raise ChecksumError(f"{entry.path}: size {size} bytes, manifest says {entry.size}")
    digest = sha256_file(tmp)
    if digest != entry.sha256:
        raise ChecksumError(f"{entry.path}: sha256 {digest} does not match manifest {entry.sha256}")


def _is_permanent(exc: Exception) -> bool:
    """A file missing from a mirror or a 4xx answer will not appear by retrying."""
    if isinstance(exc, urllib.error.HTTPError):
        return 400 <= exc.code < 500 and exc.code not in (408, 429)
    return isinstance(exc, FileNotFoundError)


def fetch_one(base: str, entry: ManifestEntry, out_dir: Path, settings: DownloadSettings) -> bool:
    """Fetch one file unless already complete; return True when it was fetched."""
    target = out_dir / entry.path
    if is_complete(target, entry):
        return False
    last_error: Exception | None = None
    for attempt in range(settings.retries + 1):
        if attempt:
            time.sleep(settings.backoff_s * 2 ** (attempt - 1))
        try:
            with atomic_path(target) as tmp:
                _copy_from(base, entry, tmp, settings.timeout_s)
                _verify(tmp, entry)
            return True
        except (OSError, urllib.error.URLError, ChecksumError) as exc:
            last_error = exc
            log.debug("attempt %d for %s failed: %s", attempt + 1, entry.path, exc)
            if _is_permanent(exc):
                raise DownloadError(f"{entry.path}: not available from {base}: {exc}") from exc
    raise DownloadError(
        f"{entry.path}: failed after {settings.retries + 1} attempts from {base}: {last_error}"
    )


def download(
    manifest: str | Path,
    base: str,
    out_dir: str | Path,
    settings: DownloadSettings | None = None,
    progress: bool = True,
) -> DownloadSummary:
    """Fetch every manifest entry from `base` into `out_dir`; raise listing the files that failed."""
    settings = settings or DownloadSettings()
    entries = read_manifest(manifest)
    out_dir = Path(out_dir)
    _source_kind(base)  # fail on a bad scheme before starting threads
    fetched = skipped = 0
    failures: list[str] = []
    with (
        ThreadPoolExecutor(max_workers=settings.workers) as pool,
        tqdm(
            total=len(entries), unit="file", desc=f"download {out_dir}", disable=not progress
        ) as bar,
    ):
        futures = {pool.submit(fetch_one, base, e, out_dir, settings): e for e in entries}
        for future in as_completed(futures):
            try:
                if future.result():
                    fetched += 1
                else:
                    skipped += 1
            except DownloadError as exc:
                failures.append(str(exc))
            bar.update()
    if failures:
        shown = "\n  ".join(sorted(failures)[:5])
        more = f"\n  ... and {len(failures) - 5} more" if len(failures) > 5 else ""
        raise DownloadError(f"{len(failures)} of {len(entries)} files failed:\n  {shown}{more}")
    log.info("%s: %d fetched, %d already present", out_dir, fetched, skipped)
    return DownloadSummary(fetched=fetched, skipped=skipped)


def dataset_dir(params: Mapping[str, Any], dataset: str) -> Path:
    """Where a dataset's files live once downloaded: <data.raw_dir>/<dataset>."""
    return Path(params["data"]["raw_dir"]) / dataset


def download_dataset(
    params: Mapping[str, Any],
    dataset: str,
    source: str | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> DownloadSummary:
    """`medfuse download`: the dataset's manifest and base URL from params, overridable."""
    datasets = params["data"]["datasets"]
    if dataset not in datasets:
        raise ConfigError(f"unknown dataset {dataset!r}; known: {', '.join(sorted(datasets))}")
    spec = datasets[dataset]
    settings = DownloadSettings(**params["data"]["download"])
    summary = download(
        spec["manifest"],
        source or spec["base_url"],
        out_dir or dataset_dir(params, dataset),
        settings=settings,
        progress=progress,
    )
    print(
        f"{dataset}: {summary.total} files verified ({summary.fetched} fetched, {summary.skipped} present)"
    )
    return summary

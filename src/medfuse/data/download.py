"""Fetch a dataset = a manifest (path, size, sha256 per line) + a base URL.

The base URL is an `http(s)://` address (the public pinned-commit default, or a mirror served on
127.0.0.1), a `file://` URL or a local directory. Files are fetched by a small thread pool with
retries and exponential back-off; files already present with the right size and hash are kept
(so an interrupted download resumes); each file is written to a temporary name, verified and
only then renamed, so a failed or corrupt fetch never leaves a file that looks complete.

A host that cannot be reached at all (the name does not resolve, the connection is refused, no
route, or no connection within the time-out) is not retried file by file: the first missing
file is fetched alone first, with a short time-out, and any worker that meets such an error
later stops every queued file. Otherwise timeout_s x attempts x files would keep an offline
user waiting for hours; a single flaky file (5xx, reset, slow read) still gets its retries.

Ctrl-C stops the whole download at once (exit 130 from the CLI): back-offs wake, queued files
never start, and no worker holds the exit. Temporary files left by a download killed outright
are removed by the next one.
"""

from __future__ import annotations

import errno
import http.client
import logging
import queue
import shutil
import socket
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medfuse.errors import ConfigError, DataError, DownloadError
from medfuse.io import atomic_path, remove_stale_temporaries, sha256_file

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


class UnreachableError(DownloadError):
    """The source cannot be reached at all, so no file of it can be fetched."""

    def __init__(self, base: str, reason: str, dataset: str | None = None) -> None:
        key = f"data.datasets.{dataset}.base_url" if dataset else "the dataset's base_url"
        super().__init__(
            f"cannot reach {base}: {reason}; use --source DIR_OR_URL (a local mirror) or set {key}"
        )


# The first missing file is fetched alone with at most this time-out: an unreachable host fails
# in seconds, not after timeout_s (30 s by default) per attempt.
PROBE_TIMEOUT_S = 10.0
# This many connect time-outs in a row (no answer in between) mean the host is down.
CONNECT_TIMEOUTS_PER_WORKER = 2
CONNECT_TIMEOUT = "connect timed out"
_NO_ROUTE = {
    errno.ENETUNREACH: "network is unreachable",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETDOWN: "network is down",
    errno.EHOSTDOWN: "host is down",
}
# Errors of one attempt worth retrying (unless permanent or unreachable, see below).
_ATTEMPT_ERRORS = (OSError, urllib.error.URLError, http.client.HTTPException, ChecksumError)


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


def unreachable_reason(exc: BaseException) -> str | None:
    """Why no connection to the host could be made at all, or None for a problem of one file.

    urllib wraps errors of connecting (and of the TLS handshake) in URLError; a time-out while
    reading an answer arrives bare, so it stays a per-file, retried error.
    """
    if not isinstance(exc, urllib.error.URLError) or isinstance(exc, urllib.error.HTTPError):
        return None
    reason = exc.reason
    if isinstance(reason, socket.gaierror):
        return "name does not resolve"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, ssl.SSLCertVerificationError):
        return "TLS certificate not trusted"
    if isinstance(reason, TimeoutError):
        return CONNECT_TIMEOUT
    if isinstance(reason, OSError) and reason.errno in _NO_ROUTE:
        return _NO_ROUTE[reason.errno]
    return None


class HostGuard:
    """Shared by every fetch of one download: once the host is known to be unreachable, each
    fetch stops at its next attempt and the queued ones are cancelled."""

    def __init__(
        self, base: str, timeout_s: float, timeouts_to_stop: int, dataset: str | None = None
    ) -> None:
        self.base = base
        self.dataset = dataset
        self._timeout_s = timeout_s
        self._timeouts_to_stop = timeouts_to_stop
        self._timeouts = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reason: str | None = None

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def error(self) -> UnreachableError:
        return UnreachableError(self.base, self._reason or "unreachable", self.dataset)

    def back_off(self, seconds: float) -> bool:
        """Sleep before a retry; True (at once) if the download was stopped meanwhile."""
        return self._stop.wait(seconds)

    def cancel(self) -> None:
        """Stop every fetch at its next attempt (Ctrl-C): sleeping back-offs return at once."""
        with self._lock:
            self._reason = self._reason or "download interrupted"
        self._stop.set()

    def observe(self, exc: BaseException | None) -> None:
        """Record one attempt's outcome (None: success); stop all on an unreachable host."""
        reason = unreachable_reason(exc) if exc is not None else None
        with self._lock:
            if reason is None:  # the host answered
                self._timeouts = 0
                return
            if reason == CONNECT_TIMEOUT:
                self._timeouts += 1
                if self._timeouts < self._timeouts_to_stop:
                    return
                reason = f"no connection within {self._timeout_s:g} s"
                if self._timeouts > 1:
                    reason += f" ({self._timeouts} times in a row)"
            self._reason = self._reason or reason
        self._stop.set()


def fetch_one(
    base: str,
    entry: ManifestEntry,
    out_dir: Path,
    settings: DownloadSettings,
    guard: HostGuard | None = None,
) -> bool:
    """Fetch one file unless already complete; return True when it was fetched."""
    target = out_dir / entry.path
    if is_complete(target, entry):
        return False
    guard = guard or HostGuard(base, settings.timeout_s, timeouts_to_stop=settings.retries + 1)
    last_error: Exception | None = None
    for attempt in range(settings.retries + 1):
        if guard.stopped or (attempt and guard.back_off(settings.backoff_s * 2 ** (attempt - 1))):
            raise guard.error()
        try:
            with atomic_path(target) as tmp:
                _copy_from(base, entry, tmp, settings.timeout_s)
                _verify(tmp, entry)
            guard.observe(None)
            return True
        except _ATTEMPT_ERRORS as exc:
            last_error = exc
            log.debug("attempt %d for %s failed: %s", attempt + 1, entry.path, exc)
            guard.observe(exc)
            if _is_permanent(exc):
                raise DownloadError(f"{entry.path}: not available from {base}: {exc}") from exc
    if guard.stopped:
        raise guard.error()
    raise DownloadError(
        f"{entry.path}: failed after {settings.retries + 1} attempts from {base}: {last_error}"
    )


def _check_source(base: str, kind: str, dataset: str | None) -> None:
    """A local mirror that does not exist fails once, not once per file."""
    if kind == "http":
        return
    root = Path(urllib.parse.urlparse(base).path) if kind == "file" else Path(base)
    if not root.is_dir():
        raise UnreachableError(base, "no such directory", dataset)


def _probe(
    base: str,
    entry: ManifestEntry,
    out_dir: Path,
    settings: DownloadSettings,
    dataset: str | None,
) -> bool:
    """Fetch `entry` alone, once, with a short time-out; True if fetched.

    An unreachable host raises UnreachableError here, before any worker starts; any other
    failure is left to the pool, which retries the file as usual.
    """
    once = replace(settings, retries=0, timeout_s=min(settings.timeout_s, PROBE_TIMEOUT_S))
    guard = HostGuard(base, once.timeout_s, timeouts_to_stop=1, dataset=dataset)
    try:
        return fetch_one(base, entry, out_dir, once, guard)
    except UnreachableError:
        raise
    except DownloadError:
        return False


# How often the main thread checks that workers are still alive while it waits for results.
_POLL_S = 0.5


def _start_workers(
    base: str,
    entries: list[ManifestEntry],
    out_dir: Path,
    settings: DownloadSettings,
    guard: HostGuard,
) -> tuple[list[threading.Thread], queue.SimpleQueue]:
    """Daemon threads fetching `entries`; each entry taken yields one (fetched, error) result.

    Daemon threads rather than a ThreadPoolExecutor, whose workers the interpreter joins at
    exit: a worker blocked in a network read would hold a Ctrl-C for up to timeout_s.
    """
    todo: queue.SimpleQueue[ManifestEntry] = queue.SimpleQueue()
    for entry in entries:
        todo.put(entry)
    results: queue.SimpleQueue[tuple[bool, BaseException | None]] = queue.SimpleQueue()

    def work() -> None:
        while not guard.stopped:  # once stopped, queued files never start
            try:
                entry = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results.put((fetch_one(base, entry, out_dir, settings, guard), None))
            except BaseException as exc:  # handed to the main thread, which decides
                results.put((False, exc))

    count = min(settings.workers, len(entries))
    threads = [
        threading.Thread(target=work, name=f"download-{i}", daemon=True) for i in range(count)
    ]
    for thread in threads:
        thread.start()
    return threads, results


def _next_result(
    results: queue.SimpleQueue, threads: list[threading.Thread]
) -> tuple[bool, BaseException | None] | None:
    """The next worker result, or None once no worker is alive and none is left to read."""
    while True:
        try:
            return results.get(timeout=_POLL_S)
        except queue.Empty:
            if not any(thread.is_alive() for thread in threads) and results.empty():
                return None


def _fetch_all(
    base: str,
    entries: list[ManifestEntry],
    out_dir: Path,
    settings: DownloadSettings,
    guard: HostGuard,
    bar: tqdm,
) -> tuple[int, list[str]]:
    """Fetch `entries` in worker threads; return (files fetched, one message per failed file)."""
    fetched = 0
    failures: list[str] = []
    threads, results = _start_workers(base, entries, out_dir, settings, guard)
    try:
        for _ in entries:
            outcome = _next_result(results, threads)
            if outcome is None:  # every worker has stopped
                break
            ok, exc = outcome
            if isinstance(exc, UnreachableError):
                break  # queued files never start; running ones stop at their next attempt
            if isinstance(exc, DownloadError):
                failures.append(str(exc))
            elif exc is not None:
                raise exc
            fetched += ok
            bar.update()
    except BaseException:  # Ctrl-C above all: stop the workers, but wait for none of them
        guard.cancel()
        raise
    if guard.stopped:
        raise guard.error()
    return fetched, failures


def download(
    manifest: str | Path,
    base: str,
    out_dir: str | Path,
    settings: DownloadSettings | None = None,
    progress: bool | None = None,
    dataset: str | None = None,
) -> DownloadSummary:
    """Fetch every manifest entry from `base` into `out_dir`; raise listing the files that failed.

    `progress`: a progress bar (None: only when stderr is a terminal, so logs and the
    one-line errors stay clean). `dataset` only names the params key to fix in the message of
    an unreachable source.
    """
    settings = settings or DownloadSettings()
    entries = read_manifest(manifest)
    out_dir = Path(out_dir)
    kind = _source_kind(base)  # fail on a bad scheme before starting threads
    remove_stale_temporaries(out_dir)
    missing = [e for e in entries if not is_complete(out_dir / e.path, e)]
    fetched = 0
    if missing:
        _check_source(base, kind, dataset)
        if kind == "http" and _probe(base, missing[0], out_dir, settings, dataset):
            fetched, missing = 1, missing[1:]
    guard = HostGuard(
        base,
        settings.timeout_s,
        timeouts_to_stop=CONNECT_TIMEOUTS_PER_WORKER * settings.workers,
        dataset=dataset,
    )
    with tqdm(
        total=len(entries),
        initial=len(entries) - len(missing),
        unit="file",
        desc=f"download {out_dir}",
        disable=None if progress is None else not progress,
    ) as bar:
        fetched_by_pool, failures = _fetch_all(base, missing, out_dir, settings, guard, bar)
    if failures:
        shown = "\n  ".join(sorted(failures)[:5])
        more = f"\n  ... and {len(failures) - 5} more" if len(failures) > 5 else ""
        raise DownloadError(f"{len(failures)} of {len(entries)} files failed:\n  {shown}{more}")
    fetched += fetched_by_pool
    log.info("%s: %d fetched, %d already present", out_dir, fetched, len(entries) - fetched)
    return DownloadSummary(fetched=fetched, skipped=len(entries) - fetched)


def dataset_dir(params: Mapping[str, Any], dataset: str) -> Path:
    """Where a dataset's files live once downloaded: <data.raw_dir>/<dataset>."""
    return Path(params["data"]["raw_dir"]) / dataset


def download_dataset(
    params: Mapping[str, Any],
    dataset: str,
    source: str | None = None,
    out_dir: str | Path | None = None,
    progress: bool | None = None,
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
        dataset=dataset,
    )
    counts = f"{summary.fetched} fetched, {summary.skipped} present"
    print(f"{dataset}: {summary.total} files verified ({counts})")
    return summary

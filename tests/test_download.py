"""download: real HTTP path against a 127.0.0.1 server, mirrors, checksums, retries, resume,
and an unreachable source failing in seconds (never the internet: names are mocked)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from medfuse.cli import main
from medfuse.data import download as download_module
from medfuse.data.download import (
    PROBE_TIMEOUT_S,
    DownloadSettings,
    ManifestEntry,
    UnreachableError,
    download,
    download_dataset,
    read_manifest,
)
from medfuse.errors import ConfigError, DataError, DownloadError
from tests.workspace import QuietHandler, serve_directory

FAST = DownloadSettings(workers=4, retries=2, backoff_s=0.01, timeout_s=5)
# The shipped defaults: retrying an unreachable host per file would cost 7.5 s of back-off alone.
DEFAULTS = DownloadSettings()
UNRESOLVABLE = "medfuse-mirror.invalid"  # RFC 6761: never resolves


@pytest.fixture(scope="module")
def mirror_url(aanlib_mirror: Path) -> Iterator[str]:
    with serve_directory(aanlib_mirror) as url:
        yield url


def _manifest(tmp_path: Path, files: dict[str, bytes], corrupt: set[str] = frozenset()) -> Path:
    lines = []
    for name, payload in files.items():
        digest = hashlib.sha256(payload + (b"x" if name in corrupt else b"")).hexdigest()
        lines.append(f"{name}\t{len(payload)}\t{digest}")
    path = tmp_path / "manifest.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _subset_manifest(tmp_path: Path, repo_root: Path, n: int) -> Path:
    lines = (repo_root / "data/manifests/aanlib.tsv").read_text().splitlines()[:n]
    path = tmp_path / "subset.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_http_download_verifies_every_file(tmp_path, repo_root, mirror_url):
    manifest = _subset_manifest(tmp_path, repo_root, 30)
    summary = download(manifest, mirror_url, tmp_path / "raw", FAST, progress=False)
    assert (summary.fetched, summary.skipped) == (30, 0)
    for entry in read_manifest(manifest):
        assert (tmp_path / "raw" / entry.path).stat().st_size == entry.size


def test_full_dataset_from_directory_mirror(tmp_path, params, aanlib_mirror):
    summary = download_dataset(params, "aanlib", str(aanlib_mirror), tmp_path, progress=False)
    assert summary.total == 1621
    assert (tmp_path / "MyDatasets/PET-MRI/test/41101.jpg").is_file()


def test_interrupted_download_resumes_only_missing(tmp_path, repo_root, mirror_url):
    manifest = _subset_manifest(tmp_path, repo_root, 20)
    out = tmp_path / "raw"
    download(manifest, mirror_url, out, FAST, progress=False)
    entries = read_manifest(manifest)
    for entry in entries[:5]:
        (out / entry.path).unlink()  # as if the first run had stopped before these
    (out / entries[5].path).write_bytes(b"partial")  # and left a damaged file
    summary = download(manifest, mirror_url, out, FAST, progress=False)
    assert (summary.fetched, summary.skipped) == (6, 14)


def test_checksum_mismatch_is_named_and_not_kept(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.png").write_bytes(b"good bytes")
    (src / "bad.png").write_bytes(b"bad bytes")
    manifest = _manifest(
        tmp_path, {"good.png": b"good bytes", "bad.png": b"bad bytes"}, corrupt={"bad.png"}
    )
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match=r"bad\.png.*sha256"):
        download(manifest, str(src), out, FAST, progress=False)
    assert (out / "good.png").is_file()
    assert not (out / "bad.png").exists()
    assert not list(out.glob(".*part")), "a temporary file was left behind"


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _many_files(tmp_path: Path, n: int = 40) -> Path:
    return _manifest(tmp_path, {f"d/{i}.png": b"payload %d" % i for i in range(n)})


def _count_attempts(monkeypatch: pytest.MonkeyPatch, fake: Callable[..., None]) -> list[float]:
    """Replace each fetch attempt by `fake`; return the list of their time-outs, growing."""
    timeouts: list[float] = []

    def attempt(base: str, entry: ManifestEntry, tmp: Path, timeout_s: float) -> None:
        timeouts.append(timeout_s)
        fake(len(timeouts), entry, tmp)

    monkeypatch.setattr(download_module, "_copy_from", attempt)
    return timeouts


def _payload_of(entry: ManifestEntry, tmp: Path) -> None:
    tmp.write_bytes(b"payload %d" % int(Path(entry.path).stem))


def _assert_one_line_naming(message: str, url: str) -> None:
    assert "\n" not in message, message
    assert f"cannot reach {url}:" in message and "--source" in message, message


def test_refused_connection_fails_in_seconds_with_one_line(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}"
    out = tmp_path / "out"
    start = time.perf_counter()
    with pytest.raises(UnreachableError, match="connection refused") as caught:
        download(_many_files(tmp_path), url, out, DEFAULTS, progress=False)
    elapsed = time.perf_counter() - start
    assert elapsed < 5, f"took {elapsed:.1f} s"
    _assert_one_line_naming(str(caught.value), url)
    assert not any(p.is_file() for p in out.rglob("*")), "a partial file was left behind"


def test_unresolvable_host_fails_in_seconds(tmp_path, monkeypatch):
    real = socket.getaddrinfo

    def resolve(host: str, *args: object, **kwargs: object) -> list:
        # A dead resolver can take many seconds to say so: answer at once, as one that works.
        if host == UNRESOLVABLE:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    url = f"http://{UNRESOLVABLE}/data"
    start = time.perf_counter()
    with pytest.raises(UnreachableError, match="name does not resolve") as caught:
        download(_many_files(tmp_path), url, tmp_path / "out", DEFAULTS, progress=False)
    assert time.perf_counter() - start < 5
    _assert_one_line_naming(str(caught.value), url)


def test_probe_has_a_short_time_out_and_a_connect_time_out_stops_at_once(tmp_path, monkeypatch):
    def no_connection(n: int, entry: ManifestEntry, tmp: Path) -> None:
        raise urllib.error.URLError(TimeoutError("timed out"))

    attempts = _count_attempts(monkeypatch, no_connection)
    with pytest.raises(UnreachableError, match="no connection within 10 s"):
        download(_many_files(tmp_path), "http://mirror.test", tmp_path / "out", DEFAULTS, False)
    assert attempts == [min(DEFAULTS.timeout_s, PROBE_TIMEOUT_S)]


def test_host_lost_mid_download_cancels_the_queue(tmp_path, monkeypatch):
    def refused_after_first(n: int, entry: ManifestEntry, tmp: Path) -> None:
        if n > 1:
            raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
        _payload_of(entry, tmp)

    attempts = _count_attempts(monkeypatch, refused_after_first)
    start = time.perf_counter()
    with pytest.raises(UnreachableError, match="connection refused"):
        download(_many_files(tmp_path), "http://mirror.test", tmp_path / "out", DEFAULTS, False)
    assert time.perf_counter() - start < 5
    assert len(attempts) <= 1 + DEFAULTS.workers, "queued files kept trying a dead host"


def test_connect_time_outs_in_a_row_stop_the_download(tmp_path, monkeypatch):
    def time_out_after_first(n: int, entry: ManifestEntry, tmp: Path) -> None:
        if n > 1:
            raise urllib.error.URLError(TimeoutError("timed out"))
        _payload_of(entry, tmp)

    attempts = _count_attempts(monkeypatch, time_out_after_first)
    settings = DownloadSettings(workers=2, retries=4, backoff_s=0.01, timeout_s=30)
    with pytest.raises(UnreachableError, match="no connection within 30 s"):
        download(_many_files(tmp_path), "http://mirror.test", tmp_path / "out", settings, False)
    # Two time-outs per worker in a row, plus those already under way: not 5 per file.
    assert len(attempts) <= 1 + 3 * settings.workers


class _FlakyHandler(QuietHandler):
    """Answers 503 to the first two requests for each file, then serves it."""

    failures_left: dict[str, int]

    def do_GET(self) -> None:
        left = self.failures_left.setdefault(self.path, 2)
        if left:
            self.failures_left[self.path] = left - 1
            self.send_error(503, "try again")
            return
        super().do_GET()


def test_flaky_files_still_get_their_retries(tmp_path, repo_root, aanlib_mirror):
    manifest = _subset_manifest(tmp_path, repo_root, 6)
    handler = type("Flaky", (_FlakyHandler,), {"failures_left": {}})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(aanlib_mirror))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        summary = download(manifest, url, tmp_path / "raw", FAST, progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert (summary.fetched, summary.skipped) == (6, 0)


def test_missing_mirror_directory_fails_once(tmp_path):
    missing = tmp_path / "no-mirror"
    with pytest.raises(UnreachableError, match="no such directory") as caught:
        download(_many_files(tmp_path), str(missing), tmp_path / "out", FAST, progress=False)
    _assert_one_line_naming(str(caught.value), str(missing))


def test_cli_unreachable_source_is_one_line_and_exit_2(tmp_path, repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    monkeypatch.delenv("MEDFUSE_PARAMS_OVERLAY", raising=False)
    url = f"http://127.0.0.1:{_closed_port()}"
    start = time.perf_counter()
    code = main(["download", "--dataset", "aanlib", "--source", url, "--out", str(tmp_path)])
    assert time.perf_counter() - start < 5
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"medfuse download: error: cannot reach {url}: connection refused")
    assert "--source" in lines[0] and "data.datasets.aanlib.base_url" in lines[0]


def test_download_settings_and_source_form_do_not_change_the_files(
    tmp_path, repo_root, aanlib_mirror
):
    manifest = _subset_manifest(tmp_path, repo_root, 10)
    one = DownloadSettings(workers=1, retries=0, backoff_s=0, timeout_s=1)
    download(manifest, str(aanlib_mirror), tmp_path / "a", one, progress=False)
    download(manifest, aanlib_mirror.as_uri(), tmp_path / "b", FAST, progress=False)
    a, b = tmp_path / "a", tmp_path / "b"
    for entry in read_manifest(manifest):
        assert (a / entry.path).read_bytes() == (b / entry.path).read_bytes()


def test_missing_file_is_reported_without_retrying(tmp_path, mirror_url):
    manifest = _manifest(tmp_path, {"MyDatasets/none.png": b"x"})
    slow = DownloadSettings(workers=1, retries=3, backoff_s=30, timeout_s=5)
    for source in (mirror_url, str(tmp_path)):  # a 404 and a file missing from a directory
        with pytest.raises(DownloadError, match=r"none\.png: not available from"):
            download(manifest, source, tmp_path / "out", slow, progress=False)


def test_bad_manifest_line_names_file_and_line(tmp_path):
    bad = tmp_path / "m.tsv"
    bad.write_text("a.png\tnot-a-size\tabc\n")
    with pytest.raises(DataError, match=r"m\.tsv:1"):
        read_manifest(bad)


def test_unsupported_scheme_is_a_config_error(tmp_path):
    manifest = _manifest(tmp_path, {"a.png": b"x"})
    with pytest.raises(ConfigError, match="ftp"):
        download(manifest, "ftp://example.org/data", tmp_path / "out", FAST, progress=False)


# ------------------------------------------------------------------- Ctrl-C and leftovers


class _StallingHandler(QuietHandler):
    """Answers the first request (the probe) 503; then, by `mode`, every request 503 (the
    download backs off and retries) or none at all (the workers hang in a read)."""

    mode: str
    requests: list[str]
    release: threading.Event

    def do_GET(self) -> None:
        self.requests.append(self.path)
        if self.mode == "hang" and len(self.requests) > 1:
            self.release.wait(60)
            return
        self.send_error(503, "try again later")


def _stalling_server(mode: str) -> tuple[http.server.ThreadingHTTPServer, type[_StallingHandler]]:
    handler = type("Stalling", (_StallingHandler,), {"mode": mode, "requests": []})
    handler.release = threading.Event()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler


def _cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MEDFUSE_", "MLFLOW_"))}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("mode", ["503", "hang"])
def test_ctrl_c_stops_a_retrying_download_at_once_with_exit_130(tmp_path, repo_root, mode):
    """SIGINT while the workers sleep in a 30 s back-off (503s), or are blocked in a read with
    a 30 s time-out (a server that never answers): exit 130 within 1.5 s, one line."""
    files = {f"MyDatasets/{i}.png": bytes([i]) * 100 for i in range(6)}
    overlay = tmp_path / "slow.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "datasets": {"aanlib": {"manifest": str(_manifest(tmp_path, files))}},
                    "download": {"workers": 2, "retries": 5, "backoff_s": 30, "timeout_s": 30},
                }
            }
        )
    )
    server, handler = _stalling_server(mode)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    out = tmp_path / "raw"
    command = [sys.executable, "-m", "medfuse.cli", "download", "--source", url, "--out", str(out)]
    command += ["--params", str(repo_root / "params.yaml"), "--overlay", str(overlay)]
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=_cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # A shell's background job (CI may be one) inherits SIGINT ignored, and Python then
        # installs no KeyboardInterrupt handler: give the command a terminal user's default.
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 30
        while len(handler.requests) < 3 and time.monotonic() < deadline:  # probe + 2 workers
            time.sleep(0.05)
        assert len(handler.requests) >= 3, "the download never reached its workers"
        time.sleep(0.3)  # the workers are now in their back-off, or blocked in a read
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        latency = time.monotonic() - sent
    finally:
        proc.kill()
        handler.release.set()
        server.shutdown()
        server.server_close()
    assert proc.returncode == 130, err
    assert latency < 1.5, f"exit took {latency:.2f} s after SIGINT"
    assert err.decode().strip().splitlines() == ["medfuse download: interrupted"]


def test_leftover_temporary_files_are_removed_by_the_next_run(tmp_path, caplog):
    files = {"MyDatasets/a.png": b"a" * 50, "MyDatasets/sub/b.png": b"b" * 60}
    mirror = tmp_path / "mirror"
    for name, payload in files.items():
        (mirror / name).parent.mkdir(parents=True, exist_ok=True)
        (mirror / name).write_bytes(payload)
    manifest = _manifest(tmp_path, files)
    out = tmp_path / "raw"
    download(manifest, str(mirror), out, FAST, progress=False)
    # What a download killed outright leaves: atomic_path's hidden temporary names.
    leftovers = [
        out / "MyDatasets/.a.png.k2x9_q1z.part",
        out / "MyDatasets/sub/.c.png.00abcdef.part",
    ]
    for path in leftovers:
        path.write_bytes(b"partial")
    # Not ours: other names are never touched, even when they look alike.
    others = [out / "MyDatasets/notes.part", out / "MyDatasets/.keep", out / "x.png.abcdefgh.part"]
    for path in others:
        path.write_bytes(b"keep")
    with caplog.at_level(logging.INFO, logger="medfuse.io"):
        summary = download(manifest, str(mirror), out, FAST, progress=False)
    assert (summary.fetched, summary.skipped) == (0, 2)  # the real files stay
    assert not any(path.exists() for path in leftovers)
    assert all(path.read_bytes() == b"keep" for path in others)
    assert "removed 2 leftover temporary file(s)" in caplog.text


def test_a_download_killed_outright_is_cleaned_up_by_the_next(tmp_path, aanlib_mirror, repo_root):
    """SIGKILL while workers are inside their temporary files; the next run removes them."""
    manifest = _subset_manifest(tmp_path, repo_root, 4)
    server, handler = _stalling_server("hang")
    url = f"http://127.0.0.1:{server.server_address[1]}"
    out = tmp_path / "raw"
    script = (
        "import sys; from medfuse.data.download import download, DownloadSettings; "
        "download(sys.argv[1], sys.argv[2], sys.argv[3], DownloadSettings(2, 0, 0, 30), False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(manifest), url, str(out)])
    try:
        deadline = time.monotonic() + 30
        while len(handler.requests) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        proc.kill()
        proc.wait(timeout=10)
    finally:
        handler.release.set()
        server.shutdown()
        server.server_close()
    assert len(list(out.rglob(".*.part"))) == 2  # one per blocked worker
    download(manifest, str(aanlib_mirror), out, FAST, progress=False)
    assert not list(out.rglob("*.part"))

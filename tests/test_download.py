"""download: real HTTP path against a 127.0.0.1 server, mirrors, checksums, retries, resume."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from medfuse.data.download import DownloadSettings, download, download_dataset, read_manifest
from medfuse.errors import ConfigError, DataError, DownloadError

FAST = DownloadSettings(workers=4, retries=2, backoff_s=0.01, timeout_s=5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


def _serve(directory: Path) -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def mirror_url(aanlib_mirror: Path) -> Iterator[str]:
    yield from _serve(aanlib_mirror)


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


def test_unreachable_base_url_fails_after_retries_leaving_nothing(tmp_path):
    manifest = _manifest(tmp_path, {"a/b.png": b"payload"})
    out = tmp_path / "out"
    # Port 9 on loopback: nothing listens there, so every attempt is refused at once.
    with pytest.raises(DownloadError, match=r"a/b\.png: failed after 3 attempts"):
        download(manifest, "http://127.0.0.1:9", out, FAST, progress=False)
    assert not any(p.is_file() for p in out.rglob("*"))


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

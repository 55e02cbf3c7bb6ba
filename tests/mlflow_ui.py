"""Open the MLflow UI in headless Chromium and read which runs it lists (used by the e2e test).

Chromium comes from Debian (`/usr/bin/chromium`), driven by playwright without its own browser
download (unreachable here).
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    """The server takes 15-25 s to answer on 2 cores: poll, bounded in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"MLflow UI at {url} did not answer within {timeout_s} s")


def runs_listed_in_ui(
    store_uri: str, experiment_ids: list[str], run_names: list[str], screenshot: Path, cwd: Path
) -> set[str]:
    """Start `mlflow ui` on 127.0.0.1, open each experiment's runs page, return names seen."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            "mlflow",
            "ui",
            "--backend-store-uri",
            store_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen: set[str] = set()
    try:
        wait_healthy(url)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            for number, exp_id in enumerate(experiment_ids):
                page.goto(f"{url}/#/experiments/{exp_id}/runs")
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    text = page.inner_text("body")
                    found = {name for name in run_names if name in text}
                    if found:
                        page.wait_for_timeout(1000)  # let the rest of the table render
                        seen |= {name for name in run_names if name in page.inner_text("body")}
                        break
                    page.wait_for_timeout(500)
                if number == 0:
                    page.screenshot(path=str(screenshot), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return seen

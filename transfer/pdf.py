"""Print an HTML page to PDF with headless Chromium (its print stylesheet applies).

Chromium runs with a throw-away profile, no network services and no sandbox (it runs as
whatever user runs Passerelle, often root in containers); the page it prints fetches
nothing anyway (its Content-Security-Policy forbids it).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from passerelle.errors import BadInput

TIMEOUT_SECONDS = 180
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    raise BadInput("writing a PDF needs headless Chromium (Debian: apt-get install chromium); "
                   "write FILE.html instead")


def print_pdf(page: Path, out: Path) -> None:
    """Print ``page`` (an HTML file) to ``out`` (a PDF); BadInput if Chromium fails."""
    browser = find_browser()
    with tempfile.TemporaryDirectory(prefix=".chromium-") as profile:
        try:
            run = subprocess.run(  # noqa: S603 - a fixed browser, our own file
                [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={profile}", "--no-pdf-header-footer",
                 f"--print-to-pdf={out}", page.resolve().as_uri()],
                capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BadInput(f"Chromium could not print {page.name} to PDF: {e}") from e
    if run.returncode != 0 or not out.is_file() or out.read_bytes()[:5] != b"%PDF-":
        out.unlink(missing_ok=True)
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise BadInput(f"Chromium could not print {page.name} to PDF: {last}")

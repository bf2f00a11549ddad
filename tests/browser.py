"""Headless Chromium (Debian's ``chromium``, installed by .ci/install) for the tests of HTML pages:
a screenshot as a user would see the page, and the DOM after the page's scripts ran."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--hide-scrollbars", "--allow-file-access-from-files"]


def _chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    assert CHROMIUM, "chromium is missing: .ci/install installs Debian's chromium package"
    return subprocess.run([CHROMIUM, *FLAGS, *args], capture_output=True, text=True, timeout=timeout, check=False)


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 1600) -> Path:
    """A PNG of ``page`` (a local HTML file) at the given window size."""
    done = _chromium(f"--window-size={width},{height}", f"--screenshot={png}", page.resolve().as_uri())
    assert png.is_file() and png.stat().st_size > 0, done.stderr[-2000:]
    return png


def rendered_dom(page: Path) -> str:
    """The page's DOM as Chromium renders it (after its scripts ran)."""
    done = _chromium("--dump-dom", page.resolve().as_uri())
    assert done.returncode == 0 and "<html" in done.stdout.lower(), done.stderr[-2000:]
    return done.stdout

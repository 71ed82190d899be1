"""Debian's Chromium, driven by Playwright for Python: nothing is downloaded (``playwright
install`` is never run); the browser is the system one (``apt-get install chromium``, done by
scripts/test when it is missing), or the one named by ``$CIS_CHROMIUM``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Without the background-networking switches Chromium dials out at start (updates, sync, field
# trials), which a closed network refuses; QUIC and the GPU are of no use to a headless test.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class NoChromium(RuntimeError):
    pass


def chromium_path() -> Path:
    named = os.environ.get("CIS_CHROMIUM")
    if named:
        path = Path(named)
        if not path.exists():
            raise NoChromium(f"$CIS_CHROMIUM={named} does not exist")
        return path
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise NoChromium(
        "no chromium on PATH: run scripts/test (it installs Debian's chromium when missing), "
        "or `apt-get install -y chromium`, or set $CIS_CHROMIUM"
    )

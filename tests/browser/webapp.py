"""Hydrogen, matrix.org's web client, built from npm (``hydrogen-view-sdk``, pinned in
package.json / package-lock.json) with vite, and served as static files on loopback.

The build lands in ``node_modules/.cache/cis-hydrogen/<key>``, the key being a hash of the lock
file and of the app's sources (tests/browser/hydrogen/): built once per key, reused by every
test run after it (``npm ci`` empties node_modules when the lock changes, taking old builds with
it). ``python -m tests.browser.webapp`` builds it ahead of the tests and prints the directory.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import http.server
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar

REPO = Path(__file__).resolve().parents[2]
APP_SOURCE = Path(__file__).resolve().parent / "hydrogen"
CACHE = REPO / "node_modules" / ".cache" / "cis-hydrogen"


class BuildError(RuntimeError):
    pass


def cache_key() -> str:
    digest = hashlib.sha256((REPO / "package-lock.json").read_bytes())
    for path in sorted(APP_SOURCE.iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_hydrogen() -> Path:
    """The built app's directory (with index.html), building it if this key has none yet."""
    vite = REPO / "node_modules" / ".bin" / "vite"
    if not vite.exists():
        raise BuildError(f"{vite} is missing: run `npm ci` (scripts/test does)")
    target = CACHE / cache_key()
    if (target / "index.html").exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may be building the same key
        if (target / "index.html").exists():
            return target
        staging = CACHE / f"{target.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        result = subprocess.run(
            [
                str(vite),
                "build",
                "--config",
                str(APP_SOURCE / "vite.config.mjs"),
                "--outDir",
                str(staging),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if result.returncode != 0 or not (staging / "index.html").exists():
            raise BuildError(
                f"vite build of Hydrogen failed ({result.returncode}):\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        for old in CACHE.iterdir():
            if old.is_dir() and old != staging:
                shutil.rmtree(old, ignore_errors=True)
        staging.rename(target)
    return target


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map: ClassVar[dict[str, str]] = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",
        ".mjs": "text/javascript",
        ".wasm": "application/wasm",
        ".json": "application/json",
    }

    def log_message(self, format: str, *args: object) -> None:
        pass  # the tests read the browser, not this server's access log


class StaticSite:
    """A directory served over HTTP on 127.0.0.1 (a thread; stopped by ``close``)."""

    def __init__(self, root: Path) -> None:
        handler = functools.partial(_Handler, directory=str(root))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="static-site", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


if __name__ == "__main__":
    try:
        print(build_hydrogen())
    except BuildError as err:
        print(err, file=sys.stderr)
        sys.exit(1)
